"""What is saved of a run, and how: the per-epoch run state and the best model (orbax).

A run is a pure function of its config: the data order of epoch e depends on (seed, e) and
the randomness of step s on fold_in(rng, s). So the state at an epoch's end (weights,
optimizer state, step, key) plus the history and the best score so far is all a restart
needs to reproduce, bit for bit, the run it continues.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.model import ViT


class CheckpointError(OSError):
    """A checkpoint that cannot be written or read; the message says which and why."""


@dataclasses.dataclass
class RunProgress:
    """What the loop knows besides the train state, saved with it."""

    epoch: int = 0  # Epochs finished.
    history: list = dataclasses.field(default_factory=list)
    best_accuracy: float = -math.inf
    best_epoch: int = 0


class RunCheckpoints:
    """One orbax step per finished epoch in `directory`, the last `keep` kept."""

    def __init__(self, directory: Path, keep: int, log: Callable[[str], None] = print):
        self.log = log  # For one-line warnings (a skipped step, say).
        if keep < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {keep}")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

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


def save_model(directory: str | os.PathLike, model: ViT) -> None:
    """Write the model's weights and normalization statistics (orbax; replaces `directory`)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(directory).absolute(), nnx.state(model), force=True)


def restore_model(directory: str | os.PathLike, config: ViTConfig) -> ViT:
    """A ViT of `config` with the weights saved by `save_model` in `directory`."""
    abstract = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(Path(directory).absolute(), abstract_state)
    return nnx.merge(graphdef, state)
