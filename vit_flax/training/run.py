"""`run`: what train.py does, as one library call. Starts the process-wide settings and the
distributed runtime, loads the named data set, and trains on it: one config alone, or a list
of them as one group (vit_flax.training.group)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.data import sources as data_lib
from vit_flax.infra import runtime
from vit_flax.infra.workdir import ensure_directory
from vit_flax.training import group
from vit_flax.training.loop import check_train_options, train


def run(config: ViTConfig | Sequence[ViTConfig], *, dataset: str = "cifar100",
        data_dir: str | None = None, workdir: str = "workdir", train_examples: int | None = None,
        test_examples: int | None = None, coordinator_address: str | None = None,
        num_processes: int | None = None, process_id: int | None = None,
        overwrite: bool = False, allow_non_empty: bool = False, keep_checkpoints: int = 2,
        log_every: int = 0, unroll_threefry: bool = True,
        compilation_cache: str | os.PathLike | None = runtime.DEFAULT,
        init_from: str | os.PathLike | None = None) -> dict:
    """Load the named data set, then `train` on it. Everything train.py does.

    With `coordinator_address` (several processes or hosts), JAX's distributed runtime is
    started first and the devices of every process form one data-parallel mesh. With
    `unroll_threefry` (the default), JAX's CPU lowering of its random hash is replaced for
    this process by the unrolled one (runtime.unroll_threefry_on_cpu: same bits, faster).
    Compiled programs are cached in `compilation_cache` (default:
    runtime.default_compilation_cache(); None: no cache). A list of configs (differing only
    in seed, learning_rate and weight_decay; see group.sweep) trains as one group
    (group.train_group) and returns its summary. `init_from` (a vit_flax workdir; one config
    only): fine-tune from its best model (vit_flax.weights.finetune).
    Options are checked before any data is read.
    """
    configs = _check_options(config, train_examples, test_examples, keep_checkpoints,
                             log_every, init_from)
    if coordinator_address is not None:
        runtime.start_distributed(coordinator_address, num_processes, process_id)
    if unroll_threefry:
        runtime.unroll_threefry_on_cpu()
    if compilation_cache is not None:
        runtime.use_compilation_cache(runtime.default_compilation_cache()
                                      if compilation_cache is runtime.DEFAULT
                                      else compilation_cache)
    ensure_directory(workdir)  # Fail on an unusable workdir before the data is read.
    splits = data_lib.load(dataset, data_dir, configs[0].input_size)
    splits = data_lib.Splits(splits.train.take(train_examples),
                             splits.test and splits.test.take(test_examples), splits.class_names)
    options = dict(overwrite=overwrite, allow_non_empty=allow_non_empty,
                   keep_checkpoints=keep_checkpoints)
    with runtime.distributed_run():  # A no-op unless started as one of several processes.
        configs = [c.replace(num_classes=splits.num_classes) for c in configs]
        if isinstance(config, ViTConfig):
            return train(configs[0], splits, workdir, log_every=log_every,
                         init_from=init_from, **options)
        return group.train_group(configs, splits, workdir, **options)


def _check_options(config, train_examples, test_examples, keep_checkpoints, log_every,
                   init_from) -> list[ViTConfig]:
    """run's options checked, before anything starts; its config(s) as a list."""
    configs = [config] if isinstance(config, ViTConfig) else list(config)
    if not isinstance(config, ViTConfig):
        group.check_group(configs)
        for name, value in (("log_every", log_every), ("init_from", init_from)):
            if value:
                raise ConfigError(f"{name}={value}: a group does not take it (epochs are "
                                  f"logged, runs start from their seeds' weights); train "
                                  f"the runs one by one")
    for name, value in (("train_examples", train_examples), ("test_examples", test_examples)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    check_train_options(keep_checkpoints=keep_checkpoints, log_every=log_every)
    return configs
