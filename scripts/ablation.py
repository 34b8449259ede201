"""The strong recipe with one ingredient removed at a time, each a train.py run on the same
images and seed, tested on the same held-out images: what each ingredient is worth.

    python scripts/split_image_tarball.py ../shared/data/cifar10-jpeg-train.tar.gz /tmp/cifar10
    python scripts/ablation.py /tmp/cifar10 runs/ablation --epochs 2 --train-examples 10000

DATA is a folder split as split_image_tarball.py writes it (train/<class>/, test/<class>/).
Into OUTPUT go one train.py workdir per variant (a rerun resumes or skips finished ones) and
OUTPUT/ablation.json: each variant's flags, test accuracy, top-5 and training seconds.
A short budget (few epochs, a subset) ranks ingredients for short runs only: what pays off
over 100 epochs (regularization above all) can cost in 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each variant: the flags that remove one of strong's ingredients (README's recipe table),
# restoring the seed's value of those fields; the head, which is the seed's, against the
# pooled head strong had before this ablation chose the flatten one.
VARIANTS = {
    "strong": [],
    "strong, another seed (the noise)": ["--seed", "1"],  # The last --seed wins.
    "no crop (seed's rotation + zoom)": ["--crop-padding", "0", "--rotation-factor", "0.02",
                                         "--zoom-factor", "0.2"],
    "no label smoothing": ["--label-smoothing", "0"],
    "constant lr, no warmup": ["--schedule", "constant", "--warmup-epochs", "0"],
    "weight decay 1e-4": ["--weight-decay", "1e-4"],
    "batch 256": ["--batch-size", "256"],
    "pooled head (gap, 256)": ["--head", "gap", "--mlp-head-units", "256"],
}


def run(workdir: Path, data: Path, args, flags: list[str]) -> dict:
    """One train.py run (resumed, or only re-read, if it is there already)."""
    command = [sys.executable, str(REPO / "train.py"), "--recipe", "strong", "--dataset",
               "folder", "--data-dir", str(data), "--epochs", str(args.epochs),
               "--train-examples", str(args.train_examples), "--seed", str(args.seed),
               "--workdir", str(workdir), *flags]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    results = json.loads((workdir / "results.json").read_text())
    history = json.loads((workdir / "history.json").read_text())
    return {"flags": flags, "test_accuracy": results["test_accuracy"],
            "test_top5": results["test_top-5-accuracy"],
            "train_seconds": round(sum(row["epoch_seconds"] for row in history), 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", type=Path, help="a split CIFAR-10 folder (train/, test/)")
    parser.add_argument("output", type=Path, help="where the runs and ablation.json go")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-examples", type=int, default=10_000,
                        help="the first N training images (10%% of them validate)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = {"epochs": args.epochs, "train_examples": args.train_examples, "seed": args.seed,
              "variants": {}}
    for index, (name, flags) in enumerate(VARIANTS.items()):
        report["variants"][name] = run(args.output / f"variant{index}", args.data, args, flags)
        (args.output / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
