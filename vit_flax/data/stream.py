"""Data of any size: images decoded from disk as the steps need them (grain), each process
decoding only its share of every batch.

Sources are lazy image arrays (`LazyImages`): an image folder's files (listed and checked by
sources.list_folder, the rules of load_folder), or a prepared TFDS image-classification data
set read through tfds.data_source (no TensorFlow). They act as an (N, S, S, 3) uint8 array
whose pixels are decoded on access, so sources.Dataset, validation_split and take work on
them unchanged; np.asarray decodes a whole split (the in-memory way, `materialize`).

What training/feeds.StreamFeed streams through: for each global batch, `Layout` says which
examples this process' devices hold, and `local_batches` decodes just those (grain: worker
processes or threads, off the training thread, rows read ahead). `choose` picks memory or
streaming for a split. A file that cannot be read mid-stream comes back as its message,
for the feed to name once and mask.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os

import numpy as np
from PIL import Image

from vit_flax.data import sources
from vit_flax.data.sources import DataError, Dataset, Splits

DATA_IN = ("auto", "memory", "stream")
# Auto keeps a split in host memory when its decoded pixels take at most this fraction of it.
HOST_MEMORY_FRACTION = 0.25
TFDS_PREFIX = "tfds:"


# --- lazy image arrays -----------------------------------------------------------------------

class LazyImages:
    """(N, size, size, 3) uint8 images decoded on access. An integer index decodes one image
    (a DataError naming it when it cannot); a slice or an index array is another lazy array;
    np.asarray decodes all of them. Pickles small (no pixels), for grain's workers."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, size: int, keys: np.ndarray):
        self.size, self.keys = size, np.asarray(keys, np.int64)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.keys), self.size, self.size, 3)

    @property
    def nbytes(self) -> int:
        """What the decoded images would take."""
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.read(int(key))
        subset = object.__new__(type(self))
        subset.__dict__.update(self.__dict__, keys=self.keys[key])
        return subset

    def __array__(self, dtype=None, copy=None):
        images = self.read_all()
        return images if dtype is None else images.astype(dtype)

    def read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def read_all(self) -> np.ndarray:
        """Every image, decoded on a thread per core (the in-memory way)."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            images = list(pool.map(self.read, range(len(self))))
        return np.stack(images) if images else np.zeros(self.shape, np.uint8)


class FileImages(LazyImages):
    """Image files, read as load_folder reads them (sources.read_image)."""

    def __init__(self, paths, size: int, keys: np.ndarray | None = None):
        encoded = [os.fsencode(p) for p in paths]
        # One bytes blob and its offsets: a million paths pickle to each worker in one piece.
        self.blob = b"".join(encoded)
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        super().__init__(size, np.arange(len(encoded)) if keys is None else keys)

    def path(self, i: int) -> str:
        key = self.keys[i]
        return os.fsdecode(self.blob[self.offsets[key]:self.offsets[key + 1]])

    def read(self, i: int) -> np.ndarray:
        return sources.read_image(self.path(i), self.size)

    def read_all(self) -> np.ndarray:
        return sources.read_images([self.path(i) for i in range(len(self))], self.size)


class TfdsImages(LazyImages):
    """The images of one split of a prepared TFDS data set, opened in each process that reads
    it (the open source is not pickled); encoded images are decoded by Pillow, as files are."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str,
                 size: int, keys: np.ndarray):
        self.name, self.split, self.data_dir, self.image_key = name, split, data_dir, image_key
        self._source = None
        super().__init__(size, keys)

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def read(self, i: int) -> np.ndarray:
        if self._source is None:
            self._source = _tfds_source(self.name, self.split, self.data_dir, self.image_key)
        key = int(self.keys[i])
        value = self._source[key][self.image_key]
        where = f"{TFDS_PREFIX}{self.name} {self.split}[{key}]"
        if isinstance(value, bytes):
            return sources.decode_image(io.BytesIO(value), self.size, name=where)
        pixels = np.asarray(value)
        return sources.prepare_image(Image.fromarray(
            pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels), self.size)


