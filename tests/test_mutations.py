"""Facts that a mutation pass showed no other test pins down (the project's issue 15).

Each test names the plausible bug it rules out; each was checked to fail with that bug
applied to the library and to pass without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, random_images
from flax import nnx

import vit_flax
from vit_flax.data import sources as data
from vit_flax.models import create_model
from vit_flax.models import seed_vit as model
from vit_flax.training import feeds, steps
from vit_flax.training.optim import keras_adamw

# The seed's LayerNormalization epsilon: `layers.LayerNormalization(epsilon=1e-6)`, three
# times in the keras-io example's create_vit_classifier (not vit_flax's config, whose default
# is what the test checks).
SEED_LAYER_NORM_EPSILON = 1e-6


# --- top-5 accuracy -------------------------------------------------------------------------

def test_top5_counts_a_label_only_when_at_most_four_logits_beat_it():
    # Distinct logits 6 > 5 > ... > 0: label k has exactly k logits above it. Keras'
    # in_top_k counts it while fewer than 5 are strictly greater, so labels 0..4 are in the
    # top 5, label 5 (strictly 6th) is not, label 6 neither. A `<= 5` rule admits label 5.
    logits = jnp.tile(jnp.arange(6.0, -1.0, -1.0), (7, 1))
    labels = jnp.arange(7)
    top5 = steps.per_example_metrics(logits, labels)["top-5-accuracy"]
    np.testing.assert_array_equal(top5, [1, 1, 1, 1, 1, 0, 0])


# --- the trainer's epoch orders -------------------------------------------------------------

@pytest.mark.slow
def test_each_epoch_trains_on_its_own_permutation(tmp_path, monkeypatch):
    # 16 images, validation_split 0.25: 12 train, 4 validate; 2 epochs of 2 steps of 8 (the
    # second padded). Every index row the training feed yields is recorded, so what is
    # compared is the rows the steps actually gathered, against epoch_order computed here.
    config = vit_flax.ViTConfig(**TINY, epochs=2, validation_split=0.25, seed=3)
    train_size = 12
    yielded = []  # Per call of DeviceFeed.batches: (its order, the index rows it yielded).
    original = feeds.DeviceFeed.batches

    def recording_batches(self, order, batch_size, start=0):
        rows: list[np.ndarray] = []
        yielded.append((np.array(order), rows))
        for batch in original(self, order, batch_size, start):
            rows.append(np.asarray(batch.index))
            yield batch

    monkeypatch.setattr(feeds.DeviceFeed, "batches", recording_batches)
    splits = data.from_arrays(random_images(16, 8, seed=1), np.arange(16) % 3,
                              random_images(5, 8, seed=2), np.arange(5) % 3)
    vit_flax.train(config, splits, tmp_path, log=lambda _: None, data_in="memory")

    # The other calls: the compile example (8 zeros), validation (4 rows), the test split (5).
    trained = [(order, np.concatenate(rows)) for order, rows in yielded
               if len(order) == train_size]
    assert len(trained) == config.epochs
    orders = [data.epoch_order(train_size, config.seed, epoch) for epoch in (1, 2)]
    for (order, rows), expected in zip(trained, orders, strict=True):
        np.testing.assert_array_equal(order, expected)
        np.testing.assert_array_equal(rows[rows >= 0], expected)  # Pads (-1) dropped.
    assert not np.array_equal(orders[0], orders[1])


# --- per-step randomness --------------------------------------------------------------------

@pytest.mark.slow
def test_each_step_draws_its_own_augmentation_and_dropout(tiny_config):
    # With a zero learning rate the weights never move, so two steps on the same batch
    # differ only by their random draws: step s uses step_rngs(rng, s, 0) (one pass, micro-
    # batch 0). Keys fixed at any one step would give two equal losses. TINY trains with
    # dropout (0.1 in the block, 0.5 in the head) and augmentation on.
    images = jnp.asarray(random_images(8, 8, seed=4))
    labels = jnp.arange(8) % tiny_config.num_classes
    graphdef, params, statistics = steps.split_model(create_model(tiny_config, images))
    tx = optax.sgd(0.0)  # ViTConfig requires learning_rate > 0; the step takes any tx.
    state = steps.TrainState.create(params, tx, tiny_config)

    @jax.jit
    def loss_sum(params, statistics, rng, step):
        logits = nnx.merge(graphdef, params, statistics)(
            images, train=True, rngs=steps.step_rngs(rng, step, 0))
        return jnp.sum(steps.per_example_metrics(logits, labels)["loss"])

    # Computed first: the train step donates the state (params and rng among it).
    expected = [float(loss_sum(params, statistics, state.rng, s)) for s in (0, 1)]
    train_step = steps.make_train_step(graphdef, tx, loss=steps.LossOptions.of(tiny_config))
    losses = []
    for _ in range(2):
        state, totals = train_step(state, statistics, steps.Totals.zero(), images, labels,
                                   jnp.arange(8))
        losses.append(float(totals.sums["loss"]))
    # Two differently compiled programs (the step's has the backward pass and remat) compute
    # the same forward pass: float32 round-off of a sum of 8 losses, measured 0 and 2.2e-7
    # relative (2 ulp); 1e-6 leaves room.
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    # Other dropout masks (rate 0.5 in the head) and augmentation: measured 16.38 and 8.83.
    assert abs(losses[0] - losses[1]) > 1e-3 * abs(losses[0])


# --- the head's dropout rate ----------------------------------------------------------------

def test_the_head_drops_its_flattened_tokens_at_head_dropout(monkeypatch):
    # Block dropout 0 and head dropout 0.5: the head's first Dropout (on the flattened
    # tokens, before its MLP) must zero half its inputs and double the rest.
    config = vit_flax.ViTConfig(**TINY, dropout=0.0, attention_dropout=0.0, head_dropout=0.5)
    calls = []  # (input, output) of every model.dropout call.
    original = model.dropout

    def recording_dropout(x, rate, keep):
        out = original(x, rate, keep)
        calls.append((np.asarray(x), np.asarray(out)))
        return out

    monkeypatch.setattr(model, "dropout", recording_dropout)
    net = create_model(config)
    tokens = jax.random.normal(jax.random.key(0), (64, config.num_patches, config.projection_dim))
    net.head(tokens, train=True, rngs=nnx.Rngs(dropout=2))
    features = config.num_patches * config.projection_dim  # 72: the flatten input.
    x, out = calls[0]
    assert x.shape == (64, features)
    dropped = out == 0
    # 4,608 independent elements: the fraction of zeros has a standard deviation of 0.0074
    # around the rate; 0.03 is 4 of them (measured 0.508). A head at config.dropout drops 0.
    assert abs(dropped.mean() - config.head_dropout) < 0.03
    # Kept elements are divided by 1 - 0.5: exact in float32.
    np.testing.assert_array_equal(out[~dropped], x[~dropped] * 2.0)


# --- AdamW: decay before the Adam step ------------------------------------------------------

def f32(value: float) -> float:
    """A hyperparameter as the optimizer holds it: a float32 constant."""
    return float(np.float32(value))


def keras_adamw_first_step(params, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-7):
    """Keras' AdamW, one step from fresh state, in float64 with Keras' float32 constants
    (Keras and optax both cast `1 - b2` and `b2` separately to float32; leaving that out is
    a systematic 6.4e-6 relative error of the step, larger than any arithmetic round-off):

        var -= var * wd * lr                  # the decay first, on the old value
        m = g * (1 - b1);  v = g^2 * (1 - b2)
        var -= m * lr * sqrt(1 - b2) / (1 - b1) / (sqrt(v) + eps)
    """
    p, g = np.asarray(params, np.float64), np.asarray(grads, np.float64)
    p = p - p * f32(wd) * f32(lr)
    m, v = g * f32(1 - b1), g * g * f32(1 - b2)
    alpha = f32(lr) * np.sqrt(1 - f32(b2)) / (1 - f32(b1))
    return p - m * alpha / (np.sqrt(v) + f32(eps))


def test_adamw_decays_the_old_value_before_the_adam_step():
    # Decaying after the Adam step (var -> (var - lr*d) * (1 - lr*wd)) differs from Keras'
    # order by lr^2 * wd * d, whatever the weight, while float32 round-off grows with the
    # weight: so the weights here are zero, as Keras initialises biases, where the result is
    # the step itself, -lr * d (|d| ~ 1 at step 1 for gradients >> eps). The recipe's lr
    # 1e-3 with the ViT paper's wd 0.1: the orders differ by lr^2 * wd = 1e-7, while the step
    # (~1e-3) rounds to ~3e-10 (measured 2.9e-10 over 100,000 weights: ~2.5 ulp of 1e-3).
    # The recipe's wd 1e-4 cannot be separated in one step: lr * wd = 1e-7 relative is about
    # one float32 ulp of the step.
    lr, wd = 1e-3, 0.1
    grads = np.random.default_rng(0).normal(size=100_000).astype(np.float32)
    params = np.zeros_like(grads)
    tx = keras_adamw(lr, wd)
    updates, _ = tx.update(jnp.asarray(grads), tx.init(params), jnp.asarray(params))
    got = np.asarray(optax.apply_updates(params, updates), np.float64)
    expected = keras_adamw_first_step(params, grads, lr, wd)
    tolerance = 5e-10  # The measured 2.9e-10 with room; 200x below the orders' 1e-7.
    assert np.abs(got - expected).max() < tolerance
    decayed_after = expected * (1 - f32(lr) * f32(wd))  # The other order, from 0.
    assert np.abs(decayed_after - expected).max() > 100 * tolerance


# --- LayerNorm epsilon ----------------------------------------------------------------------

LAYER_NORMS = {
    "block layer_norm_1": lambda net: net.blocks[0].layer_norm_1,
    "block layer_norm_2": lambda net: net.blocks[0].layer_norm_2,
    "head layer_norm": lambda net: net.head.layer_norm,
}


@pytest.mark.parametrize("where", LAYER_NORMS)
def test_layer_norms_use_the_seeds_epsilon(where):
    # Tokens of per-token variance ~1e-6 (1.7e-7 to 1.6e-6), where epsilon is as large as
    # the variance: at 1e-6 a variance of 1e-6 is scaled by 1/sqrt(2e-6) = 707, at 1e-5 by
    # 1/sqrt(1.1e-5) = 302, so outputs of magnitude ~1 move by ~0.5. The model is built
    # with the config's default epsilon.
    layer_norm = LAYER_NORMS[where](create_model(vit_flax.ViTConfig(**TINY)))
    keys = jax.random.split(jax.random.key(0), 3)
    dim = layer_norm.scale.shape[0]
    layer_norm.scale[...] = jax.random.uniform(keys[0], (dim,), minval=0.5, maxval=1.5)
    layer_norm.bias[...] = jax.random.normal(keys[1], (dim,)) * 0.1
    tokens = 1e-3 * jax.random.normal(keys[2], (4, 9, dim))
    x = np.asarray(tokens, np.float64)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = ((x - mean) / np.sqrt(var + SEED_LAYER_NORM_EPSILON)
                * np.asarray(layer_norm.scale[...], np.float64)
                + np.asarray(layer_norm.bias[...], np.float64))
    # float32 over 8 features on zero-mean tokens: a few ulp of outputs below ~2.4 (ulp
    # 2.4e-7), measured 1.9e-7; 1e-5 absolute leaves room. Epsilon 1e-5 moves them by 1.13.
    np.testing.assert_allclose(np.asarray(layer_norm(tokens)), expected, rtol=0, atol=1e-5)


# --- the second mutation pass (issue 24) ----------------------------------------------------

@pytest.mark.slow
def test_the_train_and_eval_steps_compute_the_label_smoothed_loss():
    # Mutant: the step ignores label_smoothing (cross_entropy alone is tested elsewhere).
    # Dropout off, zero rotation/zoom and mirror-symmetric images: the augmentation is an
    # identity, so the step's loss is the smoothed cross-entropy of the model's logits.
    config = vit_flax.ViTConfig(**TINY, label_smoothing=0.2, attention_dropout=0.0,
                                dropout=0.0, head_dropout=0.0, rotation_factor=0.0,
                                zoom_factor=0.0)
    half = random_images(8, 8, seed=3)[:, :, :4]
    images = jnp.asarray(np.concatenate([half, half[:, :, ::-1]], axis=2))
    labels = jnp.arange(8) % 3
    graphdef, params, statistics = steps.split_model(create_model(config, images))
    logits = nnx.merge(graphdef, params, statistics)(images)
    smoothed = float(jnp.mean(steps.cross_entropy(logits, labels, 0.2)))
    plain = float(jnp.mean(steps.cross_entropy(logits, labels)))
    assert abs(smoothed - plain) > 1e-3  # The test can tell the two apart.
    loss = steps.LossOptions.of(config)
    rows = jnp.arange(8, dtype=jnp.int32)
    evaluated = steps.make_eval_step(graphdef, loss=loss)(params, statistics,
                                                          steps.Totals.zero(), images, labels,
                                                          rows)
    tx = optax.sgd(0.0)
    train_step = steps.make_train_step(graphdef, tx, loss=loss)
    _, trained = train_step(steps.TrainState.create(params, tx, config), statistics,
                            steps.Totals.zero(), images, labels, rows)
    # float32 round-off of differently fused programs: 1e-5 relative.
    assert evaluated.means()["loss"] == pytest.approx(smoothed, rel=1e-5)
    assert trained.means()["loss"] == pytest.approx(smoothed, rel=1e-5)


@pytest.mark.parametrize("padding", [0, 4])
def test_the_strong_recipes_crop_is_taken_in_training(padding):
    # Mutant: the crop is never taken (every other test config has crop_padding=0). White
    # images, identity normalization, no resize, rotation or zoom: a crop of the zero-padded
    # image shows black borders, and only a crop does.
    config = vit_flax.ViTConfig(**{**TINY, "image_size": 8}, crop_padding=padding,
                                rotation_factor=0.0, zoom_factor=0.0)
    augmentation = model.DataAugmentation(config)
    images = jnp.full((8, 8, 8, 3), 255.0)
    out = augmentation(images, train=True, rngs=nnx.Rngs(augment=7))
    assert bool((out == 0).any()) == bool(padding)
    np.testing.assert_array_equal(augmentation(images, train=False, rngs=None), images)


@pytest.mark.slow
def test_sigterm_is_honoured_at_the_next_step_not_at_the_end_of_the_epoch(tmp_path,
                                                                        monkeypatch):
    # Mutant: the stop flag read only between epochs (the saved state is the same either
    # way, so only the number of steps taken after the signal tells).
    import os
    import signal

    batches = feeds.DeviceFeed.batches
    served = []

    def counting(self, order, batch_size, start=0):
        for i, batch in enumerate(batches(self, order, batch_size, start)):
            served.append(i)
            if i == 2 and order.size > 8:  # Training (not validation): 8 steps an epoch.
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(feeds.DeviceFeed, "batches", counting)
    config = vit_flax.ViTConfig(**TINY, epochs=1, validation_split=0.0)
    splits = data.from_arrays(random_images(64, 8), np.arange(64) % 3)
    with pytest.raises(vit_flax.Interrupted, match="SIGTERM: stopped in epoch 1"):
        vit_flax.train(config, splits, tmp_path, log=lambda _: None)
    # The signal came while batch 2 was being served (after the compile's example batch 0):
    # the loop stops before stepping on it, and fetches nothing more of the 8.
    assert served == [0, 0, 1, 2]
