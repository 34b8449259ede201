"""The conversion API on Keras models: structure-based mapping, round trips, and errors.

Round trips compare with assert_array_equal: a conversion moves float32 arrays unchanged, so
anything short of bit-identical is a bug.
"""

from __future__ import annotations

import jax
import keras
import numpy as np
import pytest
from flax import nnx

import parity
from parity import keras_reference
from parity.convert import flax_structure, keras_structure, match
from parity.harness import SMALL, random_images
from vit_flax import ViT

MODEL_FIELDS = parity.convert.MODEL_FIELDS


@pytest.fixture(scope="module")
def small_keras():
    return keras_reference.build_keras_vit(SMALL, adapt_images=random_images(64, seed=3))


def keras_arrays(model) -> list[np.ndarray]:
    return [w.read() for layer in keras_structure(model).layers() for w in layer.weights]


def flax_arrays(model: ViT) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model))]


def test_every_weight_is_copied_unchanged(small_keras):
    flax_model = parity.keras_to_flax(small_keras, SMALL)
    pairs = match(keras_structure(small_keras), flax_structure(flax_model))
    # Normalization 3 + PatchEncoder 3 + 16 per block + head LN 2 + 3 Dense x 2.
    assert len(pairs) == 3 + 3 + 16 * SMALL.transformer_layers + 2 + 6
    for keras_weight, flax_weight in pairs:
        np.testing.assert_array_equal(flax_weight.read(), keras_weight.read())
    statistics = flax_model.data_augmentation.normalization
    normalization = parity.convert.classify_keras_layers(small_keras).normalization[0]
    np.testing.assert_array_equal(statistics.mean[...], normalization.adapt_mean.numpy())
    assert statistics.count[...].dtype == np.int32


def test_config_is_read_off_the_keras_model(small_keras):
    implied = parity.config_from_keras(small_keras)
    assert {f: getattr(implied, f) for f in MODEL_FIELDS} == \
           {f: getattr(SMALL, f) for f in MODEL_FIELDS}
    no_config = parity.keras_to_flax(small_keras)
    for ours, theirs in zip(flax_arrays(no_config), flax_arrays(parity.keras_to_flax(
            small_keras, SMALL)), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_mapping_ignores_layer_names():
    # Two throwaway models first: this one's auto-names are all shifted (dense_27, ...).
    for _ in range(2):
        keras_reference.build_keras_vit(SMALL)
    keras_model = keras_reference.build_keras_vit(SMALL, adapt_images=random_images(8))
    first_block_dense = parity.convert.classify_keras_layers(keras_model).denses[0]
    assert first_block_dense.name != "dense_1"
    images = random_images(3, seed=5)
    logits = parity.keras_to_flax(keras_model)(images)
    np.testing.assert_allclose(np.asarray(logits), keras_model.predict(images, verbose=0),
                               rtol=0, atol=1e-5)


def test_round_trip_keras_flax_keras_is_bit_identical(small_keras):
    flax_model = parity.keras_to_flax(small_keras)
    other = keras_reference.build_keras_vit(SMALL)  # Fresh random weights, unadapted.
    parity.flax_to_keras(flax_model, other)
    for ours, theirs in zip(keras_arrays(other), keras_arrays(small_keras), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # Same graph, same weights: the same logits to the bit, Normalization included (its
    # statistics are cached at finalize_state; a stale cache would show here).
    images = random_images(2, seed=9)
    np.testing.assert_array_equal(other.predict(images, verbose=0),
                                  small_keras.predict(images, verbose=0))


def test_round_trip_flax_keras_flax_is_bit_identical(small_keras):
    flax_model = ViT(SMALL, rngs=nnx.Rngs(3))
    flax_model.data_augmentation.normalization.mean[...] = np.float32([1.5, 2.5, 3.5])
    flax_model.data_augmentation.normalization.count[...] = np.int32(12)
    keras_model = keras_reference.build_keras_vit(SMALL)
    back = parity.keras_to_flax(parity.flax_to_keras(flax_model, keras_model))
    for ours, theirs in zip(flax_arrays(back), flax_arrays(flax_model), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("change, expected", [
    # One block fewer: a count mismatch that names the first layer without a counterpart.
    (dict(transformer_layers=1),
     r"2 transformer blocks.*has 1 .*Keras layer 'query' of 'multi_head_attention_?\d*' "
     r"\[kernel \(64, 4, 64\)"),
    # Same number of layers, one width differs: the layer and both shapes.
    (dict(mlp_head_units=(64, 48)),
     r"Keras layer 'dense_\d+' kernel has shape \(64, 32\).*head.mlp.dense\[1\] kernel has "
     r"shape \(64, 48\)"),
    (dict(num_classes=7), r"kernel has shape \(32, 10\).*head.logits kernel has shape \(32, 7\)"),
    (dict(mlp_head_units=(64, 32, 16)), r"head layers"),
    # Not visible in any shape: the setting itself is named.
    (dict(layer_norm_epsilon=1e-3), r"config.layer_norm_epsilon=0.001, Keras 1e-06"),
    (dict(rotation_factor=0.1), r"config.rotation_factor=0.1, Keras 0.02"),
])
def test_another_config_is_an_error(small_keras, change, expected):
    with pytest.raises(parity.WeightMismatchError, match=expected):
        parity.keras_to_flax(small_keras, SMALL.replace(**change))


def test_failed_flax_to_keras_writes_nothing(small_keras):
    before = keras_arrays(small_keras)
    wider = ViT(SMALL.replace(mlp_head_units=(64, 48)), rngs=nnx.Rngs(0))
    with pytest.raises(parity.WeightMismatchError, match=r"\(64, 32\).*\(64, 48\)"):
        parity.flax_to_keras(wider, small_keras)
    for ours, theirs in zip(keras_arrays(small_keras), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_an_extra_layer_with_weights_is_an_error():
    base = keras_reference.build_keras_vit(SMALL)
    extra = keras.layers.Dense(5)(base.output)  # A 4th head Dense the config does not have.
    expected = r"5 head layers.*has 4 .*Keras layer 'dense_\d+' \[kernel \(10, 5\)"
    with pytest.raises(parity.WeightMismatchError, match=expected):
        parity.keras_to_flax(keras.Model(base.inputs, extra), SMALL)
