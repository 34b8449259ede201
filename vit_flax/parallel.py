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

def is_main_process() -> bool:
    """On several hosts every process trains; only the first writes files and logs."""
    return jax.process_index() == 0
