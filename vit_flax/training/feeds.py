"""Input feeds: how a split's batches reach the jitted steps.

The one host -> device boundary of training. A split that fits lives on the devices
(`DeviceFeed`: put there once, each step gathers its batch by index in jit); a split too
large for them streams from the host (`HostFeed`: the host gathers each batch and sends it
a few steps ahead). Either way a feed yields `steps.Batch` tuples the same step consumes.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
from jax.experimental import multihost_utils

from vit_flax.data import sources as data_lib
from vit_flax.infra import parallel
from vit_flax.training.steps import Batch


def to_device(dataset: data_lib.Dataset, mesh) -> tuple[jax.Array, jax.Array]:
    """A whole split goes to every device once, as uint8."""
    return parallel.put_replicated((dataset.images, dataset.labels), mesh)


def batch_rows(order: np.ndarray, batch_size: int, mesh) -> list[jax.Array]:
    """An epoch's batch index rows, put on the devices in one go before the epoch starts
    (each row split across them), so the steps themselves copy nothing from the host."""
    rows = list(data_lib.batch_indices(order, batch_size))
    return parallel.put_batch_sharded(rows, mesh)


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


class DeviceFeed:
    """The split lives on the devices; a step gets the whole arrays and its index row, and
    gathers its batch in jit. No per-step host work."""

    def __init__(self, dataset: data_lib.Dataset, mesh):
        self.arrays, self.mesh, self.size = to_device(dataset, mesh), mesh, len(dataset)

    def batches(self, order: np.ndarray, batch_size: int):
        for row in batch_rows(order, batch_size, self.mesh):
            yield Batch(*self.arrays, row)


class HostFeed:
    """For a split too large for the devices: the host gathers each batch, and sends it
    `PREFETCH` steps ahead of the step that uses it (the step indexes it with 0..B-1)."""

    PREFETCH = 2

    def __init__(self, dataset: data_lib.Dataset, mesh):
        self.dataset, self.mesh, self.size = dataset, mesh, len(dataset)

    def _put(self, row: np.ndarray) -> Batch:
        safe = np.maximum(row, 0)
        local = np.where(row >= 0, np.arange(len(row)), -1).astype(np.int32)
        batch = (self.dataset.images[safe], self.dataset.labels[safe], local)
        return Batch(*parallel.put_batch_sharded(batch, self.mesh))

    def batches(self, order: np.ndarray, batch_size: int):
        queue = collections.deque()
        for row in data_lib.batch_indices(order, batch_size):
            queue.append(self._put(row))
            if len(queue) > self.PREFETCH:
                yield queue.popleft()
        yield from queue


def make_feed(dataset: data_lib.Dataset, mesh, on_device: bool | None = None):
    """DeviceFeed when the split fits on the devices (or on_device=True), else HostFeed."""
    if on_device is None:
        on_device = fits_on_device(dataset, mesh)
    return DeviceFeed(dataset, mesh) if on_device else HostFeed(dataset, mesh)
