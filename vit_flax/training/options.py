"""The options of a run that travel together, apart from the model's config: where it writes
and how (RunOptions), which data it reads (DataSpec), how many processes share it (Processes).
`train`, `train_group` and `run` take these objects (or their fields as keywords)."""

from __future__ import annotations

import dataclasses
import os

from vit_flax.config import ConfigError
from vit_flax.infra.runtime import HEARTBEAT_TIMEOUT_SECONDS

DATA_IN = ("auto", "memory", "stream")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run uses its workdir and reports."""

    overwrite: bool = False  # Delete a vit_flax run of another config found in the workdir.
    allow_non_empty: bool = False  # Train into a non-empty directory that is not a run.
    keep_checkpoints: int = 2  # Epoch-end checkpoints kept for resuming.
    log_every: int = 0  # Also log the running training loss every N steps (0: epochs only).
    init_from: str | os.PathLike | None = None  # A workdir or preset to fine-tune from.
    data_in: str = "auto"  # auto: on the devices when the split fits; memory; stream.
    checkpoint_every: int = 0  # Also checkpoint every N steps inside an epoch (0: never).

    def __post_init__(self):
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        for name in ("log_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.data_in not in DATA_IN:
            raise ConfigError(f"data_in must be one of {', '.join(DATA_IN)}, got "
                              f"{self.data_in!r}")

    @property
    def data_on_device(self) -> bool | None:
        """The feed choice as training/feeds.make_feed takes it (None: automatic)."""
        return {"auto": None, "memory": True, "stream": False}[self.data_in]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Which data set a run reads, and how much of it."""

    dataset: str = "cifar100"  # cifar100, cifar10 or folder.
    data_dir: str | os.PathLike | None = None  # Its archive, TFDS copy or folder.
    train_examples: int | None = None  # Only the first N training examples.
    test_examples: int | None = None  # Only the first N test examples.

    def __post_init__(self):
        for name in ("train_examples", "test_examples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value}")


@dataclasses.dataclass(frozen=True)
class Processes:
    """Several processes (or hosts) training as one: JAX's distributed runtime."""

    coordinator_address: str | None = None  # HOST:PORT of process 0.
    num_processes: int | None = None
    process_id: int | None = None
    # Seconds without a peer's heartbeat before every process ends with one line: how long
    # a dead or hung peer goes unnoticed (runtime.start_distributed).
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT_SECONDS


def split_fields(fields: dict, *classes) -> list:
    """Keyword arguments -> one object of each class, from the fields that are its; an
    unknown name is a TypeError, as for any function."""
    objects = []
    remaining = dict(fields)
    for cls in classes:
        own = {f.name for f in dataclasses.fields(cls)}
        objects.append(cls(**{k: remaining.pop(k) for k in list(remaining) if k in own}))
    if remaining:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(remaining))}")
    return objects


def with_fields(cls, base, fields: dict):
    """`base` (a `cls` object, or None for the defaults) with `fields` replaced."""
    return cls(**fields) if base is None else dataclasses.replace(base, **fields)
