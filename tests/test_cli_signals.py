"""SIGTERM while train.py starts: one line, not a silent exit 143."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every test here starts processes: left out of the quick tier (pytest -m "not slow").
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
# train.py's main, with SIGTERM sent to itself at argv[1]: "import" (as it imports vit_flax)
# or "data" (as vit_flax.run loads the data set).
STOPPED_AT = """
import builtins, os, signal, sys
sys.path.insert(0, os.path.dirname(sys.argv[2]))
import train
if sys.argv[1] == "import":
    real = builtins.__import__
    def importing(name, *args, **kwargs):
        if name == "vit_flax":
            builtins.__import__ = real
            os.kill(os.getpid(), signal.SIGTERM)
        return real(name, *args, **kwargs)
    builtins.__import__ = importing
else:
    from vit_flax.data import stream
    def loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
    stream.open_source = loading
sys.exit(train.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where, said", [
    ("import", "stopped before training started; nothing was written"),
    ("data", "stopped before training started; run the same command to start again")])
def test_sigterm_while_starting_is_one_line(tmp_path, where, said):
    completed = subprocess.run(
        [sys.executable, "-c", STOPPED_AT, where, str(TRAIN), "--workdir", str(tmp_path / "w"),
         "--dataset", "folder", "--data-dir", str(tmp_path / "images"),
         "--compilation-cache", "none"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert (completed.returncode, completed.stderr) == (0, f"interrupted: SIGTERM: {said}\n")
