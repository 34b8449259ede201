"""Many runs in one program: configurations that differ only in seed, learning_rate and
weight_decay, trained together by one jitted step, `jax.vmap`ped over the runs.

Each run of a group is the run `vit_flax.train` makes of its config alone: its own initial
weights (`create_model`), its own data order (`epoch_order` of its seed), its own
augmentation and dropout keys (`step_rngs` of its key and step), Keras' AdamW of
`vit_flax.training.optim` with its own learning rate and weight decay (held in its optimizer
state by `optax.inject_hyperparams`), its own validation, best checkpoint and test metrics. What the
runs share is the program: the data is on the devices once, each step takes a (runs, batch)
block of index rows and each run gathers its own batch, and one compile serves them all. A
run's history equals its solo run's: measured bit for bit on the CPU, on 1 and 2 devices
(benchmarks/group_benchmark.py --agreement); tests/test_group.py allows float32 round-off,
as another backend may fuse the vmapped program differently. Data parallelism is the solo
run's: each run's batch is split over the mesh's "data" axis; the runs axis is not split.

WORKDIR holds:
    .vit_flax-group.json   the group's marker: its runs' names and configurations
    runs/<name>/           one ordinary run directory per run (name: seed0_lr0.001_wd0.0001)
                           with config.json, history.json, results.json, best_checkpoint/,
                           the figures; `vit_flax.load` reads it
    run_state/             the stacked train state of all runs, one orbax step per epoch
    summary.json           per run, and per (learning_rate, weight_decay) over the seeds

Resume and stop, as a single run: every epoch's end is checkpointed (all runs at once), and
running the same group again resumes there bit for bit; SIGTERM/SIGINT stop at the next step
and raise signals.Interrupted. Non-finite loss: a run whose training loss becomes
non-finite stops alone, and the others go on (the runs of a vmapped step never mix). It
keeps its last finite epoch: history, best checkpoint, and test metrics from that; its
results.json and summary.json say where it stopped. Its slice of the stacked state is
zeroed at each epoch's end (checkpoints must be finite) and its index rows are all padding;
the program keeps its shape, so the run still costs its share of each step. When every run
has stopped, the group stops with a FloatingPointError naming each.

Memory: before the first step, the compiled step's memory_analysis() is compared with the
device's memory limit (when it reports one): a group that does not fit is a one-line
ConfigError that says how many runs would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import operator
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.data import sources as data_lib
from vit_flax.infra import parallel
from vit_flax.infra import workdir as layout
from vit_flax.infra.checkpoints import RunCheckpoints, RunProgress, restore_model, save_model
from vit_flax.infra.signals import Interrupted, StopSignals
from vit_flax.models import create_model
from vit_flax.training import feeds, optim, reporting, steps
from vit_flax.training.loop import check_data, check_train_options
from vit_flax.training.optim import keras_adamw

VARIED_FIELDS = ("seed", "learning_rate", "weight_decay")
GROUP_MARKER = ".vit_flax-group.json"  # This directory is a group; holds its runs' configs.
RUNS = "runs"
SUMMARY_FILE = "summary.json"
GROUP_ENTRIES = (GROUP_MARKER, layout.LOCK, RUNS, layout.RUN_STATE, SUMMARY_FILE)
TEST_METRICS = ("test_accuracy", "test_top-5-accuracy")


def run_name(config: ViTConfig) -> str:
    """seed0_lr0.001_wd0.0001: repr of the floats, so distinct values never share a name."""
    return (f"seed{config.seed}_lr{float(config.learning_rate)!r}"
            f"_wd{float(config.weight_decay)!r}")


def sweep(config: ViTConfig, *, seeds=None, learning_rates=None,
          weight_decays=None) -> list[ViTConfig]:
    """`config` once for each combination of the given seeds, learning rates and weight
    decays (each None: the config's own value): the runs of a group, in the order
    learning rate, then weight decay, then seed (the seeds of a setting side by side)."""
    return [config.replace(seed=seed, learning_rate=rate, weight_decay=decay)
            for rate in learning_rates or (config.learning_rate,)
            for decay in weight_decays or (config.weight_decay,)
            for seed in seeds or (config.seed,)]


def check_group(configs: list[ViTConfig]) -> list[str]:
    """The runs' names; a ConfigError for configs that cannot be one program."""
    if not configs:
        raise ConfigError("a group needs at least one config")
    first = dataclasses.asdict(configs[0])
    for i, config in enumerate(configs[1:], 1):
        for field, value in dataclasses.asdict(config).items():
            if field not in VARIED_FIELDS and value != first[field]:
                raise ConfigError(
                    f"the configs of a group may differ only in {', '.join(VARIED_FIELDS)}: "
                    f"config {i} has {field}={value!r}, config 0 {field}={first[field]!r}; "
                    f"train them in separate groups")
    names = [run_name(config) for config in configs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"the group holds the run {repeated[0]} more than once")
    return names


def group_optimizer(config: ViTConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The solo run's optimizer (optim.keras_adamw at the config's schedule) with the peak
    learning rate and the weight decay in its state (optax.inject_hyperparams), so that each
    run of a vmapped group carries its own. Its update reads the two from the state: one
    such optimizer updates every run, whatever config it was made from.

    The schedule's shape is shared: rate(count) = peak * unit(count), unit being the
    config's schedule at peak 1 (optim.learning_rate_schedule): the peak itself for the
    seed's constant rate, and for a schedule what optax computes from the peak."""
    unit = optim.learning_rate_schedule(config.replace(learning_rate=1.0), steps_per_epoch)

    def adamw(learning_rate, weight_decay):
        rate = (lambda count: learning_rate * unit(count)) if callable(unit) else learning_rate
        return keras_adamw(rate, weight_decay)

    return optax.inject_hyperparams(adamw)(learning_rate=config.learning_rate,
                                           weight_decay=config.weight_decay)


# Jitted, as one program per tree: eagerly, each leaf's op would compile on its own (for a
# train state, dozens of small compiles).
@jax.jit
def stack(trees: list):
    """Trees of equal structure -> one tree whose leaves have a leading runs axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@jax.jit
def unstack(tree, run):
    """One run's slice of a stacked tree."""
    return jax.tree.map(lambda leaf: leaf[run], tree)


@functools.partial(jax.jit, donate_argnums=0)
def discard_stopped(state: steps.TrainState, stopped: jax.Array) -> steps.TrainState:
    """The stacked state with the stopped runs' weights and optimizer state zeroed: theirs
    went non-finite, and a checkpoint must be finite (checkpoints refuses NaN and inf)."""

    def zero(leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            return leaf
        return jnp.where(stopped.reshape(-1, *[1] * (leaf.ndim - 1)), 0, leaf)

    return state.replace(params=jax.tree.map(zero, state.params),
                         opt_state=jax.tree.map(zero, state.opt_state))


def zero_totals(runs: int) -> steps.Totals:
    return stack([steps.Totals.zero()] * runs)


def initial_state(configs: list[ViTConfig], train_images: np.ndarray, steps_per_epoch: int):
    """(graphdef, statistics, stacked TrainState): each run's solo initial state. The
    normalization statistics depend on the images only, so the runs share one copy."""
    models = [create_model(config, train_images) for config in configs]
    graphdef, _, statistics = steps.split_model(models[0])
    states = [steps.TrainState.create(steps.split_model(model)[1],
                                      group_optimizer(config, steps_per_epoch), config)
              for config, model in zip(configs, models, strict=True)]
    return graphdef, statistics, stack(states)


def make_group_step(graphdef: nnx.GraphDef, config: ViTConfig, steps_per_epoch: int, mesh):
    """(stacked state, statistics, stacked totals, images, labels, (runs, batch) rows) ->
    (state, totals), jitted: steps.make_train_step's step vmapped over the runs (the data
    and the statistics shared), jitted with the solo step's donation and XLA options."""
    tx = group_optimizer(config, steps_per_epoch)
    solo = steps.train_step_function(graphdef, tx, mesh, config.microbatch_size)
    return jax.jit(jax.vmap(solo, in_axes=(0, None, 0, None, None, 0)), donate_argnums=0,
                   compiler_options=steps.compiler_options(mesh))


def make_group_eval_step(graphdef: nnx.GraphDef, mesh):
    """(stacked params, statistics, stacked totals, *Batch) -> totals: every run on the same
    batch."""
    return jax.jit(jax.vmap(steps.make_eval_step(graphdef, mesh),
                            in_axes=(0, None, 0, None, None, None)))


def step_memory_bytes(compiled) -> int:
    """Peak bytes per device of one step, as XLA plans it: inputs, outputs that do not reuse
    a donated input, temporaries."""
    memory = compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def device_memory_limit(mesh) -> int | None:
    """Bytes a device may hold; None where it does not say (CPUs)."""
    return (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")


def check_fits(need: int, runs: int, data_bytes: int, mesh) -> None:
    """A one-line ConfigError when the step needs more than a device has."""
    limit = device_memory_limit(mesh)
    if limit is None or need <= limit:
        return
    per_run = (need - data_bytes) / runs
    fitting = max(int((limit - data_bytes) // per_run), 0)
    raise ConfigError(
        f"a group of {runs} runs needs about {need / 2**30:.2f} GiB per device for its train "
        f"step, more than the {limit / 2**30:.2f} GiB a device has; about {fitting} runs fit "
        f"in one group (or lower microbatch_size)")


@dataclasses.dataclass
class Member:
    """One run of the group: its config, its directory and what the loop knows of it."""

    name: str
    config: ViTConfig
    directory: Path
    progress: RunProgress = dataclasses.field(default_factory=RunProgress)
    stopped: str | None = None  # Why it stopped early (a non-finite loss); None: training.


@dataclasses.dataclass
class GroupFit:
    """Everything an epoch of the group needs besides the stacked train state."""

    members: list[Member]
    mesh: object
    graphdef: nnx.GraphDef
    statistics: nnx.State
    train_step: Callable
    eval_step: Callable
    train_feed: feeds.DeviceFeed
    validation_feed: feeds.DeviceFeed | None
    compile_seconds: float
    memory_bytes: int
    stop: StopSignals | None = None

    @property
    def config(self) -> ViTConfig:  # What the runs share.
        return self.members[0].config


def prepare_group(members: list[Member], train_set: data_lib.Dataset,
                  validation_set: data_lib.Dataset, train_images: np.ndarray,
                  mesh) -> tuple[GroupFit, steps.TrainState]:
    """The compiled group steps, the feeds (data on the devices: every run gathers from the
    same copy) and the stacked initial state; the memory check before any step runs."""
    config = members[0].config
    steps_per_epoch = -(-len(train_set) // config.batch_size)
    graphdef, statistics, state = initial_state([m.config for m in members], train_images,
                                                steps_per_epoch)
    state, statistics = parallel.put_replicated((state, statistics), mesh)
    train_feed = feeds.DeviceFeed(train_set, mesh)
    validation_feed = feeds.DeviceFeed(validation_set, mesh) if len(validation_set) else None
    started = time.perf_counter()
    rows = parallel.put_global(np.zeros((len(members), config.batch_size), np.int32),
                               parallel.batch_sharded(mesh, 1))
    train_step = make_group_step(graphdef, config, steps_per_epoch, mesh).lower(
        state, statistics, zero_totals(len(members)), *train_feed.arrays, rows).compile()
    need = step_memory_bytes(train_step)
    check_fits(need, len(members), train_set.images.nbytes + train_set.labels.nbytes, mesh)
    fit = GroupFit(members, mesh, graphdef, statistics, train_step,
                   make_group_eval_step(graphdef, mesh), train_feed, validation_feed,
                   time.perf_counter() - started, need)
    return fit, state


def epoch_rows(fit: GroupFit, epoch: int) -> list[jax.Array]:
    """Each step's (runs, batch) index rows: every run in its own seed's order, a stopped
    run all padding; put on the devices before the epoch, each row split over "data"."""
    blocks = np.stack([data_lib.batch_indices(
        data_lib.epoch_order(fit.train_feed.size, m.config.seed, epoch), fit.config.batch_size)
        for m in fit.members], axis=1)
    blocks[:, [m.stopped is not None for m in fit.members]] = -1
    return parallel.put_global(list(blocks), parallel.batch_sharded(fit.mesh, 1))


def per_run_means(totals: steps.Totals) -> list[dict[str, float]]:
    host = jax.device_get(totals)  # Waits for the steps that made them.
    return [jax.tree.map(operator.itemgetter(run), host).means()
            for run in range(len(host.count))]


def evaluate_group(fit: GroupFit, params, feed: feeds.DeviceFeed) -> list[dict[str, float]]:
    totals = zero_totals(len(fit.members))
    for batch in feed.batches(np.arange(feed.size), fit.config.batch_size):
        totals = fit.eval_step(params, fit.statistics, totals, *batch)
    return per_run_means(totals)


def train_group_epoch(fit: GroupFit, state, epoch: int) -> tuple[steps.TrainState, list | None]:
    """One epoch of every run: (state, one history row per run, with its
    first_nonfinite_step), or (state, None) when a stop signal arrived during it."""
    started = time.perf_counter()
    totals = zero_totals(len(fit.members))
    for rows in epoch_rows(fit, epoch):
        if fit.stop is not None and fit.stop.requested:
            return state, None
        state, totals = fit.train_step(state, fit.statistics, totals, *fit.train_feed.arrays,
                                       rows)
    history = [{"epoch": epoch, **means} for means in per_run_means(totals)]
    train_seconds = time.perf_counter() - started
    if fit.validation_feed is not None:
        for row, means in zip(history, evaluate_group(fit, state.params, fit.validation_feed),
                              strict=True):
            row.update({f"val_{name}": value for name, value in means.items()})
    flags = np.asarray(jax.device_get(totals.first_nonfinite_step))
    for row, flag in zip(history, flags, strict=True):
        row.update(epoch_seconds=time.perf_counter() - started,
                   images_per_second=fit.train_feed.size / train_seconds,
                   first_nonfinite_step=int(flag))
    return state, history


def record_epoch(fit: GroupFit, state, run: int, row: dict, log) -> None:
    """A run's epoch: stop it if its loss went non-finite; else log it, keep its best model
    (strict improvement, as ModelCheckpoint(save_best_only=True))."""
    member = fit.members[run]
    bad_step = row.pop("first_nonfinite_step")
    if bad_step >= 0:
        member.stopped = (f"the training loss became non-finite at step {bad_step} (epoch "
                          f"{row['epoch']}); the run keeps epoch {member.progress.epoch}, the "
                          f"last finite one (a lower learning_rate?)")
        log(f"{member.name}: {member.stopped}; the other runs go on")
        return
    member.progress.history.append(row)
    log(f"{member.name}: {reporting.epoch_line(row, fit.config.epochs)}")
    score = row.get("val_accuracy", np.inf)
    if score > member.progress.best_accuracy or fit.validation_feed is None:
        member.progress.best_accuracy, member.progress.best_epoch = score, row["epoch"]
        save_model(member.directory / layout.BEST_CHECKPOINT,
                   nnx.merge(fit.graphdef, unstack(state.params, run), fit.statistics))
    member.progress.epoch = row["epoch"]


def pack(epoch: int, members: list[Member]) -> RunProgress:
    """The group's progress as the RunProgress that RunCheckpoints saves with the stacked
    state: `epoch` = the group's epochs done, `history` = each run's own progress."""
    runs = []
    for member in members:
        own = dataclasses.asdict(member.progress)
        own["best_accuracy"] = None if math.isinf(own["best_accuracy"]) else own["best_accuracy"]
        runs.append({"name": member.name, "stopped": member.stopped, **own})
    return RunProgress(epoch=epoch, history=runs)


def unpack(progress: RunProgress, members: list[Member]) -> None:
    for member, saved in zip(members, progress.history, strict=True):
        best = saved["best_accuracy"]
        member.stopped = saved["stopped"]
        member.progress = RunProgress(saved["epoch"], saved["history"],
                                      -math.inf if best is None else best, saved["best_epoch"])


def fit_epochs(fit: GroupFit, state, done: int, checkpoints: RunCheckpoints, workdir: Path,
               log) -> None:
    """The epochs left, while any run trains: train, record, checkpoint, write histories."""
    for epoch in range(done + 1, fit.config.epochs + 1):
        if all(member.stopped for member in fit.members):
            break
        state, history = train_group_epoch(fit, state, epoch)
        if history is None:
            raise Interrupted(f"{fit.stop.requested}: stopped in epoch {epoch}; {workdir} holds "
                              f"epoch {done} of every run: run the same command to resume")
        for run, row in enumerate(history):
            if fit.members[run].stopped is None:
                record_epoch(fit, state, run, row, log)
        stopped = [member.stopped is not None for member in fit.members]
        if any(stopped):
            state = discard_stopped(state, jnp.asarray(stopped))
        done = epoch
        checkpoints.save(state, pack(done, fit.members))
        for member in fit.members:
            write_json(member.directory / layout.HISTORY_FILE, member.progress.history)


def resume(checkpoints: RunCheckpoints, state, fit: GroupFit, workdir: Path, log):
    """(state, epochs done): the last checkpoint's, or the fresh state and 0."""
    restored = checkpoints.restore_latest(state)
    if restored is None:
        return state, 0
    state, progress = restored
    if progress.epoch > fit.config.epochs:
        raise ConfigError(f"workdir={workdir} holds {progress.epoch} trained epochs, more than "
                          f"epochs={fit.config.epochs}; give epochs >= {progress.epoch} to "
                          f"continue it, or use another workdir")
    unpack(progress, fit.members)
    log(f"Resuming {workdir} after epoch {progress.epoch}")
    return parallel.put_replicated(state, fit.mesh), progress.epoch


def evaluate_best(fit: GroupFit, test_set: data_lib.Dataset | None) -> list[dict | None]:
    """Each run's best checkpoint on the test split, all in one vmapped evaluation; None for
    a run without a checkpoint (stopped in its first epoch) or without a test split."""
    runs = [m.progress.best_epoch > 0 for m in fit.members]
    if test_set is None or not len(test_set) or not any(runs):
        return [None] * len(fit.members)
    params = [steps.split_model(restore_model(m.directory / layout.BEST_CHECKPOINT,
                                              m.config))[1] if has else None
              for m, has in zip(fit.members, runs, strict=True)]
    stand_in = next(p for p in params if p is not None)  # Evaluated, then ignored.
    stacked = parallel.put_replicated(stack([stand_in if p is None else p for p in params]),
                                      fit.mesh)
    metrics = evaluate_group(fit, stacked, feeds.DeviceFeed(test_set, fit.mesh))
    return [m if has else None for m, has in zip(metrics, runs, strict=True)]


def finish(fit: GroupFit, splits: data_lib.Splits, train_examples: int,
           validation_examples: int) -> list[dict]:
    """Each run's results.json (the keys of a solo run's, plus `group` and `stopped`) and
    figures; returns the results."""
    tests = evaluate_best(fit, splits.test)
    versions = reporting.versions()
    all_results = []
    for member, test in zip(fit.members, tests, strict=True):
        results = {f"test_{name}": None if test is None else test[name]
                   for name in steps.METRIC_NAMES}
        results.update(
            best_epoch=member.progress.best_epoch, epochs=member.progress.epoch,
            test_examples=0 if splits.test is None else len(splits.test),
            config=json.loads(member.config.to_json()), devices=fit.mesh.size,
            versions=versions, compile_seconds=fit.compile_seconds,
            train_examples=train_examples, validation_examples=validation_examples,
            group=str(member.directory.parent.parent), stopped=member.stopped)
        if parallel.is_main_process():
            reporting.plot_history(member.progress.history, member.directory)
        write_json(member.directory / layout.RESULTS_FILE, results)
        all_results.append(results)
    return all_results


def mean_std(values: list) -> dict | None:
    """Mean and sample standard deviation (ddof=1; None for one value) of the non-None."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return {"mean": float(np.mean(present)), "std": std, "runs": len(present)}


def summarize(fit: GroupFit, all_results: list[dict]) -> dict:
    """summary.json: per run, and per (learning_rate, weight_decay) over the seeds."""
    runs = {m.name: {"seed": m.config.seed, "learning_rate": m.config.learning_rate,
                     "weight_decay": m.config.weight_decay, "best_epoch": r["best_epoch"],
                     "stopped": m.stopped, **{k: r[k] for k in TEST_METRICS}}
            for m, r in zip(fit.members, all_results, strict=True)}
    settings: dict[tuple, list[str]] = {}
    for member in fit.members:
        key = (member.config.learning_rate, member.config.weight_decay)
        settings.setdefault(key, []).append(member.name)
    over_seeds = [{"learning_rate": lr, "weight_decay": wd,
                   "seeds": [runs[name]["seed"] for name in names],
                   **{k: mean_std([runs[name][k] for name in names]) for k in TEST_METRICS}}
                  for (lr, wd), names in settings.items()]
    return {"runs": runs, "over_seeds": over_seeds, "devices": fit.mesh.size,
            "compile_seconds": fit.compile_seconds, "step_memory_bytes": fit.memory_bytes}


def percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def summary_table(summary: dict) -> str:
    """The table printed at the end: each run, then mean ± std over seeds per setting."""
    lines = [f"{'run':<36} {'best epoch':>10} {'test accuracy':>14} {'test top-5':>11}"]
    for name, run in summary["runs"].items():
        lines.append(f"{name:<36} {run['best_epoch']:>10} {percent(run['test_accuracy']):>14}"
                     f" {percent(run['test_top-5-accuracy']):>11}"
                     + ("  (stopped: non-finite loss)" if run["stopped"] else ""))
    for setting in summary["over_seeds"]:
        described = []
        for key, label in zip(TEST_METRICS, ("test accuracy", "top-5"), strict=True):
            stats = setting[key] or {"mean": None, "std": None, "runs": 0}
            described.append(f"{label} {percent(stats['mean'])} ± {percent(stats['std'])}")
        lines.append(f"learning_rate={setting['learning_rate']!r} weight_decay="
                     f"{setting['weight_decay']!r}, seeds {setting['seeds']}: "
                     + ", ".join(described))
    return "\n".join(lines)


def write_json(path: Path, value) -> None:
    if parallel.is_main_process():  # On several hosts only process 0 writes files.
        layout.write_json(path, value)


def same_group(saved: dict, members: list[Member]) -> bool:
    return saved.keys() == {m.name for m in members} and not any(
        layout.differing_fields(saved[m.name], m.config) for m in members)


def claim_group(path: Path, members: list[Member], overwrite: bool,
                allow_non_empty: bool) -> None:
    """Make `path` the group of `members` (the same group resumes). Another group is an
    error unless `overwrite`, which deletes that group's own entries only; a non-empty
    directory that is not a group is an error unless `allow_non_empty`."""
    marker = path / GROUP_MARKER
    wanted = {m.name: json.loads(m.config.to_json()) for m in members}
    if marker.is_file():
        saved = saved_runs(marker)
        if same_group(saved, members):
            return
        if not overwrite:
            raise ConfigError(
                f"workdir={path} holds another group (runs {', '.join(sorted(saved))}); use "
                f"another workdir, or overwrite=True to delete that group (only vit_flax's "
                f"own files; anything else there is kept)")
        delete_group(path, saved)
    else:
        check_foreign_directory(path, allow_non_empty)
    write_json(marker, {"vit_flax": "group", "runs": wanted})


def saved_runs(marker: Path) -> dict:
    try:
        return dict(json.loads(marker.read_text())["runs"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{marker} is unreadable ({error}); use another workdir") from None


def check_foreign_directory(path: Path, allow_non_empty: bool) -> None:
    entries = sorted(p.name for p in path.iterdir() if p.name != layout.LOCK)
    if entries and not allow_non_empty:
        raise ConfigError(f"workdir={path} is not empty and is not a vit_flax group (it holds "
                          f"{', '.join(entries[:5])}); use an empty or new directory, or "
                          f"allow_non_empty=True to add a group beside those files")
    clashes = sorted(set(entries) & set(GROUP_ENTRIES))
    if clashes:
        raise ConfigError(f"workdir={path} is not a vit_flax group but holds "
                          f"{', '.join(clashes)}, which a group would overwrite; move them or "
                          f"use another directory")


def delete_group(path: Path, saved: dict) -> None:
    """The saved group's runs (their own entries, by workdir.delete_run), its run state and
    summary; its marker last, so that an interrupted delete leaves a group."""
    for name in saved:
        run = path / RUNS / name
        if layout.is_run(run):
            layout.delete_run(run)
    if (path / layout.RUN_STATE).is_dir():
        shutil.rmtree(path / layout.RUN_STATE)
    (path / SUMMARY_FILE).unlink(missing_ok=True)
    (path / GROUP_MARKER).unlink()


def claim_runs(workdir: Path, members: list[Member], held: contextlib.ExitStack,
               overwrite: bool, allow_non_empty: bool) -> None:
    """Lock the group and each run directory (a solo `train` into one of them is refused
    while the group trains), and claim them by the workdir rules."""
    held.enter_context(layout.Lock(workdir))
    claim_group(workdir, members, overwrite, allow_non_empty)
    for member in members:
        layout.ensure_directory(member.directory)
        held.enter_context(layout.Lock(member.directory))
        layout.claim(member.directory, member.config, overwrite=overwrite)
        (member.directory / layout.CONFIG_FILE).write_text(member.config.to_json() + "\n")


def train_group(configs: list[ViTConfig], splits: data_lib.Splits,
                workdir: str | os.PathLike, log: Callable[[str], None] = print, devices=None,
                overwrite: bool = False, allow_non_empty: bool = False,
                keep_checkpoints: int = 2) -> dict:
    """Train `configs` (differing only in seed, learning_rate, weight_decay) together, each
    as `vit_flax.train` would alone; returns the contents of WORKDIR/summary.json.

    Data-parallel over `devices` (default: all). `overwrite`, `allow_non_empty` and
    `keep_checkpoints` are `train`'s, for the group's directory and for each run's; see the
    module docstring for the layout, resume, stop and non-finite rules.
    """
    names = check_group(configs)
    check_train_options(keep_checkpoints=keep_checkpoints, log_every=0)
    mesh = parallel.data_mesh(devices)
    parallel.check_batch_size(configs[0], mesh)
    check_data(configs[0], splits)
    workdir = layout.ensure_directory(workdir)
    members = [Member(name, config, workdir / RUNS / name)
               for name, config in zip(names, configs, strict=True)]
    main = parallel.is_main_process()
    with contextlib.ExitStack() as held:
        if main:
            claim_runs(workdir, members, held, overwrite, allow_non_empty)
        return _train_group_in(members, splits, workdir, log if main else (lambda _: None),
                               mesh, keep_checkpoints)


def _train_group_in(members: list[Member], splits: data_lib.Splits, workdir: Path, log, mesh,
                    keep_checkpoints: int) -> dict:
    config = members[0].config
    train_set, validation_set = data_lib.validation_split(splits.train, config.validation_split)
    # As the seed: Normalization is adapted on all training images, the validation part too.
    fit, state = prepare_group(members, train_set, validation_set, splits.train.images, mesh)
    log(f"Training {len(members)} runs together on {len(train_set)} images, validating on "
        f"{len(validation_set)}, {mesh.size} {mesh.devices.flat[0].platform.upper()} "
        f"device(s); group train step compiled in {fit.compile_seconds:.1f}s, "
        f"{fit.memory_bytes / 2**20:.1f} MiB per device")
    with contextlib.closing(RunCheckpoints(workdir / layout.RUN_STATE, keep_checkpoints,
                                          log)) as checkpoints:
        state, done = resume(checkpoints, state, fit, workdir, log)
        with StopSignals() as stop:
            fit.stop = stop
            fit_epochs(fit, state, done, checkpoints, workdir, log)
    summary = summarize(fit, finish(fit, splits, len(train_set), len(validation_set)))
    write_json(workdir / SUMMARY_FILE, summary)
    log(summary_table(summary))
    if all(member.stopped for member in members):
        raise FloatingPointError("every run of the group stopped: " + "; ".join(
            f"{member.name}: {member.stopped}" for member in members))
    return summary
