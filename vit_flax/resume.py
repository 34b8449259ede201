"""Checkpoint and resume: everything a run needs to go on, saved atomically each epoch.

A run is a pure function of its config: the data order of epoch e depends on (seed, e) and
the randomness of step s on fold_in(rng, s). So the state at an epoch's end (weights,
optimizer state, step, key) plus the history and the best score so far is all a restart
needs to reproduce, bit for bit, the run it continues.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from vit_flax.config import ConfigError, ViTConfig

RUN_STATE = "run_state"  # Inside the workdir: one orbax step per finished epoch.
# A longer run may continue a shorter one: the only field allowed to change on resume.
RESUMABLE_CHANGES = {"epochs"}


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: the run stopped at an epoch boundary, saved."""


def check_workdir_config(workdir: Path, config: ViTConfig, config_file: str,
                         overwrite: bool) -> None:
    """Refuse to mix runs: a workdir holding another config's run is an error, unless
    `overwrite`, which deletes that run first."""
    path = workdir / config_file
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    current = json.loads(config.to_json())
    differing = sorted(k for k in current.keys() | saved.keys()
                       if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if not differing:
        return
    if not overwrite:
        raise ConfigError(f"--workdir {workdir} holds a run with another configuration (differs"
                          f" in {', '.join(differing)}); use another --workdir, or --overwrite"
                          f" to delete that run")
    for entry in workdir.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


@dataclasses.dataclass
class RunProgress:
    """What the loop knows besides the train state, saved with it."""

    epoch: int = 0  # Epochs finished.
    history: list = dataclasses.field(default_factory=list)
    best_accuracy: float = -math.inf
    best_epoch: int = 0


class RunCheckpoints:
    def __init__(self, workdir: Path, keep: int):
        if keep < 1:
            raise ConfigError(f"--keep-checkpoints must be >= 1, got {keep}")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager((workdir / RUN_STATE).absolute(), options=options)

    def save(self, state, progress: RunProgress) -> None:
        meta = dataclasses.asdict(progress)
        meta["best_accuracy"] = None if math.isinf(progress.best_accuracy) else \
            progress.best_accuracy
        self.manager.save(progress.epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_savable(state)), progress=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()  # The epoch is safe before the next one starts.

    def restore_latest(self, template_state):
        """(state, RunProgress) of the last saved epoch, or None when there is none."""
        epoch = self.manager.latest_step()
        if epoch is None:
            return None
        restored = self.manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_savable(template_state)),
            progress=ocp.args.JsonRestore()))
        meta = dict(restored["progress"])
        if meta["best_accuracy"] is None:
            meta["best_accuracy"] = -math.inf
        saved = restored["state"]
        state = template_state.replace(
            step=saved["step"], params=saved["params"], opt_state=saved["opt_state"],
            rng=jax.random.wrap_key_data(saved["rng"],
                                         impl=jax.random.key_impl(template_state.rng)))
        return state, RunProgress(**meta)

    def close(self) -> None:
        self.manager.close()


def _savable(state) -> dict:
    # Typed PRNG keys are stored as their raw uint32 data.
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": jax.random.key_data(state.rng)}


class StopSignals:
    """Within the block, SIGTERM/SIGINT only set `requested`; the loop stops at a safe
    point. The previous handlers come back afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None
        self.previous = {}

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # Not the main thread: signals cannot be caught here.
            self.previous.clear()
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
