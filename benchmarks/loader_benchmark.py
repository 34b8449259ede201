"""The streaming loader against the machine's decode limit, and its peak host memory.

    python scripts/make_large_folder.py ../shared/data/cifar10-jpeg-train.tar.gz /tmp/c224
    python benchmarks/loader_benchmark.py throughput /tmp/c224 --size 224 --images 4000
    python benchmarks/loader_benchmark.py throughput /tmp/c224 --size 32 --images 4000
    python benchmarks/loader_benchmark.py memory /tmp/c224 --size 224
    python benchmarks/loader_benchmark.py memory /tmp/c224 --size 224 --old --images 10000
    python benchmarks/loader_benchmark.py draft /tmp/c224 --size 32

throughput: images/s of (a) the decode limit: a plain multiprocessing.Pool of one process
per core, each decoding and resizing files with sources.read_image (Pillow, the loader's own
per-image work), and (b) the StreamFeed feeding a step that does nothing (each batch is
waited for on the device), for each --workers count (0: grain threads in this process).
Both read the same first --images files of the folder's order; they alternate --repeats
times. The loader's rate is over its whole pass, worker start included, and in steady
state (after its first batch). On a shared machine wall rates swing with the other jobs;
the CPU milliseconds per image (the Pool's workers during its timed map; the loader's
process and its workers) do not, and their ratio is the loader's efficiency against the
plain loop: the fraction of the decode limit it reaches where it has the cores to itself.

memory: the peak resident memory of one pass over the folder through the StreamFeed, this
process and its grain workers together (sampled every 20 ms), and the bytes the decoded
images would take in memory. --old decodes the first --images files the old way
(sources.read_images, as load_folder) and reports its peak instead.

draft: one core's images/s decoding and resizing --images files (400) with and without
Pillow's JPEG draft mode.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import multiprocessing
import os
import resource
import threading
import time

import numpy as np
import psutil

from vit_flax.data import sources, stream
from vit_flax.data.sources import Dataset


def folder_split(root: str, size: int, count: int | None) -> Dataset:
    listing = sources.list_folder(root)
    files, labels = listing.train
    count = len(files) if count is None else count
    return Dataset(stream.FileImages(files[:count], size), labels[:count])


def _decode(job):
    path, size = job
    return sources.read_image(path, size).shape[0]


def cpu_seconds(processes) -> float:
    """User + system CPU seconds of `processes` (psutil.Process objects, alive)."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def own_cpu_seconds() -> float:
    """This process' CPU seconds and its reaped children's (grain's workers, once ended)."""
    me, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def decode_limit(split: Dataset) -> tuple[float, float]:
    """(images/s, CPU ms per image) of a Pool of one process per core decoding the split."""
    images = split.images
    jobs = [(images.path(i), images.size) for i in range(len(images))]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(_decode, jobs[:os.cpu_count()])  # Workers started before the clock.
        workers = psutil.Process().children()
        cpu, started = cpu_seconds(workers), time.perf_counter()
        pool.map(_decode, jobs, chunksize=32)
        seconds, cpu = time.perf_counter() - started, cpu_seconds(workers) - cpu
    return len(jobs) / seconds, 1000 * cpu / len(jobs)


def loader_rate(split: Dataset, workers: int, batch_size: int) -> dict:
    """The StreamFeed feeding a step that does nothing: images/s over the pass and after
    its first batch, seconds waited for the decoders, CPU ms per image (this process and
    its workers, their start included)."""
    from vit_flax.infra import parallel
    from vit_flax.training import feeds

    feed = feeds.StreamFeed(split, parallel.data_mesh(), workers=workers)
    cpu, started = own_cpu_seconds(), time.perf_counter()
    first = None
    batches = feed.batches(np.arange(len(split)), batch_size)
    for batch in batches:
        batch.images.block_until_ready()
        first = first or time.perf_counter()
    end = time.perf_counter()
    del batches
    gc.collect()
    time.sleep(1.0 if workers else 0.0)  # The workers end and are reaped.
    return {"whole": len(split) / (end - started),
            "steady": (len(split) - batch_size) / (end - first),
            "waited": feed.wait_seconds,
            "cpu_ms": 1000 * (own_cpu_seconds() - cpu) / len(split)}


