"""The one training loop: the seed's `run_experiment` (fit with a validation split, keep the
best weights by val_accuracy, evaluate them on the test split) for one run (`train`) or for
a group of runs trained together (`train_group`, see training/group.py).

A run is a list of members: one for a solo run, whose state and step are used as built;
several for a group, whose state carries a leading runs axis and whose step is vmapped over
it (training/setup.py). Everything else — feeds, progress, logging cadence, TensorBoard,
figures, best checkpoints, resume, SIGTERM, non-finite handling, fine-tuning — is this one
code for both. `train_epoch` is one epoch of it, for code that drives epochs itself
(parity's training comparison).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.data import sources as data_lib
from vit_flax.data import stream
from vit_flax.infra import parallel
from vit_flax.infra import workdir as layout
from vit_flax.infra.checkpoints import RunCheckpoints, RunProgress, restore_model, save_model
from vit_flax.infra.signals import Interrupted, StopSignals
from vit_flax.models import Model, augment, create_model
from vit_flax.training import feeds, group, reporting, steps
from vit_flax.training.options import RunOptions, with_fields
from vit_flax.training.setup import create_train_state
from vit_flax.weights import finetune

ATTENTION_IMAGES = 4  # Test images in attention.png (the best model's attention rollout).
DATA_FILE = layout.DATA_FILE  # What a run was trained on: data set, directory, class names.


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
class Member:
    """One run of the loop: its config, its directory and what the loop knows of it."""

    config: ViTConfig
    directory: Path
    name: str | None = None  # A group's run name; None for a solo run.
    progress: RunProgress = dataclasses.field(default_factory=RunProgress)
    stopped: str | None = None  # Why it stopped early (a non-finite loss); None: training.
    events: reporting.EventLog | None = None

    def say(self, line: str) -> str:
        return line if self.name is None else f"{self.name}: {line}"


@dataclasses.dataclass
class Fit:
    """Everything an epoch needs besides the train state: the members, the compiled steps,
    the normalization statistics and the feeds; a stop flag and the logging cadence."""

    members: list[Member]
    stacked: bool  # A group: the state has a runs axis and the steps are vmapped.
    mesh: object
    graphdef: nnx.GraphDef
    statistics: nnx.State
    train_step: Callable
    eval_step: Callable
    train_feed: object
    validation_feed: object | None
    compile_seconds: float
    memory_bytes: int | None = None
    data_on_device: bool | None = None  # The feed choice (None: automatic).
    stop: StopSignals | None = None
    log_every: int = 0
    checkpoint_every: int = 0  # Steps between mid-epoch checkpoints (0: none).
    mid_epoch: RunCheckpoints | None = None  # Where they go.

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.train_feed.size // self.config.batch_size)

    @property
    def config(self) -> ViTConfig:  # What the members share.
        return self.members[0].config

    def zero_totals(self) -> steps.Totals:
        return group.zero_totals(len(self.members)) if self.stacked else steps.Totals.zero()

    def run_means(self, totals: steps.Totals) -> list[dict[str, float]]:
        return group.run_means(totals) if self.stacked else [totals.means()]


def prepare_fit(members: list[Member], models: Sequence[Model], train_set: data_lib.Dataset,
                validation_set: data_lib.Dataset, mesh, data_on_device: bool | None = None,
                stacked: bool = False) -> tuple[Fit, steps.TrainState]:
    """The compiled steps, feeds and initial train state for training `models` on the mesh
    (a group's memory checked against the device before any step runs)."""
    config = members[0].config
    setup = create_train_state([m.config for m in members] if stacked else config, None,
                               steps_per_epoch=-(-len(train_set) // config.batch_size),
                               mesh=mesh, models=models)
    train_feed = feeds.make_feed(train_set, mesh, data_on_device)
    if isinstance(train_feed, feeds.StreamFeed):
        # A data set too large to hold streams whole: its validation and test parts too,
        # or they alone would take memory the stream saves.
        data_on_device = False
    validation_feed = feeds.make_feed(validation_set, mesh, data_on_device) \
        if len(validation_set) else None
    started = time.perf_counter()
    # A batch of padding only (-1): the step's shapes, and no image read to compile it.
    order = np.full((len(members), config.batch_size) if stacked else config.batch_size, -1,
                    np.int32)
    example = next(train_feed.batches(order, config.batch_size))
    train_step = setup.train_step.lower(setup.state, setup.statistics, setup.zero_totals(),
                                        *example).compile()
    memory = None
    if stacked:
        memory = group.step_memory_bytes(train_step)
        on_device = 0 if isinstance(train_feed, feeds.StreamFeed) else \
            train_set.images.nbytes + train_set.labels.nbytes
        group.check_fits(memory, len(members), on_device, mesh)
    fit = Fit(members, stacked, mesh, setup.graphdef, setup.statistics, train_step,
              setup.eval_step, train_feed, validation_feed, time.perf_counter() - started,
              memory, data_on_device)
    return fit, setup.state


def epoch_orders(fit: Fit, epoch: int) -> np.ndarray:
    """The epoch's example order: (n,) for one run, (runs, n) for a group, each run in its
    own seed's order and a stopped run all padding (-1)."""
    orders = np.stack([data_lib.epoch_order(fit.train_feed.size, m.config.seed, epoch)
                       for m in fit.members])
    orders[[m.stopped is not None for m in fit.members]] = -1
    return orders if fit.stacked else orders[0]


def train_epoch(fit: Fit, state: steps.TrainState, epoch: int, start: int = 0,
                totals: steps.Totals | None = None
                ) -> tuple[steps.TrainState, list[dict] | None]:
    """One epoch of training and validation: (state, a history row per member, each with
    its first_nonfinite_step), or (state, None) when a stop signal arrived during it (the
    partial epoch is abandoned). `start` and `totals`: a mid-epoch resume's steps done and
    running sums. Each row says how long the epoch waited for its data."""
    config = fit.config
    started = time.perf_counter()
    order = epoch_orders(fit, epoch)
    progress = reporting.Progress(epoch, config.epochs, fit.steps_per_epoch)
    totals = fit.zero_totals() if totals is None else totals
    batches = iter(fit.train_feed.batches(order, config.batch_size, start=start))
    pace = feeds.Pace(fit.train_feed.AHEAD)
    waited = 0.0
    with contextlib.closing(progress):
        for i in itertools.count(start):
            asked = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - asked
            if batch is None:
                break
            if fit.stop is not None and fit.stop.requested:
                return state, None
            previous = totals
            state, totals = fit.train_step(state, fit.statistics, totals, *batch)
            pace(totals)
            progress.update(i, previous)
            if fit.log_every and i and i % fit.log_every == 0:
                _log_step(fit, state, previous)
            if fit.checkpoint_every and (i + 1) % fit.checkpoint_every == 0 \
                    and i + 1 < fit.steps_per_epoch:
                save_mid_epoch(fit, state, epoch, i + 1, totals)
        rows = [{"epoch": epoch, **means} for means in fit.run_means(totals)]  # Waits.
    train_seconds = time.perf_counter() - started
    _validate(fit, state, rows)
    flags = np.atleast_1d(np.asarray(totals.first_nonfinite_step))
    for row, flag in zip(rows, flags, strict=True):
        row.update(epoch_seconds=time.perf_counter() - started,
                   images_per_second=fit.train_feed.size / train_seconds,
                   data_wait=waited / train_seconds, first_nonfinite_step=int(flag))
    return state, rows


def _validate(fit: Fit, state, rows: list[dict]) -> None:
    if fit.validation_feed is not None:
        validation = evaluate(fit.eval_step, state.params, fit.statistics, fit.validation_feed,
                              fit.config.batch_size, fit.zero_totals(), fit.run_means)
        for row, means in zip(rows, validation, strict=True):
            row.update({f"val_{name}": value for name, value in means.items()})


def save_mid_epoch(fit: Fit, state, epoch: int, step: int, totals: steps.Totals) -> None:
    """A checkpoint inside epoch `epoch`, after `step` of its steps: the state, and the
    epoch's running sums (a resume continues them, so the epoch's row is the one an
    uninterrupted run writes). Numbered by optimizer steps, the last one kept."""
    host = jax.device_get(totals)
    progress = dataclasses.replace(
        saved_progress(fit, epoch - 1), step=step,
        totals={"sums": {k: np.asarray(v).tolist() for k, v in host.sums.items()},
                "count": np.asarray(host.count).tolist(),
                "first_nonfinite_step": np.asarray(host.first_nonfinite_step).tolist()})
    fit.mid_epoch.save(state, progress, (epoch - 1) * fit.steps_per_epoch + step)


def _totals_of(saved: dict) -> steps.Totals:
    """The running sums a mid-epoch checkpoint holds, as the step made them (float32)."""
    return steps.Totals(sums={k: jnp.asarray(v, jnp.float32) for k, v in saved["sums"].items()},
                        count=jnp.asarray(saved["count"], jnp.float32),
                        first_nonfinite_step=jnp.asarray(saved["first_nonfinite_step"],
                                                         jnp.int32))


def _log_step(fit: Fit, state: steps.TrainState, previous: steps.Totals) -> None:
    """TensorBoard's per-step points: each member's running means up to the step before."""
    step = int(np.max(np.asarray(state.step))) - 1
    for member, means in zip(fit.members, fit.run_means(previous), strict=True):
        if member.events is not None and member.stopped is None:
            member.events.step(step, means)


def evaluate(eval_step, params, statistics, feed, batch_size: int,
             totals: steps.Totals | None = None, means=None):
    """Metrics of `params` over a feed's split: a dict for one run; with `means` (a Fit's
    run_means) and stacked `totals`, one dict per run."""
    totals = steps.Totals.zero() if totals is None else totals
    pace = feeds.Pace(feed.AHEAD)
    for batch in feed.batches(np.arange(feed.size), batch_size):
        totals = eval_step(params, statistics, totals, *batch)
        pace(totals)
    return totals.means() if means is None else means(totals)


def record_epoch(fit: Fit, state, run: int, row: dict, log) -> None:
    """A member's epoch: stopped if its loss went non-finite; else logged, and its model
    kept when best (a strict improvement, as ModelCheckpoint(save_best_only=True); without
    a validation set every epoch saves, so the last one is kept)."""
    member = fit.members[run]
    bad_step = row.pop("first_nonfinite_step")
    if bad_step >= 0:
        keeper = "the run" if member.name else member.directory  # A group's: in summary.json.
        # A streamed step none of whose images could be read has no loss (0/0): say so.
        unread = unreadable(fit.train_feed, len(fit.members) if fit.stacked else 1)
        why = (f"{unread} training images of the epoch could not be read, each named above; "
               f"a step with none of its images has no loss: are they still there? Else a "
               f"lower learning_rate?" if unread else "a lower learning_rate?")
        member.stopped = (f"the training loss became non-finite at step {bad_step} (epoch "
                          f"{row['epoch']}); {keeper} keeps epoch "
                          f"{member.progress.epoch}, the last finite one ({why})")
        if fit.stacked:
            log(member.say(f"{member.stopped}; the other runs go on"))
        return
    member.progress.history.append(row)
    member.events.epoch(row)
    log(member.say(reporting.epoch_line(row, fit.config.epochs)))
    score = row.get("val_accuracy", np.inf)
    if score > member.progress.best_accuracy or fit.validation_feed is None:
        member.progress.best_accuracy, member.progress.best_epoch = score, row["epoch"]
        params = group.unstack(state.params, run) if fit.stacked else state.params
        save_model(member.directory / layout.BEST_CHECKPOINT,
                   nnx.merge(fit.graphdef, params, fit.statistics))
    member.progress.epoch = row["epoch"]


def unreadable(feed, runs: int = 1) -> int:
    """How many images of its split a feed's last pass could not read (a StreamFeed's
    skipped), over every process (each reads its share; every process calls this). A
    group's runs each read every image of the epoch: `runs` times each."""
    local = np.asarray([getattr(feed, "skipped", 0)], np.int64)
    return int(parallel.sum_over_processes(local)[0]) // runs


def saved_progress(fit: Fit, done: int) -> RunProgress:
    """What RunCheckpoints saves beside the state: the run's progress, or a group's packed."""
    return group.pack(done, fit.members) if fit.stacked else fit.members[0].progress


def fit_epochs(fit: Fit, state, done: int, checkpoints: RunCheckpoints, workdir: Path,
               log, start: int = 0, totals: steps.Totals | None = None) -> None:
    """The epochs left, while any member trains: train, record, checkpoint, write the
    histories. A solo run whose loss goes non-finite stops the loop; a group's run stops
    alone and the others go on (the runs of a vmapped step never mix)."""
    for epoch in range(done + 1, fit.config.epochs + 1):
        if all(member.stopped for member in fit.members):
            break
        state, rows = train_epoch(fit, state, epoch, start, totals)
        start, totals = 0, None
        if rows is None:
            raise Interrupted(f"{fit.stop.requested}: stopped in epoch {epoch}; {workdir} holds "
                              f"epoch {done}: run the same command to resume")
        for run, row in enumerate(rows):
            if fit.members[run].stopped is None:
                record_epoch(fit, state, run, row, log)
        _stop_nonfinite(fit)
        if any(member.stopped for member in fit.members):
            state = group.discard_stopped(state, jnp.asarray(
                [member.stopped is not None for member in fit.members]))
        done = epoch
        checkpoints.save(state, saved_progress(fit, done))
        for member in fit.members:
            _write_json(member.directory / layout.HISTORY_FILE, member.progress.history)


def _stop_nonfinite(fit: Fit) -> None:
    """A solo run's non-finite loss ends it: its last checkpoint is the last finite epoch."""
    if not fit.stacked and fit.members[0].stopped:
        raise FloatingPointError(fit.members[0].stopped)


def resume(checkpoints: RunCheckpoints, state, fit: Fit, workdir: Path, log):
    """(state, epochs done, steps done in the next epoch, its running sums): the last
    checkpoint's (a mid-epoch one when it is newer than the last epoch's end), or the
    fresh state, 0, 0, None."""
    restored = checkpoints.restore_latest(state)
    progress = restored[1] if restored else RunProgress()
    state = restored[0] if restored else state
    middle = fit.mid_epoch.restore_latest(state) if fit.mid_epoch is not None else None
    if middle is not None and middle[1].epoch == progress.epoch and middle[1].step:
        state, progress = middle
    elif middle is not None:  # Older than the epoch resumed from: never to be used again,
        for number in fit.mid_epoch.manager.all_steps():  # and in the way of new numbers.
            fit.mid_epoch.manager.delete(number)
    if not progress.epoch and not progress.step:
        return state, 0, 0, None
    if progress.epoch > fit.config.epochs:
        raise ConfigError(f"workdir={workdir} holds {progress.epoch} trained epochs, more than "
                          f"epochs={fit.config.epochs}; give epochs >= {progress.epoch} to "
                          f"continue it, or use another workdir")
    if fit.stacked:
        group.unpack(progress, fit.members)
    else:
        fit.members[0].progress = dataclasses.replace(progress, step=0, totals=None)
    within = f", at step {progress.step} of epoch {progress.epoch + 1}" if progress.step else ""
    log(f"Resuming {workdir} after epoch {progress.epoch}{within}")
    totals = _totals_of(progress.totals) if progress.step else None
    return parallel.put_replicated(state, fit.mesh), progress.epoch, progress.step, totals


def train_and_validation(splits: data_lib.Splits, config: ViTConfig):
    """The source's own validation split where it has one (a TFDS data set), else Keras'
    validation_split: the last fraction of the training images."""
    if getattr(splits, "validation", None) is not None:
        return splits.train, splits.validation
    return data_lib.validation_split(splits.train, config.validation_split)


def warn_of_unseen_classes(train_set, validation_set, fraction: float, log) -> None:
    """Keras' validation_split takes the *last* fraction of the arrays, unshuffled: arrays
    stored class by class validate on classes training never sees (val_accuracy 0). The
    rule stays Keras'; one warning line says so, and the fix."""
    if not len(validation_set):
        return
    seen = set(np.unique(train_set.labels).tolist())
    held = set(np.unique(validation_set.labels).tolist())
    unseen = sorted(held - seen)
    if not unseen and (len(held) > 1 or len(seen) == 1):
        return
    what = (f"classes {', '.join(map(str, unseen[:5]))}{' ...' if len(unseen) > 5 else ''} "
            f"that the training part lacks" if unseen else f"a single class ({min(held)})")
    log(f"warning: the validation part (the last {fraction:g} of the training examples, "
        f"as Keras' validation_split takes it) holds {what}: are the examples stored class "
        f"by class? Shuffle them once before training (e.g. with np.random.permutation), "
        f"or give validation_split=0")


def _write_json(path: Path, value) -> None:
    if parallel.is_main_process():  # On several hosts only process 0 writes files.
        layout.write_json(path, value)


def train(config: ViTConfig, splits: data_lib.Splits, workdir: str | os.PathLike = "workdir",
          options: RunOptions | None = None, *, log: Callable[[str], None] = print,
          devices=None, data: dict | None = None, **fields) -> dict:
    """Fit, keep the best weights by val_accuracy, evaluate them on the test split.

    Data-parallel over `devices` (default: all of them). The data lives on the devices
    unless it would take more than a quarter of their memory (or options.data_in says
    otherwise), in which case batches stream from the host. Writes config.json, data.json,
    history.json (every epoch), the best checkpoint, results.json and the figures into
    `workdir`; returns the contents of results.json. `data` describes where `splits` came
    from ({"dataset": ..., "data_dir": ...}, as `run` passes it), for data.json.

    `options` (training/options.RunOptions; or its fields as keywords): every epoch's end
    is checkpointed (the last `keep_checkpoints` kept); calling train again on the same
    workdir resumes there and ends as the uninterrupted run would have. The workdir rules
    (vit_flax.infra.workdir): a run of another configuration is an error unless `overwrite`
    (which deletes only that run's own files); a non-empty directory that is not a run is
    an error unless `allow_non_empty`; a second process is refused by a lock. SIGTERM/SIGINT
    stop the run at the next step, keep the last epoch's checkpoint and raise
    signals.Interrupted. TensorBoard events go to workdir/tensorboard (every epoch, and
    every `log_every` steps when > 0). With `init_from` (a vit_flax workdir or a Keras Hub
    preset) training starts from its weights, the classifier new (vit_flax.weights.finetune);
    checked before the workdir is claimed.
    """
    options = with_fields(RunOptions, options, fields)
    workdir = layout.ensure_directory(workdir)
    return _train_members([Member(config, workdir)], splits, workdir, options, log, devices,
                          False, data)[0]


def train_group(configs: list[ViTConfig], splits: data_lib.Splits,
                workdir: str | os.PathLike = "workdir", options: RunOptions | None = None, *,
                log: Callable[[str], None] = print, devices=None, data: dict | None = None,
                **fields) -> dict:
    """Train `configs` (differing only in seed, learning_rate, weight_decay) together, each
    as `train` would alone, in one vmapped program; returns the contents of
    WORKDIR/summary.json. `options` are `train`'s, for the group's directory and for each
    run's; training/group.py describes the layout and the group's rules."""
    names = group.check_group(configs)
    options = with_fields(RunOptions, options, fields)
    workdir = layout.ensure_directory(workdir)
    members = [Member(config, workdir / layout.GROUP_RUNS / name, name)
               for name, config in zip(names, configs, strict=True)]
    all_results, fit = _train_members(members, splits, workdir, options, log, devices,
                                      True, data)
    summary = group.summarize(fit.members, all_results, fit.mesh.size, fit.compile_seconds,
                              fit.memory_bytes)
    _write_json(workdir / group.SUMMARY_FILE, summary)
    log(group.summary_table(summary))
    if all(member.stopped for member in fit.members):
        raise FloatingPointError("every run of the group stopped: " + "; ".join(
            f"{member.name}: {member.stopped}" for member in fit.members))
    return summary


def _train_members(members: list[Member], splits: data_lib.Splits, workdir: Path,
                   options: RunOptions, log, devices, stacked: bool, data: dict | None):
    """Checks, claim, train, finish: (results of a solo run, or (results list, fit))."""
    mesh = parallel.data_mesh(devices)
    parallel.check_batch_size(members[0].config, mesh)
    check_data(members[0].config, splits)
    main = parallel.is_main_process()
    log = log if main else (lambda _: None)
    if main and not stacked:
        # A trainer holding the lock may be half-way through its claim (no marker yet):
        # the directory is in use, not a stranger's, and the message must say so.
        layout.Lock(workdir).refuse_if_held()
        layout.check_claim(workdir, members[0].config, overwrite=options.overwrite,
                           allow_non_empty=options.allow_non_empty)
    statistics = normalization_statistics(splits.train.images)  # One pass for every member.
    models = {id(m): _initial_model(m.config, statistics, options.init_from, log)
              for m in members}
    with contextlib.ExitStack() as held:
        if main:  # A resumed group comes back in its saved order.
            members = _claim(workdir, members, held, options, stacked)
        fit, all_results = _train_in(members, [models[id(m)] for m in members], splits,
                                     workdir, options, log, mesh, stacked, data)
    return (all_results, fit) if stacked else all_results


def _claim(workdir: Path, members: list[Member], held: contextlib.ExitStack,
           options: RunOptions, stacked: bool) -> list[Member]:
    """Lock and claim the workdir by its rules (a group: its directory and each run's, so a
    solo `train` into one of them is refused while the group trains)."""
    held.enter_context(layout.Lock(workdir))
    if not stacked:
        layout.claim(workdir, members[0].config, overwrite=options.overwrite,
                     allow_non_empty=options.allow_non_empty)
        return members
    members = group.claim_group(workdir, members, options.overwrite, options.allow_non_empty)
    for member in members:
        layout.ensure_directory(member.directory)
        held.enter_context(layout.Lock(member.directory))
        layout.claim(member.directory, member.config, overwrite=options.overwrite)
    return members


def normalization_statistics(images) -> tuple:
    """What Normalization.adapt computes of the training images (as the seed: all of them,
    the validation part too): from arrays, or in one streamed pass over lazy images, each
    of several processes decoding its share of them (their exact sums are added)."""
    if not isinstance(images, stream.LazyImages) or isinstance(images, stream.ArrayImages):
        return (*augment.channel_statistics(np.asarray(images)), len(images))
    sums = parallel.sum_over_processes(stream.channel_sums(
        images, share=jax.process_index(), shares=jax.process_count()))
    return (*stream.statistics_of_sums(sums, images), len(images))


def _initial_model(config: ViTConfig, statistics: tuple, init_from, log) -> Model:
    model = create_model(config, statistics=statistics)
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


def _train_in(members: list[Member], models, splits, workdir: Path, options: RunOptions, log,
              mesh, stacked: bool, data: dict | None):
    config = members[0].config
    train_set, validation_set = train_and_validation(splits, config)
    if getattr(splits, "validation", None) is None:
        warn_of_unseen_classes(train_set, validation_set, config.validation_split, log)
    fit, state = prepare_fit(members, models, train_set, validation_set, mesh,
                             options.data_on_device, stacked)
    splits = _test_split_read_now(splits, fit)
    fit.log_every, fit.checkpoint_every = options.log_every, options.checkpoint_every
    log(_start_line(fit, len(train_set), len(validation_set)))
    described = describe_data(data, splits, len(train_set), options)
    with contextlib.ExitStack() as held:
        checkpoints = held.enter_context(contextlib.closing(RunCheckpoints(
            workdir / layout.RUN_STATE, options.keep_checkpoints, log)))
        fit.mid_epoch = _mid_epoch_checkpoints(workdir, options, log)
        if fit.mid_epoch is not None:
            held.enter_context(contextlib.closing(fit.mid_epoch))
        state, done, start, totals = resume(checkpoints, state, fit, workdir, log)
        if done or start:
            check_same_data(fit.members, described)
        # After resume's checks: a refused resume leaves the runs' files as they were.
        _write_run_files(fit, models, train_set, described)
        fit.stop = held.enter_context(StopSignals())
        for member in fit.members:
            member.events = held.enter_context(reporting.EventLog(member.directory,
                                                                  member.config))
        fit_epochs(fit, state, done, checkpoints, workdir, log, start, totals)
    all_results = _finish(fit, splits, log)
    for member, results in zip(fit.members, all_results, strict=True):
        results.update(compile_seconds=fit.compile_seconds, train_examples=len(train_set),
                       validation_examples=len(validation_set), **described)
        if stacked:
            results.update(group=str(workdir), stopped=member.stopped)
        _write_json(member.directory / layout.RESULTS_FILE, results)
    return fit, all_results


def _mid_epoch_checkpoints(workdir: Path, options: RunOptions, log) -> RunCheckpoints | None:
    """Where mid-epoch checkpoints go: opened when asked for, or when a run that asked for
    them left one (a resume continues from it whatever checkpoint_every says now)."""
    directory = workdir / layout.MID_EPOCH_STATE
    if not options.checkpoint_every and not directory.is_dir():
        return None
    return RunCheckpoints(directory, 1, log)


def _start_line(fit: Fit, train_examples: int, validation_examples: int) -> str:
    mesh = fit.mesh
    where = "on the devices" if isinstance(fit.train_feed, feeds.DeviceFeed) else "streamed"
    devices = f"{mesh.size} {mesh.devices.flat[0].platform.upper()} device(s)"
    if not fit.stacked:
        return (f"Training on {train_examples} images, validating on {validation_examples}, "
                f"{devices}, data {where}; train step compiled in {fit.compile_seconds:.1f}s")
    return (f"Training {len(fit.members)} runs together on {train_examples} images, validating "
            f"on {validation_examples}, {devices}, data {where}; group train step compiled in "
            f"{fit.compile_seconds:.1f}s, {fit.memory_bytes / 2**20:.1f} MiB per device")


def describe_data(data: dict | None, splits: data_lib.Splits, train_examples: int,
                  options: RunOptions) -> dict:
    """What makes a run's data what it is: data.json, and a resume's check."""
    data = data or {}
    return {"dataset": data.get("dataset"), "data_dir": _absolute(data.get("data_dir")),
            "class_names": list(splits.class_names), "examples": len(splits.train),
            "init_from": _absolute(options.init_from)}


def _absolute(path) -> str | None:
    """A directory as data.json records it: absolute, so that a resume from another working
    directory names the same folder (compared by _same)."""
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def check_same_data(members: list[Member], described: dict) -> None:
    """A resumed run must read what it was trained on: the same data set and directory,
    the same number of examples and classes, the same starting weights. Runs written before
    data.json existed are not checked."""
    for member in members:
        path = member.directory / DATA_FILE
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key, value in described.items():
            if key in saved and not _same(key, saved[key], value):
                shown = {k: (f"{len(v)} classes" if k == "class_names" else v)
                         for k, v in ((key, saved[key]), ("new", value))}
                raise ConfigError(
                    f"{member.directory} was trained with {key}={shown[key]!r}; this run has "
                    f"{key}={shown['new']!r}: resume it with the data and flags it started "
                    f"with, or train into another workdir")


def _same(key: str, saved, value) -> bool:
    """Whether a data.json entry is this run's: directories compared as the folders they
    name (a trailing slash, or relative against absolute, is the same folder)."""
    if key in ("data_dir", "init_from") and isinstance(saved, str) and isinstance(value, str):
        return os.path.realpath(_absolute(saved)) == os.path.realpath(_absolute(value))
    return saved == value


def _write_run_files(fit: Fit, models, train_set, described: dict) -> None:
    """Each member's config.json and data.json (what it trains on: the class names come
    back with the model), and patches.png."""
    for member, model in zip(fit.members, models, strict=True):
        _write_json(member.directory / layout.CONFIG_FILE, json.loads(member.config.to_json()))
        _write_json(member.directory / DATA_FILE, described)
        if parallel.is_main_process() and len(train_set):
            reporting.plot_patches(model, np.asarray(train_set.images[0]),
                                   member.directory / "patches.png")


def _test_split_read_now(splits: data_lib.Splits, fit: Fit) -> data_lib.Splits:
    """The in-memory path reads every file before training: its test split too, so that a
    bad test image is a DataError now, not after the last epoch. A streamed run's test
    split streams at the end (an unreadable image left out, as in training)."""
    if splits.test is None or isinstance(fit.train_feed, feeds.StreamFeed):
        return splits
    return dataclasses.replace(splits, test=stream.materialize(splits.test))


def _finish(fit: Fit, splits: data_lib.Splits, log) -> list[dict]:
    """Restore each member's best weights (as the seed's model.load_weights), evaluate them
    on the test split, plot; the results of each member."""
    bests = _best_models(fit, splits.test)
    tests, unread = _evaluate_best(fit, bests, splits.test)
    if unread:
        log(f"{unread} test images could not be read (each named above): the test metrics "
            f"leave them out")
    versions = reporting.versions()
    all_results = []
    for member, test, best in zip(fit.members, tests, bests, strict=True):
        results = {f"test_{name}": None if test is None else test[name]
                   for name in steps.METRIC_NAMES}
        if test is not None:
            log(member.say(f"Test accuracy: {round(test['accuracy'] * 100, 2)}%"))
            log(member.say(f"Test top 5 accuracy: {round(test['top-5-accuracy'] * 100, 2)}%"))
        elif splits.test is None:
            log(member.say("No test split (an image folder without test/): test metrics "
                           "are not computed."))
        elif not member.progress.best_epoch:
            log(member.say("No epoch was trained: there is no checkpoint to test."))
        results.update(best_epoch=member.progress.best_epoch, epochs=member.progress.epoch,
                       test_examples=0 if splits.test is None else len(splits.test),
                       test_unreadable=unread,
                       config=json.loads(member.config.to_json()), devices=fit.mesh.size,
                       versions=versions)
        if parallel.is_main_process():
            _plot_results(member, best, splits.test)
        all_results.append(results)
    return all_results


def _best_models(fit: Fit, test_set) -> list[Model | None]:
    """Each member's best model, restored once for its test metrics and its attention.png
    (every process restores: orbax's restore waits for all of them); None for a member
    without a checkpoint, and for all without a test split to evaluate and draw on."""
    if test_set is None or not len(test_set):
        return [None] * len(fit.members)
    return [restore_model(m.directory / layout.BEST_CHECKPOINT, m.config)
            if m.progress.best_epoch else None for m in fit.members]


def _plot_results(member: Member, best: Model | None, test_set) -> None:
    """loss.png, top-5-accuracy.png and the best model's attention.png."""
    reporting.plot_history(member.progress.history, member.directory)
    images = None if best is None else _readable_images(test_set.images, ATTENTION_IMAGES)
    if images is not None:
        reporting.plot_attention(best, images, member.directory / "attention.png")


def _readable_images(images, count: int) -> np.ndarray | None:
    """The first `count` images that can be read (None if none can): a streamed test
    split's unreadable files were named by its evaluation and left out, as here."""
    if not isinstance(images, stream.LazyImages):
        return np.asarray(images[:count])
    found = []
    for index in range(len(images)):
        with contextlib.suppress(data_lib.DataError):
            found.append(images.read(index))
        if len(found) == count:
            break
    return np.stack(found) if found else None


def _evaluate_best(fit: Fit, bests: list[Model | None],
                   test_set) -> tuple[list[dict | None], int]:
    """Each member's best model on the test split (a group's in one vmapped evaluation),
    None for a member without one; and how many test images could not be read (a
    streamed split's, left out)."""
    has = [best is not None for best in bests]
    if not any(has):
        return [None] * len(fit.members), 0
    params = [steps.split_model(best)[1] if best is not None else None for best in bests]
    stand_in = next(p for p in params if p is not None)  # Evaluated, then ignored.
    params = [stand_in if p is None else p for p in params]
    params = group.stack(params) if fit.stacked else params[0]
    params = parallel.put_replicated(params, fit.mesh)
    feed = feeds.make_feed(test_set, fit.mesh, fit.data_on_device)
    metrics = evaluate(fit.eval_step, params, fit.statistics, feed, fit.config.batch_size,
                       fit.zero_totals(), fit.run_means)
    return [m if ok else None for m, ok in zip(metrics, has, strict=True)], unreadable(feed)
