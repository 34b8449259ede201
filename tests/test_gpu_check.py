"""benchmarks/gpu_check.py --reduced: the GPU machine's one command, small, on this CPU."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def jpeg_tarball(path: Path, classes: int = 10, per_class: int = 24) -> Path:
    """train/<class>/NNNN.jpg, as the shared CIFAR-10 copy (which a clone may not have
    beside it), small."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for label in range(classes):
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                encoded = io.BytesIO()
                Image.fromarray(pixels).save(encoded, format="JPEG")
                member = tarfile.TarInfo(f"train/class{label}/{i:04d}.jpg")
                member.size = encoded.tell()
                encoded.seek(0)
                tar.addfile(member, encoded)
    return path


@pytest.mark.slow
def test_reduced_gpu_check_runs_every_part_and_reports(tmp_path):
    tarball = jpeg_tarball(tmp_path / "images.tar.gz")
    completed = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--reduced",
                                "--output", str(tmp_path), "--tarball", str(tarball)],
                               cwd=REPO, capture_output=True,
                               text=True, timeout=1500)  # Its parts' limits: 4 x 300 s.
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert completed.returncode == 0, json.dumps(report, indent=1)[-4000:]
    for dtype in ("float32", "bfloat16"):
        bench = report["benchmark"][dtype]["report"]
        assert bench["dtype"] == dtype and bench["results"]["vit_flax"]["images_per_second"] > 0
    # The cache check, reduced: float32's only (the full check runs it for both dtypes).
    assert report["benchmark"]["float32"]["report"]["compilation_cache"][
        "first_step_warm_cache"] > 0
    assert "compilation_cache" not in report["benchmark"]["bfloat16"]["report"]
    epoch = report["epoch"]
    assert epoch["status"] == 0 and epoch["train_examples"] == 180  # 90% of 10 x 20.
    assert epoch["epoch_seconds"] > 0
    assert epoch["seconds_per_45000_images"] == round(45_000 / epoch["images_per_second"], 2)
    counts = report["parity"]["counts"]
    assert counts["tests"] > 0 and counts["failures"] == counts["errors"] == 0
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown.startswith("# gpu_check (reduced)") and "## one CIFAR-10 epoch" in markdown


def test_the_epoch_part_refuses_a_tarball_member_outside_its_folder(tmp_path, monkeypatch):
    # The unpacking is scripts/split_image_tarball.py's (tests/infra/test_untrusted.py has
    # each kind of member); here, that gpu_check uses it and reports the refusal.
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    escape = Path("/", f"vit_flax-test-{uuid.uuid4().hex}.jpg")
    tarball = jpeg_tarball(tmp_path / "images.tar.gz", classes=2, per_class=6)
    with tarfile.open(tarball) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(tarball, "w:gz") as tar:
        hostile = tarfile.TarInfo(str(escape))
        hostile.size = 1
        for member, content in [*members, (hostile, b"x")]:
            tar.addfile(member, io.BytesIO(content))
    try:
        part = gpu_check.epoch(gpu_check.REDUCED, tmp_path, {}, tarball)
        assert not escape.exists()
    finally:
        escape.unlink(missing_ok=True)
    assert part == {"status": "refused", "reason": (
        f"tarball member {str(escape)!r} points outside the archive (an absolute path or "
        f"'..'); expected train/<class>/<file>")}
    assert not (tmp_path / "cifar10").exists() and not (tmp_path / "epoch").exists()
