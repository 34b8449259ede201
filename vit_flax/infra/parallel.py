"""Data parallelism with JAX's own sharding: one mesh axis, "data", over every device.

Parameters, optimizer state and the (small) data set are replicated; each batch is split
along the "data" axis, and XLA inserts the gradient all-reduce. The same code runs on one
device, on several local devices, and on several hosts after jax.distributed.initialize().
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_flax.config import ConfigError, ViTConfig

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Split the batch axis (after `leading_axes` unsplit ones) across the devices."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), DATA_AXIS))


def check_batch_size(config: ViTConfig, mesh: Mesh) -> None:
    """Every pass (the batch, or each micro-batch) must split evenly across the devices."""
    for field, size in (("batch_size", config.batch_size),
                        ("microbatch_size", config.pass_size)):
        if size % mesh.size:
            fitting = max(size // mesh.size, 1) * mesh.size
            raise ConfigError(f"{field} ({size}) must be divisible by the number of devices "
                              f"({mesh.size}); e.g. {field}={fitting}")


def put_global(tree, sharding: NamedSharding):
    """Host values (numpy, or arrays of this process) as global arrays with `sharding`.

    Every process passes the same values (each loads the same data and computes the same
    epoch order) and puts only the shards of the devices it owns: jax.device_put cannot
    place a host array on another process' devices. Arrays that are already global
    (restored from a checkpoint, say) are resharded on the devices; every process must call
    this with the same tree.
    """
    return jax.tree.map(lambda leaf: _put(leaf, sharding), tree)


def _put(leaf, sharding: NamedSharding) -> jax.Array:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # Typed keys: their raw data.
        return jax.random.wrap_key_data(_put(jax.random.key_data(leaf), sharding),
                                        impl=jax.random.key_impl(leaf))
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return jax.device_put(leaf, sharding)
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_replicated(tree, mesh: Mesh):
    """`tree` on every device of the mesh (of every process)."""
    return put_global(tree, replicated(mesh))


def put_batch_sharded(tree, mesh: Mesh):
    """Each leaf's first axis split across the mesh's devices (of every process)."""
    return put_global(tree, batch_sharded(mesh))


def is_main_process() -> bool:
    """On several hosts every process trains; only the first writes files and logs."""
    return jax.process_index() == 0


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """An int64 array summed over every process, exactly (itself with one process). Sent as
    bytes: JAX without x64 would cut int64 to int32."""
    if jax.process_count() == 1:
        return counts
    from jax.experimental import multihost_utils

    parts = multihost_utils.process_allgather(np.ascontiguousarray(counts, np.int64)
                                              .view(np.uint8))
    return np.asarray(parts, np.uint8).view(np.int64).reshape(-1, *counts.shape).sum(0)
