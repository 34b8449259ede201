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
from vit_flax.config import ViTConfig
from vit_flax.model import ViT

Metrics = dict[str, jax.Array]
METRIC_NAMES = ("loss", "accuracy", "top-5-accuracy")


class TrainState(struct.PyTreeNode):
    step: jax.Array  # Optimizer steps taken; per-step randomness is fold_in(rng, step).
    params: nnx.State  # The trainable weights (nnx.Param).
    opt_state: optax.OptState
    rng: jax.Array  # The run's base key for augmentation and dropout.

    @classmethod
    def create(cls, params: nnx.State, tx: optax.GradientTransformation,
               config: ViTConfig) -> TrainState:
        """Step 0: fresh optimizer state; the base key of config.seed, folded with 1 to be
        a stream apart from the initial weights' (nnx.Rngs(config.seed))."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.fold_in(jax.random.key(config.seed), 1))


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


def _micro_batches(arrays, pass_size: int, mesh: Mesh | None):
    """(batch, ...) arrays -> (batch / pass_size, pass_size, ...): micro-batch i holds rows
    i, i + k, i + 2k, ... (k micro-batches), so that with a mesh every device keeps an equal
    share of each micro-batch."""
    count = arrays[0].shape[0] // pass_size
    split = tuple(a.reshape(pass_size, count, *a.shape[1:]).swapaxes(0, 1) for a in arrays)
    if mesh is not None:
        split = jax.lax.with_sharding_constraint(split, parallel.batch_sharded(mesh, 1))
    return split


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    mesh: Mesh | None = None, microbatch_size: int | None = None):
    """(state, statistics, totals, images, labels, batch_index) -> (state, totals), jitted.

    `state` is donated: its buffers are reused for the new state. With a `mesh`, the batch
    is split across its "data" axis (see vit_flax.parallel). With a `microbatch_size`
    smaller than the batch, the gradient is summed over micro-batches of that size in a
    `lax.scan` before the one optimizer update (ViTConfig.microbatch_size says why).
    """
    unroll_threefry_on_cpu()

    def train_step(state: TrainState, statistics: nnx.State, totals: Metrics,
                   images: jax.Array, labels: jax.Array, batch_index: jax.Array):
        batch_size = batch_index.shape[0]
        pass_size = min(microbatch_size or batch_size, batch_size)
        if batch_size % pass_size:
            raise ValueError(f"batch of {batch_size} rows is not a multiple of "
                             f"microbatch_size ({microbatch_size})")
        batch = _gather(images, labels, batch_index, mesh)
        # The mean over the real examples of the batch, as Keras' loss on a partial batch.
        real_examples = jnp.sum(batch[2])
        augment_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))

        def loss_fn(params, micro_batch):
            micro_images, micro_labels, mask, index = micro_batch
            model = nnx.merge(graphdef, params, statistics)
            rngs = nnx.Rngs(augment=jax.random.fold_in(augment_key, index),
                            dropout=jax.random.fold_in(dropout_key, index))
            per_example = per_example_metrics(model(micro_images, train=True, rngs=rngs),
                                              micro_labels)
            return jnp.sum(per_example["loss"] * mask) / real_examples, per_example

        def accumulate(grads, micro_batch):
            (loss, per_example), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, micro_batch)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, per_example)

        micro_batches = _micro_batches(batch, pass_size, mesh)
        indices = jnp.arange(batch_size // pass_size)
        grads, (losses, per_example) = jax.lax.scan(
            accumulate, jax.tree.map(jnp.zeros_like, state.params), (*micro_batches, indices))
        loss = jnp.sum(losses)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        totals = _add(totals, per_example, micro_batches[2])
        first_bad = totals["first_nonfinite_step"]
        totals["first_nonfinite_step"] = jnp.where(
            (first_bad < 0) & ~jnp.isfinite(loss), new_state.step.astype(jnp.float32), first_bad)
        return new_state, totals

    # totals are not donated: the progress bar reads the previous step's while this one runs.
    return jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options(mesh))


def unroll_threefry_on_cpu() -> bool:
    """Lower JAX's threefry2x32 hash with its rounds unrolled on CPU too, as JAX does on GPU.

    On CPU JAX lowers threefry as a 5-iteration loop (smaller programs), which XLA cannot
    fuse: every iteration copies the whole state of every draw. The seed's train step draws
    ~230M dropout bits; measured on a 2-core CPU, 170M Bernoulli draws take 2.2 s rolled and
    0.6 s unrolled. The bits are the same (the same function, written out), so results do not
    change. This replaces a JAX-internal lowering rule: where this JAX version has none
    under that name, nothing changes and False is returned.
    """
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32
        rule = threefry2x32._threefry2x32_lowering_rule
        primitive = threefry2x32.threefry2x32_p
    except (ImportError, AttributeError):
        return False
    mlir.register_lowering(primitive, rule, platform="cpu", inline=False)
    return True


def compiler_options(mesh: Mesh | None = None) -> dict[str, str]:
    """XLA options for the train step on the mesh's platform (default: JAX's backend).

    On CPU, XLA's memory-optimized scheduler instead of its default (concurrency-optimized)
    one: measured on the seed train step at batch 256 (2-core CPU), 3.0 instead of 3.6 GB of
    temporaries and ~8% faster, because the default runs the backward pass' elementwise
    recomputations early and keeps their results alive through the forward pass.
    """
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform != "cpu":
        return {}
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


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
