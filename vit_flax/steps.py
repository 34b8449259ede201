"""The jitted training and evaluation steps: pure functions over `nnx.split` state.

The data set lives on the device; a step receives the whole arrays and one row of batch
indices (-1 = padding of the last partial batch), gathers its batch in jit, and adds its
sums to running totals, so the loop does no per-batch host work.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from vit_flax import parallel
from vit_flax.model import ViT

Metrics = dict[str, jax.Array]
METRIC_NAMES = ("loss", "accuracy", "top-5-accuracy")


class TrainState(struct.PyTreeNode):
    step: jax.Array  # Optimizer steps taken; per-step randomness is fold_in(rng, step).
    params: nnx.State  # The trainable weights (nnx.Param).
    opt_state: optax.OptState
    rng: jax.Array  # The run's base key for augmentation and dropout.


def zero_totals() -> Metrics:
    totals = {name: jnp.zeros((), jnp.float32) for name in (*METRIC_NAMES, "count")}
    # The run's step number of the first non-finite loss among these totals; -1: none.
    totals["first_nonfinite_step"] = jnp.full((), -1.0, jnp.float32)
    return totals


def summarize(totals: Metrics) -> dict[str, float]:
    """Epoch metrics as Keras reports them: sample-weighted means (total / count)."""
    count = float(totals["count"])
    return {name: float(totals[name]) / max(count, 1.0) for name in METRIC_NAMES}


def per_example_metrics(logits: jax.Array, labels: jax.Array) -> Metrics:
    """Sparse softmax cross-entropy, accuracy and top-5 accuracy of each example."""
    logits = logits.astype(jnp.float32)  # The loss in float32, whatever the compute dtype.
    label_logits = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        "accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
        # Keras' in_top_k: the label's logit is >= the 5th largest (ties favour the label).
        "top-5-accuracy": (jnp.sum(logits > label_logits, -1) < 5).astype(jnp.float32),
    }


def _gather(images: jax.Array, labels: jax.Array, batch_index: jax.Array, mesh: Mesh | None):
    mask = (batch_index >= 0).astype(jnp.float32)
    safe = jnp.maximum(batch_index, 0)
    batch_images, batch_labels = images[safe], labels[safe]
    if mesh is not None:  # Each device works on its slice of the batch.
        batch_images, batch_labels, mask = jax.lax.with_sharding_constraint(
            (batch_images, batch_labels, mask), parallel.batch_sharded(mesh))
    return batch_images, batch_labels, mask


def _add(totals: Metrics, per_example: Metrics, mask: jax.Array) -> Metrics:
    sums = {name: jnp.sum(value * mask) for name, value in per_example.items()}
    sums["count"] = jnp.sum(mask)
    return {**totals, **{name: totals[name] + sums[name] for name in sums}}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    mesh: Mesh | None = None):
    """(state, statistics, totals, images, labels, batch_index) -> (state, totals), jitted.

    `state` is donated: its buffers are reused for the new state. With a `mesh`, the batch
    is split across its "data" axis (see vit_flax.parallel).
    """

    def train_step(state: TrainState, statistics: nnx.State, totals: Metrics,
                   images: jax.Array, labels: jax.Array, batch_index: jax.Array):
        batch_images, batch_labels, mask = _gather(images, labels, batch_index, mesh)
        augment_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))

        def loss_fn(params):
            model = nnx.merge(graphdef, params, statistics)
            logits = model(batch_images, train=True,
                           rngs=nnx.Rngs(augment=augment_key, dropout=dropout_key))
            per_example = per_example_metrics(logits, batch_labels)
            # The mean over the real examples of the batch, as Keras' loss on a partial batch.
            loss = jnp.sum(per_example["loss"] * mask) / jnp.sum(mask)
            return loss, per_example

        (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        totals = _add(totals, per_example, mask)
        first_bad = totals["first_nonfinite_step"]
        totals["first_nonfinite_step"] = jnp.where(
            (first_bad < 0) & ~jnp.isfinite(loss), new_state.step.astype(jnp.float32), first_bad)
        return new_state, totals

    # totals are not donated: the progress bar reads the previous step's while this one runs.
    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh | None = None):
    """(params, statistics, totals, images, labels, batch_index) -> totals, jitted."""

    def eval_step(params, statistics, totals, images, labels, batch_index):
        batch_images, batch_labels, mask = _gather(images, labels, batch_index, mesh)
        logits = nnx.merge(graphdef, params, statistics)(batch_images, train=False)
        return _add(totals, per_example_metrics(logits, batch_labels), mask)

    return jax.jit(eval_step)


def split_model(model: ViT) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """(graphdef, trainable params, everything else: the normalization statistics)."""
    return nnx.split(model, nnx.Param, ...)
