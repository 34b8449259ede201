"""Make a large image folder for the loader measurements: every `train/<class>/*.jpg` of a
tarball (the shared CIFAR-10 JPEGs: 50,000 images of 32 px), upscaled to SIZE px (bicubic)
and saved as JPEG into OUTPUT/train/<class>/.

    python scripts/make_large_folder.py ../shared/data/cifar10-jpeg-train.tar.gz \
        /tmp/cifar10-224 --size 224

At 224 px and quality 90 the 50,000 files take about 0.6 GB of disk (the folder, not the
repository: give a path outside it). Files that already exist are kept, so an interrupted
run continues where it stopped.
"""

import argparse
import io
import multiprocessing
import tarfile
from pathlib import Path

from PIL import Image


def upscale(job: tuple[bytes, str, int, int]) -> None:
    payload, target, size, quality = job
    with Image.open(io.BytesIO(payload)) as image:
        image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(
            target, quality=quality)


def jobs(tarball: str, output: Path, size: int, quality: int):
    """(JPEG bytes, target path, size, quality) of every file not yet written."""
    with tarfile.open(tarball) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 2:
                continue
            target = output / "train" / parts[-2] / Path(parts[-1]).with_suffix(".jpg")
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            yield tar.extractfile(member).read(), str(target), size, quality


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tarball")
    parser.add_argument("output")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=None, help="default: every core")
    args = parser.parse_args()
    output = Path(args.output)
    with multiprocessing.Pool(args.workers) as pool:
        done = 0
        for done, _ in enumerate(pool.imap_unordered(
                upscale, jobs(args.tarball, output, args.size, args.quality), chunksize=64), 1):
            if done % 5000 == 0:
                print(f"{done} images written", flush=True)
    print(f"{done} images written to {output}/train")


if __name__ == "__main__":
    main()
