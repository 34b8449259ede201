"""Issue 21's data-wait figures: how long train.py waits for its data, streamed and in memory,
and the small-data path's speed against an older tree (docs/data-wait.md has the figures).

    python scripts/make_large_folder.py ../shared/data/cifar10-jpeg-train.tar.gz /tmp/c224
    python scripts/split_image_tarball.py ../shared/data/cifar10-jpeg-train.tar.gz /tmp/cifar10
    git worktree add /tmp/old86 86231aa
    python benchmarks/data_wait.py --large /tmp/c224 --small /tmp/cifar10 --old-tree /tmp/old86

Cases (--cases, default all), each a whole `train.py` run in its own workdir under --workdir:

* strong: the strong recipe (32 px input) on the 224-px folder (--large), `--data-in stream`
  and `--data-in memory`, 1 epoch of --strong-examples (4000: 3600 train, 400 validate).
* ti16: `--model vit-ti16` at 224 px on the same folder, streamed, batch 32, 1 epoch of
  --ti16-examples (640).
* small: the strong recipe on the 32-px folder (--small; in memory, on the device), 2 epochs
  of --strong-examples, this tree against --old-tree, alternating --repeats times each.

Every figure is read from the run's history.json: data_wait (the fraction of the epoch's
training time spent waiting for the next batch; the old tree does not report it),
images_per_second (training examples / training seconds: no start-up, no compile, no
validation) and epoch_seconds (with validation). The 1-minute load average before and after
each run is printed beside it: the machine may be shared. One table at the end, then the
small case's medians (last epoch's images/s) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strong(folder: str, data_in: str | None, examples: int, epochs: int) -> list[str]:
    args = ["--recipe", "strong", "--dataset", "folder", "--data-dir", folder,
            "--epochs", str(epochs), "--train-examples", str(examples)]
    return args + (["--data-in", data_in] if data_in else [])


def ti16(folder: str, examples: int) -> list[str]:
    return ["--model", "vit-ti16", "--input-size", "224", "--image-size", "224",
            "--dataset", "folder", "--data-dir", folder, "--data-in", "stream",
            "--batch-size", "32", "--microbatch-size", "32", "--epochs", "1",
            "--train-examples", str(examples)]


def run(tree: str, args: list[str], workdir: str) -> tuple[list[dict], float, float, float]:
    """One train.py run of `tree` (its own vit_flax: the script's folder comes first on
    sys.path): (history rows, load before, load after, wall seconds)."""
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    command = [sys.executable, os.path.join(tree, "train.py"), *args, "--workdir", workdir]
    print("$", " ".join(command), flush=True)
    before, started = os.getloadavg()[0], time.perf_counter()
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True)
    wall, after = time.perf_counter() - started, os.getloadavg()[0]
    with open(workdir + ".log", "w") as log:
        log.write(done.stdout + done.stderr)
    if done.returncode:
        sys.exit(f"exit {done.returncode}; the last output:\n{(done.stdout + done.stderr)[-3000:]}")
    with open(os.path.join(workdir, "history.json")) as f:
        rows = json.load(f)
    return rows, before, after, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", help="folder of 224-px JPEGs (train/<class>/*.jpg)")
    parser.add_argument("--small", help="folder of the 32-px CIFAR-10 JPEGs")
    parser.add_argument("--old-tree", help="a checkout of the tree to compare (small case)")
    parser.add_argument("--workdir", default="/tmp/dw")
    parser.add_argument("--cases", default="strong,ti16,small")
    parser.add_argument("--strong-examples", type=int, default=4000)
    parser.add_argument("--ti16-examples", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    cases = options.cases.split(",")
    jobs = []  # (case, tree name, tree, args, workdir)
    if "strong" in cases:
        for data_in in ("stream", "memory"):
            jobs.append((f"strong 224-px folder, {data_in}", "new", HERE,
                         strong(options.large, data_in, options.strong_examples, 1),
                         f"{options.workdir}/strong-{data_in}"))
    if "ti16" in cases:
        jobs.append(("vit-ti16 224 px, stream", "new", HERE,
                     ti16(options.large, options.ti16_examples), f"{options.workdir}/ti16"))
    if "small" in cases:
        trees = [("new", HERE)] + ([("old", options.old_tree)] if options.old_tree else [])
        for repeat in range(options.repeats):
            for name, tree in trees:
                jobs.append(("strong 32-px folder, memory", name, tree,
                             strong(options.small, None, options.strong_examples, 2),
                             f"{options.workdir}/small-{name}-{repeat}"))
    table, small = [], {}
    for case, name, tree, args, workdir in jobs:
        rows, before, after, wall = run(tree, args, workdir)
        for row in rows:
            wait = f"{row['data_wait']:.1%}" if "data_wait" in row else "-"
            table.append((case, name, row["epoch"], wait, f"{row['images_per_second']:.1f}",
                          f"{row['epoch_seconds']:.1f}", f"{wall:.0f}",
                          f"{before:.1f} / {after:.1f}"))
            print("  " + " | ".join(map(str, table[-1])), flush=True)
        if case.startswith("strong 32-px"):
            small.setdefault(name, []).append(rows[-1]["images_per_second"])
    header = ("case", "tree", "epoch", "data wait", "images/s", "epoch s", "run wall s",
              "load 1m before / after")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for line in table:
        print("| " + " | ".join(map(str, line)) + " |")
    if small:
        print("\nsmall case, last epoch's images/s:")
        for name, rates in small.items():
            print(f"  {name}: median {statistics.median(rates):.1f} of "
                  f"{', '.join(f'{r:.1f}' for r in rates)}")
        if len(small) == 2:
            ratio = statistics.median(small["new"]) / statistics.median(small["old"])
            print(f"  new / old: {ratio:.3f}")


if __name__ == "__main__":
    main()
