"""Layer by layer, seed config, inference: each vit_flax module on the input Keras gave its
Keras counterpart, so an error shows where it starts instead of accumulating.

Tolerances (float32, CPU):
- preprocessing (Normalization + Resizing) and Patches: exact. Both sides run the same jnp
  ops (jax.image.resize; extract_patches is an identity-kernel convolution, exact in float32
  on the CPU, against a reshape). Measured 0.0.
- PatchEncoder: 1e-6 absolute on outputs of magnitude ~3.6 (ulp 2.4e-7): one 108-term dot
  product per output. Measured 0.0 (same XLA dot on both sides).
- transformer blocks: 1e-5 absolute on outputs of magnitude up to ~8.4 (ulp 9.5e-7), i.e.
  ~10 ulp. Keras scales the query then runs two einsums; vit_flax the same math through
  nnx.LinearGeneral and its own einsums, so sums are rounded in different orders. Measured
  worst 1.43e-6 (block 1), 1.5 ulp.
- head: 1e-5 absolute on logits of magnitude ~2.4: the 9216-term first Dense is the longest
  sum in the model. Measured 1.55e-6.
- LayerNorm epsilon: tokens of variance ~1e-6 against Keras at the seed's epsilon, 1e-5
  absolute on outputs of magnitude ~3 (ulp 2.4e-7). Measured 4.8e-7; the wrong epsilon 1e-5
  moves them by O(1).
"""

from __future__ import annotations

import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

from parity.convert import classify_keras_layers
from parity.harness import random_images
from vit_flax import ViT, ViTConfig
from vit_flax.models.seed_vit import patches

BLOCKS = 8
# The seed's `layers.LayerNormalization(epsilon=1e-6)` (create_vit_classifier, three times).
# Written here, not read from ViTConfig: keras_reference builds its Keras model with the
# config's epsilon, so the model tests above cannot see a wrong default.
SEED_LAYER_NORM_EPSILON = 1e-6


@pytest.fixture(scope="module")
def keras_activations(seed_models):
    """Every layer boundary of the Keras model, from one call with training=False."""
    keras_model, _ = seed_models
    encoder = classify_keras_layers(keras_model).patch_encoder[0]
    # The layer feeding PatchEncoder is the seed's Patches, whatever its class is called.
    patches_layer = next(layer for layer in keras_model.layers if layer.output is encoder.input)
    adds = [layer for layer in keras_model.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == 2 * BLOCKS  # Two residual Adds per block; the second ends it.
    names = ["images", "preprocessed", "patches", "encoded",
             *(f"block_{i}" for i in range(BLOCKS)), "logits"]
    tensors = [patches_layer.input, patches_layer.output, encoder.output,
               *(adds[2 * i + 1].output for i in range(BLOCKS)), keras_model.output]
    probe = keras.Model(keras_model.inputs, tensors)
    images = random_images(4, seed=11)
    outputs = [np.asarray(x) for x in probe([images], training=False)]
    return dict(zip(names, [images, *outputs], strict=True))


def test_preprocessing_is_exact(seed_models, keras_activations):
    _, flax_model = seed_models
    ours = flax_model.data_augmentation(jnp.asarray(keras_activations["images"]), train=False,
                                        rngs=None)
    np.testing.assert_array_equal(np.asarray(ours), keras_activations["preprocessed"])


def test_patches_are_exact(seed_models, keras_activations):
    _, flax_model = seed_models
    ours = patches(jnp.asarray(keras_activations["preprocessed"]), flax_model.config.patch_size)
    np.testing.assert_array_equal(np.asarray(ours), keras_activations["patches"])


def check(record, what: str, ours, expected: np.ndarray, tolerance: float) -> None:
    difference = float(np.abs(np.asarray(ours) - expected).max())
    record(what, difference, tolerance)
    assert difference <= tolerance, f"{what}: max |difference| {difference:.3g}"


def test_patch_encoder(seed_models, keras_activations, record):
    _, flax_model = seed_models
    ours = flax_model.patch_encoder(jnp.asarray(keras_activations["patches"]))
    check(record, "PatchEncoder", ours, keras_activations["encoded"], 1e-6)


@pytest.mark.parametrize("index", range(BLOCKS))
def test_transformer_block(seed_models, keras_activations, index, record):
    _, flax_model = seed_models
    block_input = keras_activations["encoded" if index == 0 else f"block_{index - 1}"]
    ours = flax_model.blocks[index](jnp.asarray(block_input), train=False, rngs=None)
    check(record, f"transformer block {index}", ours, keras_activations[f"block_{index}"], 1e-5)


def test_head(seed_models, keras_activations, record):
    _, flax_model = seed_models
    tokens = jnp.asarray(keras_activations[f"block_{BLOCKS - 1}"])
    ours = flax_model.head(tokens, train=False, rngs=None)
    check(record, "head (logits)", ours, keras_activations["logits"], 1e-5)


def test_layer_norms_use_the_seeds_epsilon(record):
    # Every LayerNorm of a default-config model (one block is enough: all are built alike)
    # against Keras' LayerNormalization at the seed's epsilon, with the same gamma and beta,
    # on zero-mean tokens of variance ~1e-6. There epsilon weighs as much as the variance:
    # 1e-6 normalizes by 1/sqrt(2e-6), 1e-5 by 1/sqrt(1.1e-5), 2.3x less, and the outputs
    # (magnitude up to ~3) move by O(1). float32 on both sides, 64-term reductions summed
    # in different orders: a few ulp (measured 4.8e-7 at worst), so 1e-5 absolute.
    config = ViTConfig(transformer_layers=1, mlp_head_units=(8,))
    flax_model = ViT(config, rngs=nnx.Rngs(0))
    layer_norms = {"block layer_norm_1": flax_model.blocks[0].layer_norm_1,
                   "block layer_norm_2": flax_model.blocks[0].layer_norm_2,
                   "head layer_norm": flax_model.head.layer_norm}
    rng = np.random.default_rng(5)
    tokens = (1e-3 * rng.normal(size=(2, config.num_patches, config.projection_dim))
              ).astype(np.float32)
    tolerance = 1e-5
    for name, layer_norm in layer_norms.items():
        gamma = rng.uniform(0.5, 1.5, config.projection_dim).astype(np.float32)
        beta = (0.1 * rng.normal(size=config.projection_dim)).astype(np.float32)
        layer_norm.scale[...], layer_norm.bias[...] = jnp.asarray(gamma), jnp.asarray(beta)
        ours = np.asarray(layer_norm(jnp.asarray(tokens)))
        outputs = {}
        for epsilon in (SEED_LAYER_NORM_EPSILON, 1e-5):
            keras_layer = keras.layers.LayerNormalization(epsilon=epsilon)
            keras_layer.build(tokens.shape)
            keras_layer.set_weights([gamma, beta])
            outputs[epsilon] = np.asarray(keras_layer(tokens))
        check(record, f"{name} at epsilon 1e-6", ours, outputs[SEED_LAYER_NORM_EPSILON],
              tolerance)
        # What the check separates: epsilon 1e-5 is far outside the tolerance.
        assert np.abs(outputs[1e-5] - outputs[SEED_LAYER_NORM_EPSILON]).max() > 1e4 * tolerance
