"""Training math: loss and gradients, the optimizer, and whole train steps.

Setup common to all three: dropout rates 0 on both sides, and augmentation at *fixed
parameters* rather than off -- the Keras model keeps its RandomFlip/RandomRotation/RandomZoom
and vit_flax its `random_augment`; only the random draws are replaced by the same given
flips, angles and zooms (parity.harness), so the transforms themselves are part of what is
compared. Keras runs its own JAX training code (`compute_loss_and_updates` under
`jax.value_and_grad`, as its train_step; `train_on_batch`), eagerly, because its random
rotation and zoom do not support jit. vit_flax runs its real jitted `steps.make_train_step`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import parity
from parity import harness, keras_reference
from parity.convert import flax_structure, keras_structure, match
from parity.harness import NO_DROPOUT, SMALL
from vit_flax import ViTConfig
from vit_flax.training import steps
from vit_flax.training.optim import keras_adamw


def run_flax_steps(flax_model, tx, images, labels, count: int):
    """`count` calls of vit_flax's train step on one fixed batch: (final state, losses)."""
    graphdef, params, statistics = steps.split_model(flax_model)
    state = steps.TrainState.create(params, tx, flax_model.config)
    train_step = steps.make_train_step(graphdef, tx, loss=steps.LossOptions.of(flax_model.config))
    batch = jnp.arange(len(images), dtype=jnp.int32)
    losses = []
    for _ in range(count):
        state, totals = train_step(state, statistics, steps.Totals.zero(), jnp.asarray(images),
                                   jnp.asarray(labels, jnp.int32), batch)
        losses.append(totals.means()["loss"])
    return state, losses


def fixed_batch(config: ViTConfig, size: int, monkeypatch, keras_model):
    """Images, labels, and the same augmentation parameters installed on both sides."""
    images = harness.random_images(size, seed=1)
    labels = np.arange(size) % config.num_classes
    augmentation = harness.AugmentationParameters.draw(size, seed=3)
    harness.fix_keras_augmentation(keras_model, augmentation)
    harness.fix_flax_augmentation(monkeypatch, augmentation)
    return images, labels


def test_loss_and_every_gradient_match(monkeypatch, record):
    """Seed config, 4 images.

    Loss: 2e-6 absolute on a loss of ~4.8 (ulp 4.8e-7). Measured 0 to 4.8e-7 (1 ulp).
    Gradients, per tensor: max|diff| <= 1e-5 * max|g_keras| + 1e-8. Measured worst 1.8e-6
    to 2.8e-6 relative over runs (a LayerNorm gamma or an MLP kernel): backpropagation
    through 8 blocks rounds sums in a different order on each side, ~1e-6 relative.
    The 1e-8 floor is for the key projection biases, whose gradient is exactly 0 in exact
    arithmetic (adding the same vector to every key shifts each query's scores by a
    constant, which softmax removes): both sides return float noise of ~3e-9 there.
    """
    config = ViTConfig(**NO_DROPOUT)
    keras_model = keras_reference.build_keras_vit(config, adapt_images=harness.random_images(64))
    keras_reference.compile_like_seed(keras_model, config)
    images, labels = fixed_batch(config, 4, monkeypatch, keras_model)
    keras_loss, keras_grads = harness.keras_gradients(keras_model, images, labels)

    flax_model = parity.keras_to_flax(keras_model, config)
    state, (flax_loss,) = run_flax_steps(flax_model, harness.capture_gradients(), images,
                                         labels, 1)
    record("loss, seed config", abs(flax_loss - keras_loss), 2e-6)
    assert abs(flax_loss - keras_loss) <= 2e-6

    gradient_model = harness.model_with(flax_model, state.opt_state)
    pairs = match(keras_structure(keras_model), flax_structure(gradient_model))
    trainable = [(k, f) for k, f in pairs if id(k.ref) in keras_grads]
    assert len(trainable) == len(keras_grads) == len(keras_model.trainable_variables)
    worst = 0.0
    for keras_weight, flax_weight in trainable:
        expected = keras_grads[id(keras_weight.ref)]
        scale = np.abs(expected).max()
        difference = np.abs(flax_weight.read() - expected).max()
        if scale > 1e-6:  # Not one of the structurally-zero key biases.
            worst = max(worst, difference / scale)
        assert difference <= 1e-5 * scale + 1e-8, (
            f"gradient of {keras_weight.ref.path}: max |difference| {difference:.3g}, "
            f"max |gradient| {scale:.3g}")
    record("gradients, worst max|diff| / max|g| per tensor", worst, "1e-5 relative + 1e-8")