def throughput(args) -> dict:
    split = folder_split(args.folder, args.size, args.images)
    rows = []
    for repeat in range(args.repeats):
        limit, limit_cpu = decode_limit(split)
        rows.append({"repeat": repeat, "limit": limit, "limit_cpu_ms": limit_cpu})
        print(f"decode limit ({os.cpu_count()} processes): {limit:.0f} images/s, "
              f"{limit_cpu:.2f} CPU ms/image", flush=True)
        for workers in args.workers:
            rate = loader_rate(split, workers, args.batch_size)
            rows[-1][f"workers={workers}"] = rate
            print(f"  loader, {workers} workers: {rate['whole']:.0f} images/s whole pass "
                  f"({rate['whole'] / limit:.0%} of limit), {rate['steady']:.0f} after the "
                  f"first batch ({rate['steady'] / limit:.0%}); waited {rate['waited']:.1f}s; "
                  f"{rate['cpu_ms']:.2f} CPU ms/image ({limit_cpu / rate['cpu_ms']:.0%} of "
                  f"the limit's efficiency)", flush=True)
    return {"size": args.size, "images": len(split), "cores": os.cpu_count(), "rows": rows}


class PeakMemory:
    """The peak of this process' resident memory plus its children's, sampled."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self.done = 0, every, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        me = psutil.Process()
        while not self.done.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass  # A worker that ended between the listing and the reading.
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def memory(args) -> dict:
    split = folder_split(args.folder, args.size, args.images)
    decoded = len(split) * args.size * args.size * 3
    started = time.perf_counter()
    with PeakMemory() as peak:
        if args.old:
            images = np.asarray(split.images)
            del images
        else:
            loader_rate(split, args.workers[0], args.batch_size)
    seconds = time.perf_counter() - started
    way = "old (decoded into memory)" if args.old else f"stream, {args.workers[0]} workers"
    print(f"{way}: {len(split)} images at {args.size} px in {seconds:.0f}s, peak resident "
          f"memory {peak.peak / 2**30:.2f} GiB; decoded they take {decoded / 2**30:.2f} GiB")
    return {"way": way, "images": len(split), "peak_bytes": peak.peak, "decoded_bytes": decoded,
            "seconds": seconds}


def draft(args) -> dict:
    """Images/s of one core decoding and resizing the files (read into memory first) with
    Pillow's JPEG draft mode (what sources.read_image does) and without it."""
    from PIL import Image

    split = folder_split(args.folder, args.size, args.images or 400)
    payloads = [open(split.images.path(i), "rb").read() for i in range(len(split))]
    rates = {}
    for use_draft in (False, True, False, True):
        started = time.perf_counter()
        for payload in payloads:
            with Image.open(io.BytesIO(payload)) as image:
                if use_draft:
                    image.draft(image.mode, (args.size, args.size))
                image = image.convert("RGB")
                if image.size != (args.size, args.size):
                    image = image.resize((args.size, args.size), Image.Resampling.BILINEAR)
                np.asarray(image)
        rate = len(payloads) / (time.perf_counter() - started)
        rates[use_draft] = max(rate, rates.get(use_draft, 0.0))
    print(f"{args.size} px, one core, best of 2: {rates[False]:.0f} images/s without draft "
          f"mode, {rates[True]:.0f} with it")
    return {"size": args.size, "plain": rates[False], "draft": rates[True]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measure", choices=("throughput", "memory", "draft"))
    parser.add_argument("folder")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=None, help="default: all")
    parser.add_argument("--workers", type=int, nargs="+", default=[stream.default_workers()])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--old", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"throughput": throughput, "memory": memory, "draft": draft}[args.measure](args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
