"""Checkpoint and resume: a killed run, started again, ends as the run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, TINY_FLAGS, random_images, write_image_folder

import vit_flax
from vit_flax import data

REPO = Path(__file__).resolve().parents[1]
METRICS = ("epoch", "loss", "accuracy", "top-5-accuracy", "val_loss", "val_accuracy",
           "val_top-5-accuracy")
EPOCHS = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), train_per_class=40,
                              test_per_class=4)


def command(folder: Path, workdir: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *TINY_FLAGS, "--dataset", "folder",
            "--data-dir", str(folder), "--epochs", str(EPOCHS), "--workdir", str(workdir)]


def environment() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def metrics(workdir: Path) -> list[list[float]]:
    history = json.loads((workdir / "history.json").read_text())
    return [[row[name] for name in METRICS] for row in history]  # Timings left out.


def epochs_done(workdir: Path) -> int:
    try:
        return len(json.loads((workdir / "history.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def start_and_signal(folder: Path, workdir: Path, after_epochs: int, sig: int):
    """Start train.py; once `after_epochs` epochs are in history.json, send `sig`."""
    process = subprocess.Popen(command(folder, workdir), env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while epochs_done(workdir) < after_epochs and process.poll() is None:
        assert time.monotonic() < deadline, "train.py made no progress"
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(command(folder, workdir), env=environment(), check=True,
                   capture_output=True, timeout=600)
    return metrics(workdir)


@pytest.mark.parametrize("after_epochs", [0, 1, 3])
def test_sigkill_then_resume_gives_the_uninterrupted_history(folder, tmp_path, uninterrupted,
                                                             after_epochs):
    # 0: killed during start-up or the first epoch; 1 and 3: somewhere after those epochs,
    # possibly while a checkpoint is being written.
    code, _, _ = start_and_signal(folder, tmp_path, after_epochs, signal.SIGKILL)
    assert code == -signal.SIGKILL
    completed = subprocess.run(command(folder, tmp_path), env=environment(),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert metrics(tmp_path) == uninterrupted  # Bit for bit, on the CPU.


def test_sigterm_stops_cleanly_and_resumes(folder, tmp_path, uninterrupted):
    # Sent after epoch 1 of 5: it lands while training (an epoch takes ~0.1 s here).
    code, _, stderr = start_and_signal(folder, tmp_path, 1, signal.SIGTERM)
    assert code == 0, stderr[-2000:]
    assert "interrupted: SIGTERM" in stderr and "Traceback" not in stderr
    assert epochs_done(tmp_path) < EPOCHS
    subprocess.run(command(folder, tmp_path), env=environment(), check=True,
                   capture_output=True, timeout=600)
    assert metrics(tmp_path) == uninterrupted


def small_problem():
    labels = np.arange(48) % 3
    return data.from_arrays(random_images(48, 8), labels, random_images(9, 8, 1), labels[:9])


def test_a_workdir_of_another_config_is_refused_unless_overwrite(tmp_path):
    config = vit_flax.ViTConfig(**TINY, epochs=1)
    quiet = lambda _: None  # noqa: E731
    vit_flax.train(config, small_problem(), tmp_path, log=quiet)
    other = config.replace(learning_rate=0.01)
    with pytest.raises(vit_flax.ConfigError, match="differs in learning_rate.*--overwrite"):
        vit_flax.train(other, small_problem(), tmp_path, log=quiet)
    vit_flax.train(other, small_problem(), tmp_path, log=quiet, overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.01
    # More epochs is not another run: it continues this one.
    results = vit_flax.train(other.replace(epochs=3), small_problem(), tmp_path, log=quiet,
                             keep_checkpoints=1)
    assert len(json.loads((tmp_path / "history.json").read_text())) == 3
    assert results["best_epoch"] in (1, 2, 3)
    assert sorted(p.name for p in (tmp_path / "run_state").iterdir()) == ["3"]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_epoch(tmp_path):
    config = vit_flax.ViTConfig(**TINY, epochs=3, learning_rate=1e30)
    with pytest.raises(FloatingPointError,
                       match=r"non-finite at step \d+ \(epoch 1\).*keeps epoch 0"):
        vit_flax.train(config, small_problem(), tmp_path, log=lambda _: None)
    assert not (tmp_path / "run_state").exists() or \
        not any((tmp_path / "run_state").iterdir())


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `directory` (TFRecord framing:
    length, its CRC, an Event protobuf, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.iterdir()):
        payload = path.read_bytes()
        offset = 0
        while offset < len(payload):
            length = int.from_bytes(payload[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(payload[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_events_per_epoch_and_per_step(tmp_path):
    config = vit_flax.ViTConfig(**TINY, epochs=2)
    vit_flax.train(config, small_problem(), tmp_path, log=lambda _: None, log_every=2)
    scalars = read_scalars(tmp_path / "tensorboard")
    history = json.loads((tmp_path / "history.json").read_text())
    for split, prefix in (("train", ""), ("validation", "val_")):
        for metric in ("loss", "accuracy", "top-5-accuracy"):
            logged = scalars[f"{split}/{metric}"]
            assert [step for step, _ in logged] == [1, 2]
            np.testing.assert_allclose([value for _, value in logged],
                                       [row[prefix + metric] for row in history], rtol=1e-6)
    assert [value for _, value in scalars["train/learning_rate"]] == pytest.approx([1e-3] * 2)
    assert len(scalars["train/epoch_seconds"]) == 2
    # 43 training examples at batch 8: 6 steps an epoch, logged at steps 2 and 4 of each.
    assert [step for step, _ in scalars["step/loss"]] == [2, 4, 8, 10]