@pytest.mark.parametrize("learning_rate, weight_decay", [
    (1e-3, 1e-4),  # The seed's.
    (1e-2, 0.5),  # Exaggerated decay, so decoupled weight decay is visible in the result.
])
def test_five_adamw_steps_on_the_same_gradients(learning_rate, weight_decay, record):
    """keras.optimizers.AdamW vs vit_flax.training.optim.keras_adamw (jitted, as in the train step).

    Gradients span the scales where Adam's epsilon (1e-7, not bias-corrected in Keras) does
    or does not matter: 1, 1e-3, 1e-5 (where optax.adamw's epsilon placement alone is off
    by ~1e-3) and exact zeros. Weights ~N(0, 1), the largest ~4.2. Tolerance 2.4e-6
    absolute = one float32 ulp of the largest weights (4.8e-7 in [4, 8)) per step, 5 steps:
    the two sides round the same operations differently (Keras subtracts the decay and the
    step in two assignments, optax sums them before one add). Measured 9.5e-7 (2 ulp) for
    both parameter sets.
    """
    rng = np.random.default_rng(0)
    shapes_and_scales = [((64, 4, 64), 1.0), ((128,), 1e-3), ((9, 7), 1e-5), ((5,), 0.0)]
    initial = [rng.normal(size=shape).astype(np.float32) for shape, _ in shapes_and_scales]
    gradients = [[(rng.normal(size=shape) * scale).astype(np.float32)
                  for shape, scale in shapes_and_scales] for _ in range(5)]

    variables = [keras.Variable(w) for w in initial]
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    for step_gradients in gradients:
        optimizer.apply_gradients(zip(step_gradients, variables, strict=True))

    tx = keras_adamw(learning_rate, weight_decay)
    update = jax.jit(tx.update)
    params = [jnp.asarray(w) for w in initial]
    opt_state = tx.init(params)
    for step_gradients in gradients:
        updates, opt_state = update([jnp.asarray(g) for g in step_gradients], opt_state, params)
        params = [p + u for p, u in zip(params, updates, strict=True)]

    difference = max(float(np.abs(np.asarray(ours) - theirs.numpy()).max())
                     for ours, theirs in zip(params, variables, strict=True))
    record(f"weights after 5 AdamW steps (lr {learning_rate}, wd {weight_decay})",
           difference, 2.4e-6)
    assert difference <= 2.4e-6


def test_three_full_train_steps(monkeypatch, tmp_path, record):
    """Keras `train_on_batch` x3 vs vit_flax's jitted train step x3, small config, batch 8.

    Losses: 1e-5 absolute per step (losses 3.0 -> 0.06). Measured 2.4e-7 to 7.2e-7 over runs
    (XLA's CPU reductions need not split the same way from run to run).
    Weights: 1e-4 absolute = 10% of one step's size (Adam moves a weight by ~lr = 1e-3 per
    step). Where a gradient element is below Adam's effective epsilon (3e-6 at step 1),
    the step is ~lr * g / 3e-6: gradient rounding noise of ~1e-8 there moves the weight
    by ~3e-6 per step, and that is what differs (worst in the 9216-input head Dense, whose
    many gradients are tiny); XLA's multithreaded CPU reductions change that noise from run
    to run. Measured worst 8e-6 to 1.8e-5 over runs. The bulk is held much tighter: the
    median element differs by ~1e-9 (asserted < 1e-7), the 99.9th percentile by ~2e-7
    (asserted < 2e-6).
    A wrong learning rate, beta, bias correction, decay or loss would move whole tensors
    by ~1e-3, far above this.
    """
    config = SMALL.replace(**NO_DROPOUT)
    keras_model = keras_reference.build_keras_vit(config, adapt_images=harness.random_images(64))
    keras_reference.compile_like_seed(keras_model, config)
    flax_model = parity.keras_to_flax(keras_model, config)
    images, labels = fixed_batch(config, 8, monkeypatch, keras_model)

    keras_losses = [keras_model.train_on_batch(images, labels)[0] for _ in range(3)]
    state, flax_losses = run_flax_steps(
        flax_model, keras_adamw(config.learning_rate, config.weight_decay), images, labels, 3)
    loss_difference = float(np.abs(np.subtract(flax_losses, keras_losses)).max())
    record("losses of 3 train steps", loss_difference, 1e-5)
    assert loss_difference <= 1e-5, (flax_losses, keras_losses)

    trained = harness.model_with(flax_model, state.params)
    differences = {keras_weight.ref.path:
                   np.abs(flax_weight.read() - keras_weight.read()).ravel()
                   for keras_weight, flax_weight in match(keras_structure(keras_model),
                                                          flax_structure(trained))}
    worst = max(differences, key=lambda name: differences[name].max())
    every_element = np.concatenate(list(differences.values()))
    median, tail = np.quantile(every_element, [0.5, 0.999])
    record("weights after 3 train steps", differences[worst].max(), 1e-4)
    record("weights after 3 train steps, median element", median, 1e-7)
    record("weights after 3 train steps, 99.9th percentile", tail, 2e-6)
    assert differences[worst].max() <= 1e-4, worst
    assert median < 1e-7 and tail < 2e-6

    # The trained Keras weights, saved as fit's checkpoints are (optimizer state included),
    # load into vit_flax unchanged.
    keras_model.save_weights(tmp_path / "trained.weights.h5")
    loaded = parity.load_keras_weights(tmp_path / "trained.weights.h5", config)
    for keras_weight, flax_weight in match(keras_structure(keras_model), flax_structure(loaded)):
        np.testing.assert_array_equal(flax_weight.read(), keras_weight.read())


def test_compare_trainings_vit_flax_side_is_vit_flax_train(tmp_path):
    """compare_training.train_flax (vit_flax's epochs without a workdir) gives the history
    vit_flax.train writes, bit for bit: the comparison measures the trainer users run."""
    from parity import compare_training
    from vit_flax import create_model, train
    from vit_flax.data import sources as data

    config = ViTConfig(num_classes=3, input_size=8, image_size=12, patch_size=4,
                       projection_dim=8, num_heads=2, transformer_layers=1,
                       mlp_head_units=(16, 8), batch_size=8, epochs=2)
    images = harness.random_images(40, 8)
    labels = np.arange(40, dtype=np.int32) % 3
    fit_part, validation = data.validation_split(data.Dataset(images, labels),
                                                 config.validation_split)
    history = compare_training.train_flax(create_model(config, images), config, fit_part,
                                          validation)
    splits = data.Splits(data.Dataset(images, labels), None, ("a", "b", "c"))
    train(config, splits, tmp_path / "run", log=lambda _: None, devices=jax.devices()[:1])
    written = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [{k: row[k] for k in ("val_accuracy", "val_loss", "accuracy")}
            for row in written] == history