class ArrayImages(LazyImages):
    """Images already in memory (the CIFAR arrays), for streaming them through the same feed."""

    def __init__(self, images: np.ndarray, keys: np.ndarray | None = None):
        self.images = images
        super().__init__(images.shape[1], np.arange(len(images)) if keys is None else keys)

    @property
    def shape(self):
        return (len(self.keys), *self.images.shape[1:])

    def read(self, i: int) -> np.ndarray:
        return self.images[self.keys[i]]

    def read_all(self) -> np.ndarray:
        return self.images[self.keys]


def as_lazy(images) -> LazyImages:
    return images if isinstance(images, LazyImages) else ArrayImages(np.asarray(images))


def materialize(dataset: Dataset | None) -> Dataset | None:
    """The split with its images decoded into host memory (no-op for arrays)."""
    if dataset is None or not isinstance(dataset.images, LazyImages):
        return dataset
    return Dataset(np.asarray(dataset.images), dataset.labels)


# --- sources ---------------------------------------------------------------------------------

def open_folder(data_dir: str | os.PathLike, input_size: int) -> Splits:
    """load_folder's splits (same files, labels, order, pixels), nothing decoded yet."""
    listing = sources.list_folder(data_dir)

    def lazy(part):
        return None if part is None else Dataset(FileImages(part[0], input_size), part[1])

    return Splits(lazy(listing.train), lazy(listing.test), listing.class_names)


def _tfds_source(name: str, split: str | None, data_dir: str | None, image_key: str):
    import tensorflow_datasets as tfds  # Slow to import and optional: only when used.

    # Encoded images come back as bytes: Pillow decodes them (draft mode, no TensorFlow).
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})


def open_tfds(name: str, data_dir: str | os.PathLike | None, input_size: int) -> Splits:
    """A prepared TFDS image-classification data set: its train split, its test split (or
    its validation split when it has no test), and its validation split beside a test."""
    import tensorflow_datasets as tfds

    directory = None if data_dir is None else str(data_dir)
    try:
        info = tfds.builder(name, data_dir=directory).info
    except Exception as error:  # noqa: BLE001 - TFDS raises many kinds for an unknown name.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{TFDS_PREFIX}{name}: {reason}; expected the name of a TFDS data set "
                        f"(tfds.list_builders())") from None
    available = set(info.splits.keys())
    if "train" not in available:
        raise DataError(
            f"{TFDS_PREFIX}{name} is not prepared in {directory or '~/tensorflow_datasets'} "
            f"(splits found: {sorted(available) or 'none'}, expected train); prepare it once "
            f"with `tfds build {name} --file_format=array_record"
            f"{f' --data_dir={directory}' if directory else ''}`")
    image_key, label_key = info.supervised_keys or ("image", "label")
    parts = {split: _tfds_split(name, split, directory, image_key, label_key, input_size)
             for split in ("train", "validation", "test") if split in available}
    test = parts.get("test", parts.get("validation"))
    validation = parts.get("validation") if "test" in parts else None
    names = tuple(info.features[label_key].names)
    return Splits(parts["train"], test, names, validation)


def _tfds_split(name, split, directory, image_key, label_key, input_size) -> Dataset:
    """A split's labels, read up front (a pass over its records, no image decoded)."""
    source = _tfds_source(name, split, directory, image_key)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        labels = list(pool.map(lambda i: int(source[i][label_key]), range(len(source))))
    keys = np.arange(len(source))
    return Dataset(TfdsImages(name, split, directory, image_key, input_size, keys),
                   np.array(labels, np.int32))


