"""`run`: what train.py does, as one library call. Starts the process-wide settings and the
distributed runtime, loads the named data set, and trains on it: one config alone, or a list
of them as one group (training/group.py)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.data import stream
from vit_flax.infra import runtime
from vit_flax.infra.workdir import ensure_directory
from vit_flax.training import group
from vit_flax.training.loop import train, train_group
from vit_flax.training.options import DataSpec, Processes, RunOptions, split_fields


def run(config: ViTConfig | Sequence[ViTConfig], data: DataSpec | None = None,
        workdir: str | os.PathLike = "workdir", options: RunOptions | None = None,
        processes: Processes | None = None, *, unroll_threefry: bool = True,
        compilation_cache: str | os.PathLike | None = runtime.DEFAULT, **fields) -> dict:
    """Load the data set `data` names, then `train` on it. Everything train.py does.

    `data`, `options` and `processes` (training/options.py) may also be given as their
    fields, as keywords: run(config, dataset="folder", data_dir="images", epochs...).
    With `processes.coordinator_address` (several processes or hosts), JAX's distributed
    runtime is started first and the devices of every process form one data-parallel mesh.
    With `unroll_threefry` (the default), JAX's CPU lowering of its random hash is replaced
    for this process by the unrolled one (runtime.unroll_threefry_on_cpu: the same random
    bits, faster steps). Compiled programs are cached in `compilation_cache` (default:
    runtime.default_compilation_cache(); None: no cache). A list of configs (differing only
    in seed, learning_rate and weight_decay; see group.sweep) trains as one group
    (train_group) and returns its summary. Options are checked before any data is read.
    """
    given = split_fields(fields, DataSpec, RunOptions, Processes)
    data, options, processes = (base or default for base, default in
                                zip((data, options, processes), given, strict=True))
    configs = [config] if isinstance(config, ViTConfig) else list(config)
    if not isinstance(config, ViTConfig):
        group.check_group(configs)
    check_workdir_outside_data(workdir, data)
    # Checks the three (one alone is an error) and starts nothing when none is given.
    runtime.start_distributed(processes.coordinator_address, processes.num_processes,
                              processes.process_id,
                              heartbeat_timeout=processes.heartbeat_timeout)
    _process_settings(unroll_threefry, compilation_cache)
    ensure_directory(workdir)  # Fail on an unusable workdir before the data is read.
    # Folders and TFDS data sets open lazily: their images are decoded when a feed reads
    # them (in memory when they fit, streamed when not: RunOptions.data_in).
    splits = stream.open_source(data.dataset, data.data_dir, configs[0].input_size)
    splits = dataclasses.replace(splits, train=splits.train.take(data.train_examples),
                                 test=splits.test and splits.test.take(data.test_examples))
    described = {"dataset": data.dataset, "data_dir": data.data_dir}
    with runtime.distributed_run():  # A no-op unless started as one of several processes.
        configs = [c.replace(num_classes=splits.num_classes) for c in configs]
        _check_processes_agree(configs, data, workdir, options)
        if isinstance(config, ViTConfig):
            return train(configs[0], splits, workdir, options, data=described)
        return train_group(configs, splits, workdir, options, data=described)


def _process_settings(unroll_threefry: bool, compilation_cache) -> None:
    if unroll_threefry:
        runtime.unroll_threefry_on_cpu()
    if compilation_cache is not None:
        runtime.use_compilation_cache(runtime.default_compilation_cache()
                                      if compilation_cache is runtime.DEFAULT
                                      else compilation_cache)


def _check_processes_agree(configs, data: DataSpec, workdir, options: RunOptions) -> None:
    """Several processes must be started alike (the same config, data and workdir), or
    they would train different things under one name."""
    runtime.check_started_alike({
        "configs": [json.loads(c.to_json()) for c in configs], "dataset": data.dataset,
        "data_dir": None if data.data_dir is None else str(data.data_dir),
        "train_examples": data.train_examples, "test_examples": data.test_examples,
        "workdir": str(Path(workdir).absolute()),
        "init_from": None if options.init_from is None else str(options.init_from)})


def check_workdir_outside_data(workdir, data: DataSpec) -> None:
    """A workdir inside the data folder would become part of the data: its figures read as
    images of a class on the next start, its directory as an empty class."""
    if data.data_dir is None or data.dataset != "folder":
        return
    inside, folder = Path(workdir).absolute().resolve(), Path(data.data_dir).absolute().resolve()
    if inside == folder or folder in inside.parents:
        raise ConfigError(f"workdir={workdir} is inside data_dir={data.data_dir}: its files "
                          f"would be read as training images; put the workdir outside the "
                          f"data folder")
