"""benchmarks/gpu_check.py --reduced: the GPU machine's one command, small, on this CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_reduced_gpu_check_runs_every_part_and_reports(tmp_path):
    completed = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--reduced",
                                "--output", str(tmp_path)], cwd=REPO, capture_output=True,
                               text=True, timeout=1500)  # Its parts' limits: 4 x 300 s.
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert completed.returncode == 0, json.dumps(report, indent=1)[-4000:]
    for dtype in ("float32", "bfloat16"):
        bench = report["benchmark"][dtype]["report"]
        assert bench["dtype"] == dtype and bench["results"]["vit_flax"]["images_per_second"] > 0
        assert bench["compilation_cache"]["first_step_warm_cache"] > 0
    epoch = report["epoch"]
    assert epoch["status"] == 0 and epoch["train_examples"] == 180  # 90% of 10 x 20.
    assert epoch["epoch_seconds"] > 0
    counts = report["parity"]["counts"]
    assert counts["tests"] > 0 and counts["failures"] == counts["errors"] == 0
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown.startswith("# gpu_check (reduced)") and "## one CIFAR-10 epoch" in markdown
