"""Input feeds: how a split's batches reach the jitted steps.

The one host -> device boundary of training. A split that fits lives on the devices
(`DeviceFeed`: put there once, each step gathers its batch by index in jit); one too
large for them but in host memory goes from there (`HostFeed`: the host gathers each batch
and sends it a few steps ahead); one too large for host memory streams from its source
(`StreamFeed`: each process decodes its devices' share of each batch, data.stream). Every
feed yields `steps.Batch` tuples the same step consumes, `start` batches into the epoch.
"""

from __future__ import annotations

import collections
import time
import warnings

import jax
import numpy as np
from jax.experimental import multihost_utils

from vit_flax.data import sources as data_lib
from vit_flax.data import stream
from vit_flax.infra import parallel
from vit_flax.training.steps import Batch

# A split of at most this many bytes goes to the devices padded to stored_rows(its length)
# rows; a larger one exactly as it is (padding copies the split on the host first).
PAD_BYTES = 256 * 2**20


def stored_rows(count: int) -> int:
    """The rows a split of `count` examples takes on the devices: `count` rounded up to a
    multiple of max(256, 2**(bits of count - 4)), which adds at most 1/8 (CIFAR's 45,000:
    45,056). The steps get the whole split, so its row count is part of their programs:
    rounded, splits of nearby sizes share them (a validation and a test split, a run with
    another --train-examples, the test suite's many small runs), compiled or cached once.
    The steps index real rows only; the rest are zeros."""
    unit = max(256, 2 ** max(count.bit_length() - 4, 0))
    return -(-count // unit) * unit


def to_device(dataset: data_lib.Dataset, mesh) -> tuple[jax.Array, jax.Array]:
    """A whole split goes to every device once, as uint8 (padded: stored_rows)."""
    images, labels = np.asarray(dataset.images), np.asarray(dataset.labels)
    rows = stored_rows(len(images))
    if rows > len(images) and images.nbytes + labels.nbytes <= PAD_BYTES:
        images = np.concatenate([images, np.zeros((rows - len(images), *images.shape[1:]),
                                                  images.dtype)])
        labels = np.concatenate([labels, np.zeros(rows - len(labels), labels.dtype)])
    return parallel.put_replicated((images, labels), mesh)


def index_rows(order: np.ndarray, batch_size: int) -> np.ndarray:
    """An epoch's batch index rows: (steps, batch) for one run's order (n,), (steps, runs,
    batch) for a group's orders (runs, n); -1 pads the last partial batch."""
    if order.ndim == 1:
        return np.asarray(list(data_lib.batch_indices(order, batch_size)))
    return np.stack([index_rows(run_order, batch_size) for run_order in order], axis=1)


def check_start(order: np.ndarray, batch_size: int, start: int) -> int:
    """`start` (batches to skip: a mid-epoch resume) when the epoch has that many."""
    steps = max(1, -(-np.shape(order)[-1] // batch_size))
    if not 0 <= start <= steps:
        raise data_lib.DataError(f"start={start} is outside the epoch's {steps} steps")
    return start


def batch_rows(order: np.ndarray, batch_size: int, mesh) -> list[jax.Array]:
    """An epoch's batch index rows, put on the devices in one go before the epoch starts
    (each row split across them; a group's rows along their batch axis), so the steps
    themselves copy nothing from the host."""
    rows = index_rows(order, batch_size)
    return parallel.put_global(list(rows), parallel.batch_sharded(mesh, rows.ndim - 2))


def fits_on_device(dataset: data_lib.Dataset, mesh, fraction: float = 0.25) -> bool:
    """Whether a split may live on each device: at most `fraction` of its memory (the rest
    is for weights, optimizer state and activations). CPUs report no limit: it fits. Read
    from this process' devices (another's cannot be asked); every process must choose the
    same feed, so on several hosts it fits only where it fits on all of them."""
    stats = mesh.local_devices[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    fits = limit is None or dataset.images.nbytes + dataset.labels.nbytes <= fraction * limit
    if jax.process_count() == 1:
        return fits
    return bool(multihost_utils.process_allgather(np.asarray(fits)).all())


class Pace:
    """Keeps the host at most `ahead` steps in front of the devices: called with each step's
    output, it waits for the output of the step `ahead` before. JAX dispatches steps
    asynchronously and without limit; a step holds its batch until it runs, so a loop whose
    batches are made on the host (HostFeed, StreamFeed) and come faster than the steps run
    would pile up batches in host memory (measured: 1.6 GB of queued 224-px batches, most of
    a 12,800-image epoch, before this)."""

    def __init__(self, ahead: int | None):
        self.ahead, self.pending = ahead, collections.deque()

    def __call__(self, output) -> None:
        if self.ahead is None:  # Batches already on the devices: nothing piles up.
            return
        self.pending.append(output)
        if len(self.pending) > self.ahead:
            jax.block_until_ready(self.pending.popleft())


class DeviceFeed:
    """The split lives on the devices; a step gets the whole arrays and its index row, and
    gathers its batch in jit. No per-step host work."""

    AHEAD = None  # Pace: its steps hold index rows only, the host may run ahead freely.

    def __init__(self, dataset: data_lib.Dataset, mesh):
        self.arrays, self.mesh, self.size = to_device(dataset, mesh), mesh, len(dataset)

    def batches(self, order: np.ndarray, batch_size: int, start: int = 0):
        for row in batch_rows(order, batch_size, self.mesh)[check_start(order, batch_size,
                                                                        start):]:
            yield Batch(*self.arrays, row)


class HostFeed:
    """For a split too large for the devices: the host gathers each batch, and sends it
    `PREFETCH` steps ahead of the step that uses it (the step indexes it with 0..B-1)."""

    PREFETCH = 2
    AHEAD = 2  # Pace: steps dispatched and not yet run, each holding its batch.

    def __init__(self, dataset: data_lib.Dataset, mesh):
        self.dataset, self.mesh, self.size = dataset, mesh, len(dataset)

    def _put(self, row: np.ndarray) -> Batch:
        """One step's examples gathered on the host (a group's runs one after the other)
        and the index row(s) into them."""
        flat = row.reshape(-1)
        safe = np.maximum(flat, 0)
        local = np.where(flat >= 0, np.arange(len(flat)), -1).astype(np.int32)
        images, labels = parallel.put_batch_sharded((self.dataset.images[safe],
                                                     self.dataset.labels[safe]), self.mesh)
        index = parallel.put_global(local.reshape(row.shape),
                                    parallel.batch_sharded(self.mesh, row.ndim - 1))
        return Batch(images, labels, index)

    def batches(self, order: np.ndarray, batch_size: int, start: int = 0):
        queue = collections.deque()
        for row in index_rows(order, batch_size)[check_start(order, batch_size, start):]:
            queue.append(self._put(row))
            if len(queue) > self.PREFETCH:
                yield queue.popleft()
        yield from queue


# --- the feed --------------------------------------------------------------------------------

class BadImageWarning(UserWarning):
    """An image that could not be read mid-stream; its example was left out of the step."""


class StreamFeed:
    """A split streamed from its source (data.stream): for each global batch, this process
    decodes the examples of its own devices (grain workers or threads, rows read ahead), the
    batch is assembled from every process' part, and `PREFETCH` assembled batches wait on
    the devices ahead of the step.

    Yields steps.Batch(images, labels, index): images (runs * batch, S, S, 3) and labels
    laid out by stream.Layout (each device holds the examples of its own index columns),
    index (batch,) or (runs, batch) into them, -1 for padding and for an example whose file
    could not be read: named once in a BadImageWarning, left out of its step, tried again
    in later epochs. `wait_seconds`: how long the last `batches` waited for the decoders;
    `skipped`: how many unreadable examples it left out.
    """

    PREFETCH = 2
    AHEAD = 2  # Pace: steps dispatched and not yet run, each holding its batch.

    def __init__(self, dataset: data_lib.Dataset, mesh, workers: int | None = None,
                 threads: int | None = None):
        self.images, self.labels = stream.as_lazy(dataset.images), np.asarray(dataset.labels)
        self.mesh, self.size = mesh, len(dataset)
        self.workers = stream.default_workers() if workers is None else workers
        self.threads = threads or stream.default_threads(self.workers)
        self.reported: set[str] = set()
        self.wait_seconds, self.skipped = 0.0, 0

    def layout(self, runs: int, batch_size: int) -> stream.Layout:
        owners = tuple(device.process_index for device in self.mesh.devices.flat)
        stream.check_layout(batch_size, len(owners))
        return stream.Layout(runs, batch_size, owners)

    def batches(self, order: np.ndarray, batch_size: int, start: int = 0):
        rows = stream.step_rows(order, batch_size)[check_start(order, batch_size, start):]
        layout = self.layout(rows.shape[1], batch_size)
        local_rows = layout.local_rows(jax.process_index())
        loader = stream.local_batches(self.images, layout.local_keys(rows, jax.process_index()),
                                      self.workers, self.threads)
        self.wait_seconds, self.skipped = 0.0, 0
        placed = collections.deque()
        for row in rows:
            waited = time.perf_counter()
            pixels, failed = next(loader)
            self.wait_seconds += time.perf_counter() - waited
            index = self._index(row, layout, [local_rows[at] for at, _ in failed])
            for _, message in failed:
                self._report(message)
            placed.append(self._place(pixels, self._labels(row, layout), index, local_rows,
                                      squeeze=np.ndim(order) == 1))
            if len(placed) > self.PREFETCH:
                yield placed.popleft()
        yield from placed

    @staticmethod
    def _index(row: np.ndarray, layout: stream.Layout, unread: list[int]) -> np.ndarray:
        """(runs, batch): each example's images row; -1 for pads and unread images rows."""
        positions = layout.positions()
        return np.where((row >= 0) & ~np.isin(positions, unread), positions, -1).astype(np.int32)

    def _labels(self, row: np.ndarray, layout: stream.Layout) -> np.ndarray:
        labels = np.zeros(layout.runs * layout.batch_size, np.int32)
        labels[layout.positions()] = np.where(row >= 0, self.labels[np.maximum(row, 0)], 0)
        return labels

    def _place(self, pixels, labels, index, local_rows, squeeze: bool) -> Batch:
        """The global Batch of one step: each process gives its devices' images rows."""
        local = np.full(len(labels), -1, np.int64)
        local[local_rows] = np.arange(len(local_rows))
        sharding = parallel.batch_sharded(self.mesh)
        images = jax.make_array_from_callback((len(labels), *pixels.shape[1:]), sharding,
                                              lambda at: _rows(pixels, local[at[0]]))
        index = index[0] if squeeze else index
        return Batch(images, parallel.put_global(labels, sharding),
                     parallel.put_global(index, parallel.batch_sharded(self.mesh,
                                                                       index.ndim - 1)))

    def _report(self, message: str) -> None:
        self.skipped += 1
        if message not in self.reported:
            self.reported.add(message)
            warnings.warn(f"{message}; its example is left out of the step (as padding) and "
                          f"the epoch goes on", BadImageWarning, stacklevel=4)


def _rows(pixels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """pixels[rows]; a view (no copy of the batch) when the rows are consecutive, as a
    device's rows of this process' part are."""
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return pixels[rows[0]:rows[0] + len(rows)]
    return pixels[rows]


def make_feed(dataset: data_lib.Dataset, mesh, on_device: bool | None = None,
              workers: int | None = None):
    """The feed of a split (arrays, or data.stream's lazy images).

    on_device=True (--data-in memory): decoded into host memory, then on the devices.
    on_device=False (--data-in stream): a lazy split streams (StreamFeed); arrays go from
    host memory (HostFeed). None (auto): a lazy split streams when its decoded pixels would
    take more than stream.HOST_MEMORY_FRACTION of a host's memory (any process' host: all
    choose alike), else it is decoded; arrays then live on the devices when they fit there
    (DeviceFeed), else HostFeed. `workers`: StreamFeed's grain worker processes.
    """
    lazy = isinstance(dataset.images, stream.LazyImages) and \
        not isinstance(dataset.images, stream.ArrayImages)
    if lazy and on_device is None:
        streams = stream.choose(dataset) == "stream"
        if jax.process_count() > 1:
            streams = bool(multihost_utils.process_allgather(np.asarray(streams)).any())
        if streams:
            return StreamFeed(dataset, mesh, workers)
    elif lazy and on_device is False:
        return StreamFeed(dataset, mesh, workers)
    dataset = stream.materialize(dataset)
    if on_device is None:
        on_device = fits_on_device(dataset, mesh)
    return DeviceFeed(dataset, mesh) if on_device else HostFeed(dataset, mesh)
