"""One command for a machine with a GPU: the benchmark, a timed CIFAR-10 epoch, the parity
tests, and one report of them (JSON + markdown).

    python benchmarks/gpu_check.py                     # on the GPU machine, < 10 minutes
    python benchmarks/gpu_check.py --reduced           # the same, small, on this CPU (~1 min)

Parts, each in its own process, each with its time limit (a part that fails or runs out of
time is reported as such, and the others still run):
- benchmark: benchmarks/benchmark.py on the seed model, float32 (Keras beside vit_flax) and
  bfloat16 (vit_flax), each with its first step on an empty and on a warm compilation cache;
- epoch: train.py for one epoch on the shared CIFAR-10 JPEGs (../shared/data/
  cifar10-jpeg-train.tar.gz), unpacked into a temporary folder with 500 test images per
  class held out as scripts/split_image_tarball.py does; its epoch time and images/s;
- parity: the parity tests (pytest parity), with their pass/fail counts, with float32
  matmuls in full precision (JAX_DEFAULT_MATMUL_PRECISION=highest: on a GPU JAX may run
  float32 matmuls in TF32, 10 mantissa bits, which the parity tolerances are not for).
`--reduced` runs every part on the CPU in a small form: the tiny test model, a few steps,
the cache check for float32 only, 20 + 4 images per class, and one parity file. Writes
OUTPUT/gpu_check.json and OUTPUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import benchmark as bench

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
# The tiny model of tests/conftest.py: compiles in seconds on a CPU.
TINY = {"input_size": 8, "image_size": 12, "patch_size": 4, "projection_dim": 8,
        "num_heads": 2, "transformer_layers": 1, "mlp_head_units": [16, 8]}
GOAL_IMAGES, GOAL_SECONDS = 45_000, 6  # The GPU goal: the seed's epoch in <= 6 s.
# per_class: (images per class to train on, None: all the rest; to test on). limits: each
# part's seconds, within the 10 minutes (a GPU compiles the seed's step in well under one).
FULL = {"batch_size": 256, "steps": 5, "per_class": (None, 500), "parity": ["parity"],
        "config": None, "epoch_flags": ["--compilation-cache", "none"],
        "cache_check": ("float32", "bfloat16"),
        "limits": {"float32": 150, "bfloat16": 100, "epoch": 140, "parity": 180}}
# The full epoch compiles with no cache (its compile time is measured); the reduced one
# keeps JAX's rolled threefry on the CPU (the same random bits, compiled in half the time; on a GPU
# the flag changes nothing, JAX unrolls there itself) and the default compilation cache
# ($VIT_FLAX_CACHE: in the tests, the session's, where the tiny model's programs are).
REDUCED = {"batch_size": 8, "steps": 2, "per_class": (20, 4),
           "parity": ["parity/test_model.py"],  # The seed model against Keras: 2 tests.
           "config": json.dumps({**TINY, "num_classes": 10}),
           "epoch_flags": ["--no-unroll-threefry"],
           # One dtype's: the check is the same code for both (a process fewer, ~8 s).
           "cache_check": ("float32",),
           "limits": {"float32": 300, "bfloat16": 300, "epoch": 300, "parity": 300}}


def run_part(command: list[str], limit: float, env: dict) -> dict:
    """Run one part; its exit status, seconds, and the end of its output."""
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                   timeout=limit)
        status, output = completed.returncode, completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as expired:
        status, output = "timeout", f"stopped after {limit:.0f} s: {expired.stderr or ''}"
    return {"command": " ".join(command), "status": status,
            "seconds": round(time.perf_counter() - started, 1), "output_tail": output[-2000:]}


def benchmark(plan: dict, work: Path, env: dict) -> dict:
    """float32 (with Keras) and bfloat16, each with the compilation-cache check."""
    parts = {}
    for dtype, names in (("float32", ["keras", "vit_flax", "vit_flax-one-pass"]),
                         ("bfloat16", ["vit_flax", "vit_flax-one-pass"])):
        if plan["config"]:  # The reduced form: vit_flax only (Keras takes a minute to start).
            names = ["vit_flax"]
        output = work / f"benchmark-{dtype}.json"
        command = [sys.executable, "benchmarks/benchmark.py", "--batch-size",
                   str(plan["batch_size"]), "--steps", str(plan["steps"]), "--dtype", dtype,
                   "--implementations", *names, "--json", str(output)]
        if dtype in plan["cache_check"]:
            command.append("--cache-check")
        if plan["config"]:
            command += ["--config", plan["config"], "--matmul-size", "512"]
        part = run_part(command, plan["limits"][dtype], env)
        if output.exists():
            part["report"] = json.loads(output.read_text())
        parts[dtype] = part
    return parts


def load_splitter():
    """scripts/split_image_tarball.py as a module: one unpacker, which refuses a member that
    could be written outside its folder (scripts/ is not a package, so by path)."""
    spec = importlib.util.spec_from_file_location("split_image_tarball",
                                                  REPO / "scripts" / "split_image_tarball.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_flags(config: str | None) -> list[str]:
    """ViTConfig fields (JSON) as train.py flags; num_classes comes from the data."""
    fields = json.loads(config or "{}")
    fields.pop("num_classes", None)
    return [f"--{name.replace('_', '-')}=" + (",".join(map(str, value))
                                              if isinstance(value, list) else str(value))
            for name, value in fields.items()]


def epoch(plan: dict, work: Path, env: dict, tarball: Path = TARBALL) -> dict:
    """One train.py epoch on the CIFAR-10 JPEGs; its time from history.json."""
    if not tarball.is_file():
        return {"status": "skipped", "reason": f"{tarball} not found"}
    images, workdir = work / "cifar10", work / "epoch"
    started = time.perf_counter()
    splitter, (train_count, test_count) = load_splitter(), plan["per_class"]
    try:
        splitter.split(tarball, images, test_count, train_count)
    except splitter.UnsafeMember as error:  # Nothing written; no epoch.
        return {"status": "refused", "reason": str(error)}
    part = run_part([sys.executable, "train.py", "--dataset", "folder", "--data-dir",
                     str(images), "--epochs", "1", "--batch-size", str(plan["batch_size"]),
                     "--workdir", str(workdir), *config_flags(plan["config"]),
                     *plan["epoch_flags"]],
                    plan["limits"]["epoch"], env)
    part["unpack_seconds"] = round(time.perf_counter() - started - part["seconds"], 1)
    if (workdir / "history.json").exists():
        row = json.loads((workdir / "history.json").read_text())[0]
        results = json.loads((workdir / "results.json").read_text())
        part.update({key: row[key] for key in ("epoch_seconds", "images_per_second", "loss",
                                               "val_accuracy")},
                    compile_seconds=results["compile_seconds"],
                    train_examples=results["train_examples"],
                    test_accuracy=results["test_accuracy"], devices=results["devices"])
        # The goal's unit: the seed's epoch, 45,000 training images (CIFAR-100's 50,000
        # less the validation split); here 10% of the unpacked images validate.
        part["seconds_per_45000_images"] = round(GOAL_IMAGES / row["images_per_second"], 2)
    return part


def parity(plan: dict, work: Path, env: dict) -> dict:
    """The parity tests; pass/fail/skip counts from their JUnit XML."""
    report = work / "parity.xml"
    env = dict(env, JAX_DEFAULT_MATMUL_PRECISION="highest")
    # -n 0: one process (pyproject's -n auto would start a worker per core, each taking
    # most of the GPU's memory for itself).
    part = run_part([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                     f"--junitxml={report}", *plan["parity"]], plan["limits"]["parity"], env)
    if report.exists():
        suite = ElementTree.parse(report).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors",
                                                          "skipped")}
        part["counts"] = counts
    return part


def device(report: dict) -> str:
    """As the benchmark's vit_flax saw it (this process never starts JAX: on a GPU it would
    take the memory the parts need)."""
    for part in report["benchmark"].values():
        if "device" in part.get("report", {}):
            return part["report"]["device"]
    return "unknown (the benchmark did not run)"


def markdown(report: dict) -> str:
    """The report for a person: what ran, how long, and the main figures of each part."""
    lines = [f"# gpu_check {'(reduced) ' if report['reduced'] else ''}{report['date']}", "",
             f"Machine {report['machine']}, device {device(report)}, "
             f"{report['seconds']:.0f} s in all; `{report['command']}`", "",
             "| part | status | seconds |", "|---|---|---|"]
    parts = {f"benchmark {dtype}": part for dtype, part in report["benchmark"].items()}
    parts.update(epoch=report["epoch"], parity=report["parity"])
    lines += [f"| {name} | {part['status']} | {part.get('seconds', '')} |"
              for name, part in parts.items()]
    for dtype, part in report["benchmark"].items():
        if "report" in part:
            lines += ["", f"## benchmark, {dtype}", "", *bench.markdown(part["report"])]
    if "epoch_seconds" in report["epoch"]:
        epoch_part = report["epoch"]
        lines += ["", "## one CIFAR-10 epoch", "",
                  f"{epoch_part['train_examples']} training images on {epoch_part['devices']} "
                  f"device(s): {epoch_part['epoch_seconds']:.1f} s (validation included), "
                  f"{epoch_part['images_per_second']:.0f} images/s, train step compiled in "
                  f"{epoch_part['compile_seconds']:.1f} s; loss {epoch_part['loss']:.4f}, "
                  f"test accuracy {epoch_part['test_accuracy']:.4f}",
                  "", f"At that speed the seed's epoch of {GOAL_IMAGES:,} images trains in "
                  f"{epoch_part['seconds_per_45000_images']:.2f} s (goal on one H100-class "
                  f"GPU: <= {GOAL_SECONDS} s)."]
    if "counts" in report["parity"]:
        lines += ["", "## parity", "", json.dumps(report["parity"]["counts"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true",
                        help="a small form on the CPU (tiny model, few images)")
    parser.add_argument("--output", default="gpu_check", help="folder for the report")
    parser.add_argument("--tarball", type=Path, default=TARBALL,
                        help="train/<class>/*.jpg images for the epoch part")
    args = parser.parse_args(argv)
    plan = REDUCED if args.reduced else FULL
    env = dict(os.environ, JAX_PLATFORMS="cpu") if args.reduced else dict(os.environ)
    started = time.perf_counter()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": os.uname().nodename,
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "reduced": args.reduced}
    with tempfile.TemporaryDirectory() as work:
        report["benchmark"] = benchmark(plan, Path(work), env)
        report["epoch"] = epoch(plan, Path(work), env, args.tarball)
        report["parity"] = parity(plan, Path(work), env)
    report["seconds"] = time.perf_counter() - started
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (output / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    parts = [*report["benchmark"].values(), report["epoch"], report["parity"]]
    return 0 if all(part["status"] in (0, "skipped") for part in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
