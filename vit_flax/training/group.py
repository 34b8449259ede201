"""What only a group needs. A group is many runs in one program: configurations that differ
only in seed, learning_rate and weight_decay, trained together by one jitted step,
`jax.vmap`ped over the runs, by the one training loop (training/loop.py, `train_group`).
This module holds the group's own parts: its runs' names and checks, the optimizer that
carries each run's learning rate and weight decay, the stacked state, its marker and claim,
its memory check and its summary.

Each run of a group is the run `vit_flax.train` makes of its config alone: its own initial
weights (`create_model`), its own data order (`epoch_order` of its seed), its own
augmentation and dropout keys (`step_rngs` of its key and step), Keras' AdamW of
`vit_flax.training.optim` with its own learning rate and weight decay (held in its optimizer
state by `optax.inject_hyperparams`), its own validation, best checkpoint and test metrics. What the
runs share is the program: the data is on the devices once, each step takes a (runs, batch)
block of index rows and each run gathers its own batch, and one compile serves them all. A
run's history equals its solo run's: measured bit for bit on the CPU, on 1 and 2 devices
(benchmarks/group_benchmark.py --agreement); tests/training/test_group.py allows float32
round-off, as another backend may fuse the vmapped program differently. Data parallelism is the solo
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

import dataclasses
import functools
import json
import math
import operator
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.infra import workdir as layout
from vit_flax.infra.checkpoints import RunProgress
from vit_flax.training import optim, steps
from vit_flax.training.optim import keras_adamw

VARIED_FIELDS = ("seed", "learning_rate", "weight_decay")
SUMMARY_FILE = "summary.json"
GROUP_ENTRIES = (layout.GROUP_MARKER, layout.LOCK, layout.GROUP_RUNS, layout.RUN_STATE,
                 layout.MID_EPOCH_STATE, SUMMARY_FILE)
TEST_METRICS = ("test_accuracy", "test_top-5-accuracy")
# The marker's format. 1: markers without the key, written before it existed (same layout,
# they resume); a larger number is a newer vit_flax's layout, which this one refuses.
GROUP_FORMAT = 2
# A run's name as run_name writes it: one path component, never "..", "/" or a drive.
RUN_NAME = re.compile(r"seed-?\d+_lr[\w.+-]+_wd[\w.+-]+")


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


def pack(epoch: int, members: list) -> RunProgress:
    """The group's progress as the RunProgress that RunCheckpoints saves with the stacked
    state: `epoch` = the group's epochs done, `history` = each run's own progress."""
    runs = []
    for member in members:
        own = dataclasses.asdict(member.progress)
        own["best_accuracy"] = None if math.isinf(own["best_accuracy"]) else own["best_accuracy"]
        runs.append({"name": member.name, "stopped": member.stopped, **own})
    return RunProgress(epoch=epoch, history=runs)


def unpack(progress: RunProgress, members: list) -> None:
    """Each member's saved progress, matched by name (the members are in the saved order:
    claim_group puts them so, the stacked state being in that order)."""
    saved_runs = {saved["name"]: saved for saved in progress.history}
    for member in members:
        saved = saved_runs[member.name]
        best = saved["best_accuracy"]
        member.stopped = saved["stopped"]
        member.progress = RunProgress(saved["epoch"], saved["history"],
                                      -math.inf if best is None else best, saved["best_epoch"])


def run_means(totals: steps.Totals) -> list[dict[str, float]]:
    """Each run's means of stacked totals."""
    host = jax.device_get(totals)  # Waits for the steps that made them.
    return [jax.tree.map(operator.itemgetter(run), host).means()
            for run in range(len(host.count))]


