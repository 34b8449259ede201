"""The jitted training and evaluation steps: pure functions over `nnx.split` state.

The data set lives on the device; a step receives the whole arrays and one row of batch
indices (-1 = padding of the last partial batch), gathers its batch in jit, and adds its
sums to running totals, so the loop does no per-batch host work.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from vit_flax.config import ViTConfig
from vit_flax.infra import parallel
from vit_flax.models import Model, augment

Metrics = dict[str, jax.Array]
METRIC_NAMES = ("loss", "accuracy", "top-5-accuracy")


class Batch(NamedTuple):
    """What a step consumes: images and labels, and the row of indices into them that makes
    the batch (-1 = padding of the last partial batch)."""

    images: jax.Array
    labels: jax.Array
    index: jax.Array


class Examples(NamedTuple):
    """A gathered batch (or micro-batch): its images, labels, and 1.0 for a real example,
    0.0 for a pad."""

    images: jax.Array
    labels: jax.Array
    mask: jax.Array


class LossOptions(NamedTuple):
    """What the loss needs besides the model: passed to the step builders explicitly, so a
    step computes the loss it was built with, whatever model it is handed."""

    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    image_shape: tuple[int, int] = (32, 32)  # (height, width) of the input: mixing boxes.

    @classmethod
    def of(cls, config: ViTConfig) -> LossOptions:
        return cls(config.label_smoothing, config.mixup_alpha, config.cutmix_alpha,
                   tuple(config.input_shape[:2]))


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


class Totals(struct.PyTreeNode):
    """Running sums of an epoch's (or an evaluation's) per-example metrics."""

    sums: Metrics  # METRIC_NAMES -> sum over the real examples so far.
    count: jax.Array  # Real examples so far.
    # The run's step number of the first step among these whose loss was not finite;
    # -1: none. A control flag, kept apart from the metric sums.
    first_nonfinite_step: jax.Array

    @classmethod
    def zero(cls) -> Totals:
        return cls(sums={name: jnp.zeros((), jnp.float32) for name in METRIC_NAMES},
                   count=jnp.zeros((), jnp.float32),
                   first_nonfinite_step=jnp.full((), -1, jnp.int32))

    def add(self, per_example: Metrics, mask: jax.Array) -> Totals:
        sums = {name: self.sums[name] + jnp.sum(per_example[name] * mask)
                for name in METRIC_NAMES}
        return self.replace(sums=sums, count=self.count + jnp.sum(mask))

    def means(self) -> dict[str, float]:
        """Epoch metrics as Keras reports them: sample-weighted means (total / count)."""
        count = max(float(self.count), 1.0)
        return {name: float(self.sums[name]) / count for name in METRIC_NAMES}


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Sparse softmax cross-entropy; with label smoothing e, against (1 - e) one-hot + e
    uniform (Keras' and optax's definition)."""
    logits = logits.astype(jnp.float32)  # The loss in float32, whatever the compute dtype.
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def per_example_metrics(logits: jax.Array, labels: jax.Array,
                        label_smoothing: float = 0.0) -> Metrics:
    """Cross-entropy (label-smoothed when asked), accuracy and top-5 accuracy of each
    example."""
    logits = logits.astype(jnp.float32)
    label_logits = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    return {
        "loss": cross_entropy(logits, labels, label_smoothing),
        "accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
        # Keras' in_top_k: the label's logit is >= the 5th largest (ties favour the label).
        "top-5-accuracy": (jnp.sum(logits > label_logits, -1) < 5).astype(jnp.float32),
    }


def gather(batch: Batch, mesh: Mesh | None) -> Examples:
    """The batch's examples, gathered by index on the device; pads masked out."""
    mask = (batch.index >= 0).astype(jnp.float32)
    safe = jnp.maximum(batch.index, 0)
    examples = Examples(batch.images[safe], batch.labels[safe], mask)
    if mesh is not None:  # Each device works on its slice of the batch.
        examples = jax.lax.with_sharding_constraint(examples, parallel.batch_sharded(mesh))
    return examples


def micro_batches(examples: Examples, pass_size: int, mesh: Mesh | None) -> Examples:
    """(batch, ...) arrays -> (batch / pass_size, pass_size, ...): micro-batch i holds rows
    i, i + k, i + 2k, ... (k micro-batches), so that with a mesh every device keeps an equal
    share of each micro-batch."""
    count = examples.images.shape[0] // pass_size
    split = Examples(*(a.reshape(pass_size, count, *a.shape[1:]).swapaxes(0, 1)
                       for a in examples))
    if mesh is not None:
        split = jax.lax.with_sharding_constraint(split, parallel.batch_sharded(mesh, 1))
    return split


