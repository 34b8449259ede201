"""Unpack a `train/<class>/*.jpg` tarball into PATH/train and a held-out PATH/test.

The shared CIFAR-10 JPEG copy has no test split; this holds out the first `--test-per-class`
files (by sorted name) of every class, so `train.py --dataset folder --data-dir PATH` reports
accuracy on images it never trained or validated on.

    python scripts/split_image_tarball.py ../shared/data/cifar10-jpeg-train.tar.gz /tmp/cifar10

A tarball is untrusted input: every file is written to PATH/<split>/<class>/<name>, and a
member that could land elsewhere (an absolute name, a `..`, a link or device) refuses the
whole tarball, before anything is written. benchmarks/gpu_check.py unpacks with `split`.
"""

import argparse
import sys
import tarfile
from collections import defaultdict
from pathlib import Path, PurePosixPath


class UnsafeMember(ValueError):
    """A tarball member that is not a plain file inside the archive; the message names it."""


def classes(tar: tarfile.TarFile) -> dict[str, list[tarfile.TarInfo]]:
    """{class: its file members, sorted by name}: each file's class is its folder's name.
    Raises UnsafeMember for the first member that is neither a folder nor a plain file at a
    relative path without `..` (which a folder class and file name could not hold)."""
    by_class = defaultdict(list)
    for member in tar.getmembers():
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise UnsafeMember(f"tarball member {member.name!r} points outside the archive "
                               f"(an absolute path or '..'); expected train/<class>/<file>")
        if member.isdir():
            continue
        if not member.isfile():
            raise UnsafeMember(f"tarball member {member.name!r} is a link or device, not a "
                               f"file; expected only files train/<class>/<file>")
        if len(path.parts) < 2:
            raise UnsafeMember(f"tarball member {member.name!r} is in no class folder; "
                               f"expected train/<class>/<file>")
        by_class[path.parts[-2]].append(member)
    for files in by_class.values():
        files.sort(key=lambda member: member.name)
    return dict(sorted(by_class.items()))


def split(tarball: str | Path, output: str | Path, test_per_class: int,
          train_per_class: int | None = None) -> dict[str, tuple[int, int]]:
    """Unpack `tarball`: the first `test_per_class` files (by sorted name) of each class to
    output/test/<class>/, then at most `train_per_class` (None: all) of the rest to
    output/train/<class>/. {class: (test files, train files)}. UnsafeMember (nothing
    written) when a member could be written outside `output`."""
    output, counts = Path(output), {}
    with tarfile.open(tarball) as tar:
        for name, files in classes(tar).items():
            test, train = files[:test_per_class], files[test_per_class:][:train_per_class]
            for folder, chosen in (("test", test), ("train", train)):
                target = output / folder / name
                for member in chosen:
                    target.mkdir(parents=True, exist_ok=True)
                    (target / PurePosixPath(member.name).name).write_bytes(
                        tar.extractfile(member).read())
            counts[name] = (len(test), len(train))
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tarball")
    parser.add_argument("output")
    parser.add_argument("--test-per-class", type=int, default=500)
    args = parser.parse_args(argv)
    try:
        counts = split(args.tarball, args.output, args.test_per_class)
    except UnsafeMember as error:
        print(f"error: {error}; nothing was written", file=sys.stderr)
        return 2
    for name, (test, train) in counts.items():
        print(f"{name}: {test} test, {train} train")
    return 0


if __name__ == "__main__":
    sys.exit(main())
