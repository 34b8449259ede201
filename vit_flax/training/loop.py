"""The seed's `run_experiment`: fit with a validation split, keep the best weights by
val_accuracy, evaluate them on the test split. `train` is the loop; `train_epoch` is one
epoch of it, for code that drives epochs itself (parity's training comparison)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax import nnx

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.data import sources as data_lib
from vit_flax.infra import parallel
from vit_flax.infra import workdir as layout
from vit_flax.infra.checkpoints import RunCheckpoints, RunProgress, restore_model, save_model
from vit_flax.infra.signals import Interrupted, StopSignals
from vit_flax.models import Model, create_model
from vit_flax.training import feeds, optim, reporting, steps
from vit_flax.weights import finetune

ATTENTION_IMAGES = 4  # Test images in attention.png (the best model's attention rollout).


def check_train_options(*, keep_checkpoints: int, log_every: int) -> None:
    if keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
    if log_every < 0:
        raise ConfigError(f"log_every must be >= 0, got {log_every}")


def check_data(config: ViTConfig, splits: data_lib.Splits) -> None:
    expected = config.input_shape
    for name, part in (("train", splits.train), ("test", splits.test)):
        if part is None:
            continue
        if part.images.shape[1:] != expected:
            raise data_lib.DataError(f"{name} images are {part.images.shape[1:]}, the config "
                                     f"expects {expected} (input_size, channels)")
        data_lib.check_labels(part, config.num_classes, name)
    if len(splits.train) == 0:
        raise data_lib.DataError("the training set is empty")


@dataclasses.dataclass
class Fit:
    """Everything an epoch needs besides the train state: the compiled steps, the
    normalization statistics and the feeds; optionally a stop flag and an event log."""

    config: ViTConfig
    graphdef: nnx.GraphDef
    train_step: Callable
    eval_step: Callable
    statistics: nnx.State
    train_feed: feeds.DeviceFeed | feeds.HostFeed
    validation_feed: feeds.DeviceFeed | feeds.HostFeed | None
    stop: StopSignals | None = None
    events: reporting.EventLog | None = None
    log_every: int = 0
    compile_seconds: float = 0.0


def prepare_fit(config: ViTConfig, model: Model, train_set: data_lib.Dataset,
                validation_set: data_lib.Dataset, mesh,
                data_on_device: bool | None = None) -> tuple[Fit, steps.TrainState]:
    """The compiled steps, feeds and initial train state for training `model` on the mesh."""
    graphdef, params, statistics = steps.split_model(model)
    tx = optim.for_config(config, steps_per_epoch=-(-len(train_set) // config.batch_size))
    state = steps.TrainState.create(params, tx, config)
    state, statistics = parallel.put_replicated((state, statistics), mesh)
    train_feed = feeds.make_feed(train_set, mesh, data_on_device)
    validation_feed = feeds.make_feed(validation_set, mesh, data_on_device) \
        if len(validation_set) else None
    started = time.perf_counter()
    example = next(train_feed.batches(np.zeros(config.batch_size, np.int32), config.batch_size))
    train_step = steps.make_train_step(graphdef, tx, mesh, config.microbatch_size).lower(
        state, statistics, steps.Totals.zero(), *example).compile()
    fit = Fit(config, graphdef, train_step, steps.make_eval_step(graphdef, mesh), statistics,
              train_feed, validation_feed, compile_seconds=time.perf_counter() - started)
    return fit, state


def train_epoch(fit: Fit, state: steps.TrainState,
                epoch: int) -> tuple[steps.TrainState, dict | None]:
    """One epoch of training and validation: (state, history row), or (state, None) when a
    stop signal arrived during it (the partial epoch is abandoned)."""
    config = fit.config
    started = time.perf_counter()
    order = data_lib.epoch_order(fit.train_feed.size, config.seed, epoch)
    progress = reporting.Progress(epoch, config.epochs, -(-len(order) // config.batch_size))
    totals = steps.Totals.zero()
    with contextlib.closing(progress):
        for i, batch in enumerate(fit.train_feed.batches(order, config.batch_size)):
            if fit.stop is not None and fit.stop.requested:
                return state, None
            previous = totals
            state, totals = fit.train_step(state, fit.statistics, totals, *batch)
            progress.update(i, previous)
            if fit.events and fit.log_every and i and i % fit.log_every == 0:
                fit.events.step(int(state.step) - 1, previous.means())  # Up to the step before.
        row = {"epoch": epoch, **totals.means()}  # Waits for the last step.
    train_seconds = time.perf_counter() - started
    if fit.validation_feed is not None:
        validation = evaluate(fit.eval_step, state.params, fit.statistics, fit.validation_feed,
                              config.batch_size)
        row.update({f"val_{name}": value for name, value in validation.items()})
    row["epoch_seconds"] = time.perf_counter() - started
    row["images_per_second"] = fit.train_feed.size / train_seconds
    row["first_nonfinite_step"] = int(totals.first_nonfinite_step)
    return state, row


def evaluate(eval_step, params, statistics, feed, batch_size: int) -> dict[str, float]:
    totals = steps.Totals.zero()
    for batch in feed.batches(np.arange(feed.size), batch_size):
        totals = eval_step(params, statistics, totals, *batch)
    return totals.means()


def train(config: ViTConfig, splits: data_lib.Splits, workdir: str | os.PathLike,
          log: Callable[[str], None] = print, devices=None,
          data_on_device: bool | None = None, overwrite: bool = False,
          allow_non_empty: bool = False, keep_checkpoints: int = 2, log_every: int = 0,
          init_from: str | os.PathLike | None = None) -> dict:
    """Fit, keep the best weights by val_accuracy, evaluate them on the test split.

    Data-parallel over `devices` (default: all of them). The data lives on the devices
    unless it would take more than a quarter of their memory (or data_on_device=False), in
    which case batches stream from the host. Writes config.json, history.json (every
    epoch), the best checkpoint, results.json and the figures into `workdir`; returns the
    contents of results.json.

    Every epoch's end is checkpointed (the last `keep_checkpoints` kept); calling train
    again on the same workdir resumes there and ends as the uninterrupted run would have.
    The workdir rules (vit_flax.infra.workdir): a run of another configuration is an error unless
    `overwrite` (which deletes only that run's own files); a non-empty directory that is not
    a run is an error unless `allow_non_empty`; a second process is refused by a lock.
    SIGTERM/SIGINT stop the run at the next step, keep the last epoch's checkpoint and raise
    signals.Interrupted. TensorBoard events go to workdir/tensorboard (every epoch, and every
    `log_every` steps when > 0). With `init_from` (a vit_flax workdir) training starts from
    its best model's weights, the classifier new (vit_flax.weights.finetune); checked before the
    workdir is claimed.
    """
    check_train_options(keep_checkpoints=keep_checkpoints, log_every=log_every)
    mesh = parallel.data_mesh(devices)
    parallel.check_batch_size(config, mesh)
    check_data(config, splits)
    workdir = layout.ensure_directory(workdir)
    main = parallel.is_main_process()
    if main:
        # A trainer holding the lock may be half-way through its claim (no marker yet):
        # the directory is in use, not a stranger's, and the message must say so.
        layout.Lock(workdir).refuse_if_held()
        layout.check_claim(workdir, config, overwrite=overwrite, allow_non_empty=allow_non_empty)
    model = _initial_model(config, splits, init_from, log if main else (lambda _: None))
    with layout.Lock(workdir) if main else contextlib.nullcontext():
        if main:
            layout.claim(workdir, config, overwrite=overwrite, allow_non_empty=allow_non_empty)
        return _train_in(config, model, splits, workdir, log if main else (lambda _: None),
                         mesh, data_on_device, keep_checkpoints, log_every, init_from)


def _initial_model(config: ViTConfig, splits: data_lib.Splits, init_from, log) -> Model:
    # As the seed: Normalization is adapted on all training images, the validation part too.
    model = create_model(config, splits.train.images)
    if init_from is not None:
        source = finetune.load_source(init_from)
        report = finetune.initialize_from(model, source)
        log(f"Starting from {init_from}: {len(report['taken'])} arrays taken, "
            f"{len(report['resampled'])} resampled, new: {', '.join(report['kept'])}")
        if finetune.lacks_converter(source):  # Silent otherwise, and a likely mistake.
            log(f"Note: {init_from} has no image converter (image_converter.json), so the "
                f"pixels go in unscaled (0-255), as its model computes; if its weights were "
                f"trained on scaled pixels, save the preset with its image converter")
    return model


def _train_in(config, model: Model, splits, workdir: Path, log, mesh, data_on_device,
              keep_checkpoints, log_every, init_from) -> dict:
    train_set, validation_set = data_lib.validation_split(splits.train, config.validation_split)
    fit, state = prepare_fit(config, model, train_set, validation_set, mesh, data_on_device)
    log(f"Training on {len(train_set)} images, validating on {len(validation_set)}, "
        f"{mesh.size} {mesh.devices.flat[0].platform.upper()} device(s), data "
        f"{'on the devices' if isinstance(fit.train_feed, feeds.DeviceFeed) else 'streamed'};"
        f" train step compiled in {fit.compile_seconds:.1f}s")
    with contextlib.closing(RunCheckpoints(workdir / layout.RUN_STATE, keep_checkpoints,
                                          log)) as checkpoints:
        state, progress = _resume(checkpoints, state, config, workdir, mesh, log)
        # After _resume's check: a refused resume leaves the run's config.json as it was.
        _write_json(workdir / layout.CONFIG_FILE, json.loads(config.to_json()))
        if parallel.is_main_process():
            reporting.plot_patches(model, train_set.images[0], workdir / "patches.png")
        with StopSignals() as stop, reporting.EventLog(workdir, config) as events:
            fit.stop, fit.events, fit.log_every = stop, events, log_every
            _fit_epochs(fit, state, progress, checkpoints, workdir, log)
    results = _finish(config, splits, workdir, progress, fit.eval_step, mesh, data_on_device,
                      log)
    results.update(compile_seconds=fit.compile_seconds, train_examples=len(train_set),
                   validation_examples=len(validation_set),
                   init_from=None if init_from is None else str(init_from))
    _write_json(workdir / layout.RESULTS_FILE, results)
    return results


def _resume(checkpoints: RunCheckpoints, state, config: ViTConfig, workdir: Path, mesh, log):
    """The state and progress to start from: the last checkpoint's, or the fresh ones."""
    restored = checkpoints.restore_latest(state)
    if restored is None:
        return state, RunProgress()
    state, progress = restored
    if progress.epoch > config.epochs:
        raise ConfigError(f"workdir={workdir} holds {progress.epoch} trained epochs, more than "
                          f"epochs={config.epochs}; give epochs >= {progress.epoch} to "
                          f"continue it, or use another workdir")
    log(f"Resuming {workdir} after epoch {progress.epoch}")
    return parallel.put_replicated(state, mesh), progress


def _fit_epochs(fit: Fit, state, progress: RunProgress, checkpoints: RunCheckpoints,
                workdir: Path, log) -> None:
    """The epochs left: train, log, keep the best model, checkpoint, write the history."""
    _write_json(workdir / layout.HISTORY_FILE, progress.history)
    for epoch in range(progress.epoch + 1, fit.config.epochs + 1):
        state, row = train_epoch(fit, state, epoch)
        if row is None:
            raise Interrupted(f"{fit.stop.requested}: stopped in epoch {epoch}; {workdir} holds "
                              f"epoch {progress.epoch}: run the same command to resume")
        bad_step = row.pop("first_nonfinite_step")
        if bad_step >= 0:
            raise FloatingPointError(
                f"the training loss became non-finite at step {bad_step} (epoch {epoch}); "
                f"{workdir} keeps epoch {progress.epoch}, the last finite one (a lower "
                f"learning_rate?)")
        progress.history.append(row)
        fit.events.epoch(row)
        log(reporting.epoch_line(row, fit.config.epochs))
        # ModelCheckpoint(save_best_only=True): only a strict improvement saves. Without
        # a validation set every epoch saves, so the last one is kept.
        score = row.get("val_accuracy", np.inf)
        if score > progress.best_accuracy or fit.validation_feed is None:
            progress.best_accuracy, progress.best_epoch = score, epoch
            save_model(workdir / layout.BEST_CHECKPOINT,
                       nnx.merge(fit.graphdef, state.params, fit.statistics))
        progress.epoch = epoch
        checkpoints.save(state, progress)
        _write_json(workdir / layout.HISTORY_FILE, progress.history)


def _finish(config, splits, workdir: Path, progress: RunProgress, eval_step, mesh,
            data_on_device, log) -> dict:
    """Restore the best weights (as the seed's model.load_weights), evaluate, plot."""
    results = {"test_loss": None, "test_accuracy": None, "test_top-5-accuracy": None}
    if parallel.is_main_process():
        reporting.plot_history(progress.history, workdir)
    if progress.best_epoch and splits.test is not None and len(splits.test):
        best = restore_model(workdir / layout.BEST_CHECKPOINT, config)
        _, params, statistics = steps.split_model(best)
        params, statistics = parallel.put_replicated((params, statistics), mesh)
        test = evaluate(eval_step, params, statistics,
                        feeds.make_feed(splits.test, mesh, data_on_device), config.batch_size)
        results.update({f"test_{name}": value for name, value in test.items()})
        log(f"Test accuracy: {round(test['accuracy'] * 100, 2)}%")
        log(f"Test top 5 accuracy: {round(test['top-5-accuracy'] * 100, 2)}%")
        if parallel.is_main_process():
            reporting.plot_attention(best, splits.test.images[:ATTENTION_IMAGES],
                                     workdir / "attention.png")
    elif splits.test is None:
        log("No test split (an image folder without test/): test metrics are not computed.")
    elif not progress.best_epoch:
        log("No epoch was trained: there is no checkpoint to test.")
    results.update(best_epoch=progress.best_epoch, epochs=progress.epoch,
                   test_examples=0 if splits.test is None else len(splits.test),
                   config=json.loads(config.to_json()), devices=mesh.size,
                   versions=reporting.versions())
    return results


def _write_json(path: Path, value) -> None:
    if parallel.is_main_process():
        layout.write_json(path, value)
