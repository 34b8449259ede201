"""Does --init-from help? Pretrain on 5 CIFAR-10 classes, fine-tune on the other 5 with few
images a class, against training from scratch for the same steps, over several seeds.

    python scripts/split_image_tarball.py ../shared/data/cifar10-jpeg-train.tar.gz /tmp/cifar10
    python scripts/transfer_experiment.py /tmp/cifar10 runs/transfer

DATA is a folder split as split_image_tarball.py writes it (train/<class>/, test/<class>/).
Into OUTPUT go two image folders (links, not copies): `first/` (the first 5 classes, all
their images) and `second/` (the other 5: `--per-class` training images each, all their
held-out test images), then the runs, each a train.py workdir:
  source              --recipe strong on first/ for --source-epochs
  scratch_seedS       --recipe strong on second/ for --epochs, seed S
  tuned_seedS         the same, with --init-from source
and OUTPUT/transfer.json: each run's test accuracy, and the mean +- std of both over seeds.
Every run is train.py in its own process, as a user runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def link_classes(data: Path, output: Path, classes: list[str], per_class: int | None) -> Path:
    """output/{train,test}/<class>/ of links to data's files: the first `per_class`
    training images of each class (None: all), every test image."""
    for split, limit in (("train", per_class), ("test", None)):
        for name in classes:
            folder = output / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for image in sorted((data / split / name).iterdir())[:limit]:
                if not (folder / image.name).exists():
                    (folder / image.name).symlink_to(image.resolve())
    return output


def train(workdir: Path, data: Path, epochs: int, *extra: str) -> dict:
    """One train.py run (resumed if it is there already); its results.json."""
    command = [sys.executable, str(REPO / "train.py"), "--recipe", "strong", "--dataset",
               "folder", "--data-dir", str(data), "--epochs", str(epochs), "--workdir",
               str(workdir), *extra]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads((workdir / "results.json").read_text())


def summary(results: list[dict]) -> dict:
    accuracies = [r["test_accuracy"] for r in results]
    return {"test_accuracy": accuracies, "mean": statistics.mean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", type=Path, help="a split CIFAR-10 folder (train/, test/)")
    parser.add_argument("output", type=Path, help="where the folders, runs and JSON go")
    parser.add_argument("--per-class", type=int, default=100,
                        help="training images per class of the second 5 classes")
    parser.add_argument("--source-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30, help="epochs on the second 5")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    classes = sorted(path.name for path in (args.data / "train").iterdir())
    if len(classes) != 10:
        parser.error(f"expected the 10 CIFAR-10 classes in {args.data / 'train'}, found "
                     f"{len(classes)}")
    first = link_classes(args.data, args.output / "first", classes[:5], None)
    second = link_classes(args.data, args.output / "second", classes[5:], args.per_class)
    source = args.output / "source"
    report = {"classes": {"first": classes[:5], "second": classes[5:]},
              "per_class": args.per_class, "epochs": args.epochs,
              "source": train(source, first, args.source_epochs)["test_accuracy"]}
    runs = {"scratch": [], "tuned": []}
    for seed in args.seeds:
        for kind, extra in (("scratch", []), ("tuned", ["--init-from", str(source)])):
            runs[kind].append(train(args.output / f"{kind}_seed{seed}", second, args.epochs,
                                    "--seed", str(seed), *extra))
    report.update({kind: summary(results) for kind, results in runs.items()})
    (args.output / "transfer.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