def step_rngs(rng: jax.Array, step: jax.Array, micro_batch: jax.Array | int) -> nnx.Rngs:
    """The augmentation and dropout keys of one micro-batch of one step: a pure function of
    the run's key, the step number and the micro-batch's index (so a resumed run draws
    exactly what the uninterrupted one drew)."""
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(rng, step))
    return nnx.Rngs(augment=jax.random.fold_in(augment_key, micro_batch),
                    dropout=jax.random.fold_in(dropout_key, micro_batch))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    mesh: Mesh | None = None, microbatch_size: int | None = None, *,
                    loss: LossOptions):
    """(state, statistics, totals, *Batch) -> (state, totals), jitted.

    `state` is donated: its buffers are reused for the new state. With a `mesh`, the batch
    is split across its "data" axis (see vit_flax.infra.parallel). With a `microbatch_size`
    smaller than the batch, the gradient is summed over micro-batches of that size in a
    `lax.scan` before the one optimizer update (ViTConfig.microbatch_size says why).
    """
    # totals are not donated: the progress bar reads the previous step's while this one runs.
    return jax.jit(train_step_function(graphdef, tx, mesh, microbatch_size, loss=loss),
                   donate_argnums=0, compiler_options=compiler_options(mesh))


def train_step_function(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                        mesh: Mesh | None = None, microbatch_size: int | None = None, *,
                        loss: LossOptions):
    """make_train_step's step before jax.jit, for programs that transform it further (a
    group vmaps it: JAX refuses compiler_options on a nested jit)."""

    def micro_batch_loss(params, statistics, state, micro: Examples, index, real_examples):
        """Summed loss of the micro-batch's real examples / the batch's real examples: the
        gradients of the micro-batches then add up to the mean gradient of the batch, as
        Keras' loss on a (partial) batch."""
        model = nnx.merge(graphdef, params, statistics)
        rngs = step_rngs(state.rng, state.step, index)
        mix, label_weight = None, None
        if loss.mixup_alpha or loss.cutmix_alpha:
            mix, label_weight = augment.sample_mixing(
                rngs.augment(), *loss.image_shape, loss.mixup_alpha, loss.cutmix_alpha)
        logits = model(micro.images, train=True, rngs=rngs, mix=mix)
        per_example = per_example_metrics(logits, micro.labels, loss.label_smoothing)
        if mix is not None:  # The targets mix as the images did: with the batch reversed.
            partner = cross_entropy(logits, micro.labels[::-1], loss.label_smoothing)
            per_example["loss"] = label_weight * per_example["loss"] + \
                (1.0 - label_weight) * partner
        return jnp.sum(per_example["loss"] * micro.mask) / real_examples, per_example

    def train_step(state: TrainState, statistics: nnx.State, totals: Totals,
                   images: jax.Array, labels: jax.Array, batch_index: jax.Array):
        batch_size = batch_index.shape[0]
        pass_size = min(microbatch_size or batch_size, batch_size)
        if batch_size % pass_size:
            raise ValueError(f"batch of {batch_size} rows is not a multiple of "
                             f"microbatch_size ({microbatch_size})")
        examples = gather(Batch(images, labels, batch_index), mesh)
        real_examples = jnp.sum(examples.mask)
        grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)

        def accumulate(grads, micro_and_index):
            micro, index = micro_and_index
            (loss, per_example), micro_grads = grad_fn(state.params, statistics, state,
                                                       micro, index, real_examples)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, per_example)

        micros = micro_batches(examples, pass_size, mesh)
        grads, (losses, per_example) = jax.lax.scan(
            accumulate, jax.tree.map(jnp.zeros_like, state.params),
            (micros, jnp.arange(batch_size // pass_size)))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, opt_state=opt_state,
                                  params=optax.apply_updates(state.params, updates))
        return new_state, _flag_nonfinite(totals.add(per_example, micros.mask),
                                          jnp.sum(losses), new_state.step)

    return train_step


def _flag_nonfinite(totals: Totals, loss: jax.Array, step: jax.Array) -> Totals:
    first = totals.first_nonfinite_step
    return totals.replace(first_nonfinite_step=jnp.where(
        (first < 0) & ~jnp.isfinite(loss), step, first))


def compiler_options(mesh: Mesh | None = None) -> dict[str, str]:
    """XLA options for the train step on the mesh's platform (default: JAX's backend).

    On CPU, XLA's memory-optimized scheduler instead of its default (concurrency-optimized)
    one: measured on the seed train step at batch 256 (2-core CPU), 3.0 instead of 3.6 GB of
    temporaries and ~8% faster, because the default runs the backward pass' elementwise
    recomputations early and keeps their results alive through the forward pass. An option
    of this one program, not of the process.
    """
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform != "cpu":
        return {}
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh | None = None, *,
                   loss: LossOptions):
    """(params, statistics, totals, *Batch) -> totals, jitted."""

    def eval_step(params, statistics, totals: Totals, images, labels, batch_index):
        examples = gather(Batch(images, labels, batch_index), mesh)
        model = nnx.merge(graphdef, params, statistics)
        logits = model(examples.images, train=False)
        metrics = per_example_metrics(logits, examples.labels, loss.label_smoothing)
        return totals.add(metrics, examples.mask)

    return jax.jit(eval_step)


def split_model(model: Model) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """(graphdef, trainable params, everything else: the normalization statistics)."""
    return nnx.split(model, nnx.Param, ...)
