"""Unpack a `train/<class>/*.jpg` tarball into PATH/train and a held-out PATH/test.

The shared CIFAR-10 JPEG copy has no test split; this holds out the first `--test-per-class`
files (by sorted name) of every class, so `train.py --dataset folder --data-dir PATH` reports
accuracy on images it never trained or validated on.

    python scripts/split_image_tarball.py ../shared/data/cifar10-jpeg-train.tar.gz /tmp/cifar10
"""

import argparse
import tarfile
from collections import defaultdict
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tarball")
    parser.add_argument("output")
    parser.add_argument("--test-per-class", type=int, default=500)
    args = parser.parse_args()
    output = Path(args.output)
    with tarfile.open(args.tarball) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        by_class = defaultdict(list)
        for member in members:
            parts = Path(member.name).parts
            by_class[parts[-2]].append(member)
        for name, files in sorted(by_class.items()):
            files.sort(key=lambda m: m.name)
            for i, member in enumerate(files):
                split = "test" if i < args.test_per_class else "train"
                target = output / split / name / Path(member.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
            print(f"{name}: {min(len(files), args.test_per_class)} test, "
                  f"{max(len(files) - args.test_per_class, 0)} train")


if __name__ == "__main__":
    main()