def open_source(dataset: str, data_dir: str | os.PathLike | None = None,
                input_size: int = 32) -> Splits:
    """sources.load's data sets with folders lazy, and "tfds:NAME" data sets (lazy too)."""
    if dataset.startswith(TFDS_PREFIX):
        return open_tfds(dataset[len(TFDS_PREFIX):], data_dir, input_size)
    if dataset == "folder" and data_dir is not None:
        return open_folder(data_dir, input_size)
    return sources.load(dataset, data_dir, input_size)


# --- in memory or streamed -------------------------------------------------------------------

def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose(dataset: Dataset, data_in: str = "auto", fraction: float | None = None) -> str:
    """"memory" or "stream" for a split: `data_in` when it forces one; on "auto", memory
    when the split is already arrays or its decoded pixels take at most `fraction` (default
    HOST_MEMORY_FRACTION) of this host's memory."""
    if data_in not in DATA_IN:
        raise DataError(f"data_in must be one of {', '.join(DATA_IN)}, got {data_in!r}")
    if data_in != "auto":
        return data_in
    if not isinstance(dataset.images, LazyImages) or isinstance(dataset.images, ArrayImages):
        return "memory"
    fraction = HOST_MEMORY_FRACTION if fraction is None else fraction
    return "memory" if dataset.images.nbytes <= fraction * host_memory_bytes() else "stream"


# --- each process' share of a batch ----------------------------------------------------------

def step_rows(order: np.ndarray, batch_size: int) -> np.ndarray:
    """(steps, runs, batch) example rows of an epoch's order: (n,) for one run, (runs, n)
    for a group (sources.batch_indices per run; -1 = padding)."""
    orders = np.atleast_2d(np.asarray(order))
    return np.stack([sources.batch_indices(o, batch_size) for o in orders], axis=1)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each example of a global batch lives: the batch axis is cut into one shard per
    device of the mesh's "data" axis (`owners`: each shard's process), and the batch's
    images are laid out shard by shard, each shard holding its columns of every run, so a
    device's images are exactly the examples its index columns point to."""

    runs: int
    batch_size: int
    owners: tuple[int, ...]

    @property
    def shard(self) -> int:
        return self.batch_size // len(self.owners)

    def positions(self) -> np.ndarray:
        """(runs, batch): the images row of each run's column."""
        shards, runs, shard = len(self.owners), self.runs, self.shard
        rows = (np.arange(shards)[None, :, None] * runs * shard
                + np.arange(runs)[:, None, None] * shard + np.arange(shard)[None, None, :])
        return rows.reshape(runs, self.batch_size).astype(np.int32)

    def local_shards(self, process: int) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.owners) == process)

    def local_rows(self, process: int) -> np.ndarray:
        """The images rows `process` holds, in order (its shards' rows, shard by shard)."""
        size = self.runs * self.shard
        return np.concatenate([np.arange(d * size, (d + 1) * size)
                               for d in self.local_shards(process)]).astype(np.int64)

    def local_keys(self, rows: np.ndarray, process: int) -> np.ndarray:
        """(steps, local examples): the examples `process` decodes for each step, in the
        order of local_rows. rows: (steps, runs, batch) from step_rows."""
        steps = len(rows)
        by_shard = rows.reshape(steps, self.runs, len(self.owners), self.shard)
        mine = by_shard[:, :, self.local_shards(process)]
        return mine.transpose(0, 2, 1, 3).reshape(steps, self.runs * mine.shape[2]
                                                  * self.shard)


def check_layout(batch_size: int, shards: int) -> None:
    if batch_size % shards:
        raise DataError(f"batch size {batch_size} must be divisible by the {shards} devices "
                        f"it is split over; e.g. {max(batch_size // shards, 1) * shards}")


# --- the grain pipeline ----------------------------------------------------------------------