def mean_std(values: list) -> dict | None:
    """Mean and sample standard deviation (ddof=1; None for one value) of the non-None."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return {"mean": float(np.mean(present)), "std": std, "runs": len(present)}


def summarize(members: list, all_results: list[dict], devices: int, compile_seconds: float,
              memory_bytes: int | None) -> dict:
    """summary.json: per run, and per (learning_rate, weight_decay) over the seeds."""
    runs = {m.name: {"seed": m.config.seed, "learning_rate": m.config.learning_rate,
                     "weight_decay": m.config.weight_decay, "best_epoch": r["best_epoch"],
                     "stopped": m.stopped, **{k: r[k] for k in TEST_METRICS}}
            for m, r in zip(members, all_results, strict=True)}
    settings: dict[tuple, list[str]] = {}
    for member in members:
        key = (member.config.learning_rate, member.config.weight_decay)
        settings.setdefault(key, []).append(member.name)
    over_seeds = [{"learning_rate": lr, "weight_decay": wd,
                   "seeds": [runs[name]["seed"] for name in names],
                   **{k: mean_std([runs[name][k] for name in names]) for k in TEST_METRICS}}
                  for (lr, wd), names in settings.items()]
    return {"runs": runs, "over_seeds": over_seeds, "devices": devices,
            "compile_seconds": compile_seconds, "step_memory_bytes": memory_bytes}


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


def claim_group(path: Path, members: list, overwrite: bool, allow_non_empty: bool) -> list:
    """Make `path` the group of `members` (the same group resumes) and return the members in
    the group's order: a resumed group keeps the order its stacked state was saved in,
    whatever order the lists were given in now. Another group is an error unless
    `overwrite`, which deletes that group's own entries only; a non-empty directory that is
    not a group is an error unless `allow_non_empty`."""
    marker = path / layout.GROUP_MARKER
    if marker.is_file():
        saved = saved_runs(marker)
        if same_group(saved, members):
            by_name = {m.name: m for m in members}
            return [by_name[name] for name in saved]
        if not overwrite:
            raise ConfigError(
                f"workdir={path} holds another group (runs {', '.join(sorted(saved))}); use "
                f"another workdir, or overwrite=True to delete that group (only vit_flax's "
                f"own files; anything else there is kept)")
        delete_group(path, saved)
    else:
        check_foreign_directory(path, allow_non_empty)
    layout.write_json(marker, {"vit_flax": "group", "format": GROUP_FORMAT,
                               "runs": {m.name: json.loads(m.config.to_json())
                                        for m in members}})
    return members


def same_group(saved: dict, members: list) -> bool:
    return saved.keys() == {m.name for m in members} and not any(
        layout.differing_fields(saved[m.name], m.config) for m in members)


def saved_runs(marker: Path) -> dict:
    """The runs a group's marker names, in its order; every name checked to be a run name
    (one path component), so that a crafted marker cannot point outside the group."""
    try:
        saved = json.loads(marker.read_text())
        runs = dict(saved["runs"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{marker} is unreadable ({error}); use another workdir") from None
    check_format(saved, marker)
    for name in runs:
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
            raise ConfigError(f"{marker} names a run {name!r}, which is not a run name of a "
                              f"group (seed<N>_lr<X>_wd<Y>); the marker was not written by "
                              f"vit_flax: use another workdir")
    return runs


def check_format(saved: dict, marker: Path) -> None:
    found = saved.get("format", 1) if isinstance(saved, dict) else None
    if not isinstance(found, int) or not 1 <= found <= GROUP_FORMAT:
        raise ConfigError(f"{marker} is a group of format {found!r}, written by another "
                          f"vit_flax; this one reads formats 1-{GROUP_FORMAT}: use the "
                          f"vit_flax that wrote it, or another workdir")


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
    summary; its marker last, so that an interrupted delete leaves a group. Only real
    directories under path/runs are touched (a symlink there is not followed)."""
    runs = path / layout.GROUP_RUNS
    for name in saved:
        run = runs / name
        if run.is_dir() and not run.is_symlink() and layout.is_run(run):
            layout.delete_run(run)
    for state in (layout.RUN_STATE, layout.MID_EPOCH_STATE):
        if (path / state).is_dir() and not (path / state).is_symlink():
            shutil.rmtree(path / state)
    (path / SUMMARY_FILE).unlink(missing_ok=True)
    (path / layout.GROUP_MARKER).unlink()
