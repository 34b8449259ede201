"""Everything a training loop needs, in one call: `create_train_state` returns the model's
split state, the optimizer state and the jitted train and eval steps (flax examples'
`create_train_state`). `vit_flax.train` is built on it; so is a loop of your own:

    setup = create_train_state(config, images, steps_per_epoch=steps)
    state, totals = setup.state, setup.zero_totals()
    for rows in batch_indices(epoch_order(len(images), config.seed, epoch), batch_size):
        state, totals = setup.train_step(state, setup.statistics, totals, images, labels, rows)
    model = setup.model(state)

(the README's "Your own training loop" runs it, as tests/test_readme.py checks.)

A group (a list of configs differing in seed, learning rate and weight decay; see
training/group.py) gets a stacked state with a leading runs axis and the steps vmapped over
it; one config gets the state as it is and the step as built, so a solo run's program is
exactly the one its results were measured with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from vit_flax.config import ViTConfig
from vit_flax.infra import parallel
from vit_flax.models import Model, create_model
from vit_flax.training import group, optim, steps


@dataclasses.dataclass
class TrainSetup:
    """What create_train_state returns."""

    graphdef: nnx.GraphDef  # The model's structure: nnx.merge(graphdef, params, statistics).
    statistics: nnx.State  # The Normalization statistics (not trained), shared by a group.
    state: steps.TrainState  # Weights, optimizer state, step, key (stacked for a group).
    tx: optax.GradientTransformation
    train_step: Callable  # (state, statistics, totals, images, labels, rows) -> (state, totals)
    eval_step: Callable  # (params, statistics, totals, images, labels, rows) -> totals
    runs: int | None  # None: one run; else the length of the runs axis.

    def zero_totals(self) -> steps.Totals:
        return steps.Totals.zero() if self.runs is None else group.zero_totals(self.runs)

    def model(self, state: steps.TrainState) -> Model:
        """The model of a (solo) state: for vit_flax.predict, save_model, attention maps."""
        return nnx.merge(self.graphdef, state.params, self.statistics)


def create_train_state(config: ViTConfig | Sequence[ViTConfig], train_images: np.ndarray,
                       *, steps_per_epoch: int, mesh=None,
                       models: Sequence[Model] | None = None) -> TrainSetup:
    """The initial state and the jitted steps for `config` (or a group's list of configs).

    `train_images` adapt the Normalization (as the seed's `adapt`); `models` replaces the
    freshly created ones (a fine-tuned start, say). With a `mesh` the state is replicated on
    its devices and each batch is split over its "data" axis."""
    configs = [config] if isinstance(config, ViTConfig) else list(config)
    runs = None if isinstance(config, ViTConfig) else len(configs)
    if models is None:
        models = [create_model(c, train_images) for c in configs]
    graphdef, _, statistics = steps.split_model(models[0])
    first = configs[0]
    if runs is None:
        tx = optim.for_config(first, steps_per_epoch)
        state = steps.TrainState.create(steps.split_model(models[0])[1], tx, first)
    else:  # The normalization statistics depend on the images only: one copy for all.
        tx = group.group_optimizer(first, steps_per_epoch)
        state = group.stack([steps.TrainState.create(steps.split_model(m)[1],
                                                     group.group_optimizer(c, steps_per_epoch),
                                                     c)
                             for c, m in zip(configs, models, strict=True)])
    if mesh is not None:
        state, statistics = parallel.put_replicated((state, statistics), mesh)
    train_step, eval_step = _steps(graphdef, tx, first, mesh, runs)
    return TrainSetup(graphdef, statistics, state, tx, train_step, eval_step, runs)


def _steps(graphdef, tx, config: ViTConfig, mesh, runs: int | None):
    """The jitted steps; for a group, the solo step vmapped over the runs (the data and the
    statistics shared), jitted with the solo step's donation and XLA options."""
    loss = steps.LossOptions.of(config)
    if runs is None:
        return (steps.make_train_step(graphdef, tx, mesh, config.microbatch_size, loss=loss),
                steps.make_eval_step(graphdef, mesh, loss=loss))
    solo = steps.train_step_function(graphdef, tx, mesh, config.microbatch_size, loss=loss)
    train_step = jax.jit(jax.vmap(solo, in_axes=(0, None, 0, None, None, 0)),
                         donate_argnums=0, compiler_options=steps.compiler_options(mesh))
    # Every run evaluates the same batch: the index row is shared too.
    eval_step = jax.jit(jax.vmap(steps.make_eval_step(graphdef, mesh, loss=loss),
                                 in_axes=(0, None, 0, None, None, None)))
    return train_step, eval_step