class ReadRow:
    """Decodes one step's local examples (a grain map, run in its workers): their images,
    and for each one that could not be read, (position, the DataError's message)."""

    def __init__(self, images: LazyImages):
        self.images = images

    def __call__(self, keys: np.ndarray):
        out = np.zeros((len(keys), *self.images.shape[1:]), np.uint8)
        failed = []
        for position, key in enumerate(keys):
            if key < 0:
                continue  # Padding: zeros, masked out by its index -1.
            try:
                out[position] = self.images.read(int(key))
            except DataError as error:
                failed.append((position, str(error)))
        return out, tuple(failed)


def default_workers() -> int:
    """Worker processes of a streaming feed by default: none, the decoding runs on a reader
    thread per core in the training process (Pillow decodes with the GIL released). Measured
    on 2 cores (docs/data.md): threads reached 80-90% of the decode limit's efficiency,
    worker processes 20-85% (each starts by importing jax, every epoch, and sends its
    pixels through shared memory). Pass workers=N to use them."""
    return 0


def default_threads(workers: int) -> int:
    """Rows each worker decodes at once; without workers, a thread per core."""
    return 2 if workers else max(2, os.cpu_count() or 1)


def local_batches(images: LazyImages, keys: np.ndarray, workers: int = 0, threads: int = 2,
                  buffer: int = 2):
    """An iterator of ReadRow's (images, failed) for each row of `keys` (steps, local
    examples), in order. Decoding runs in `workers` grain worker processes (0: none), each
    reading `threads` rows at once and up to `buffer` rows ahead of the consumer."""
    import grain  # Optional and slow to import: only when streaming.

    dataset = grain.MapDataset.source(keys).map(ReadRow(images))
    ahead = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(buffer, threads))
    pipeline = dataset.to_iter_dataset(ahead)
    if workers:
        _absl_flags_parsed()
        pipeline = pipeline.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=buffer))
    return iter(pipeline)


def _absl_flags_parsed() -> None:
    """grain's workers read absl flags, which must be parsed; a program that does not use
    absl has parsed none: mark them parsed (their defaults) rather than fail."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def channel_sums(images, chunk: int = 256, workers: int | None = None, share: int = 0,
                 shares: int = 1) -> np.ndarray:
    """(2, 3) int64: each channel's sum and sum of squares over a (lazy) split's pixels,
    decoding it chunk by chunk (`workers` as StreamFeed's), in bounded memory. With
    `shares` > 1, only the images share, share + shares, ...: each of several processes
    decodes its part, and the parts' sums add up to the whole's exactly (integers)."""
    images = as_lazy(images)
    sums = np.zeros((2, 3), np.int64)
    mine = np.arange(len(images))[share::shares]
    if not len(mine):
        return sums
    keys = sources.batch_indices(mine, chunk)
    workers = default_workers() if workers is None else workers
    for pixels, failed in local_batches(images, keys, workers, default_threads(workers)):
        if failed:
            raise DataError(failed[0][1])
        # Padding rows are zeros: they add nothing. No int64 copy of the chunk (8 bytes a
        # pixel, 300 MB for 256 images at 224 px): squares fit uint16 (255^2 < 2^16), and
        # the sums accumulate in int64 as they go.
        flat = pixels.reshape(-1, 3)
        sums[0] += flat.sum(0, dtype=np.int64)
        sums[1] += np.square(flat, dtype=np.uint16).sum(0, dtype=np.int64)
    return sums


def statistics_of_sums(sums: np.ndarray, images) -> tuple[np.ndarray, np.ndarray]:
    """augment.channel_statistics' float32 mean and variance from channel_sums' integers
    (the same exact sums, so the same values as from the decoded array)."""
    count = len(images) * images.shape[1] * images.shape[2]
    mean = sums[0] / count
    return mean.astype(np.float32), (sums[1] / count - mean * mean).astype(np.float32)


def channel_statistics(images, chunk: int = 256,
                       workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """augment.channel_statistics of a (lazy) split, in one streamed pass (channel_sums)."""
    return statistics_of_sums(channel_sums(images, chunk, workers), images)
