"""The model's structure: exact parameter counts, Keras' weight layout, shapes, modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_images
from flax import nnx

import vit_flax
from vit_flax.models.seed_vit import NormalizationStatistic, ViT, dropout, dropout_masks, patches


def count(model, kind) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, kind)))


@pytest.mark.parametrize("head, trainable", [
    # Keras' count_params() of the seed model: 21,759,012 trainable.
    ("flatten", 21_759_012),
    # GlobalAveragePooling1D: the first head Dense sees 64 features, not 144 * 64.
    ("gap", 21_759_012 - 9216 * 2048 + 64 * 2048),
    # gap + a class token (64) + one more position (64).
    ("cls", 21_759_012 - 9216 * 2048 + 64 * 2048 + 128),
])
def test_parameter_count_of_each_head(head, trainable):
    model = nnx.eval_shape(lambda: ViT(vit_flax.ViTConfig(head=head), rngs=nnx.Rngs(0)))
    assert count(model, nnx.Param) == trainable
    # Normalization's mean (3), variance (3) and count (1): Keras' 21,759,019 - 21,759,012.
    assert count(model, NormalizationStatistic) == 7


def test_parameter_count_of_the_strong_recipe():
    # 4x4x3 patches -> 64 (3,136), 64 positions (4,096), 5 blocks of 83,200 (the seed's
    # block: its 8 make 665,600), the final LayerNorm (128), the seed's head over 64 * 64
    # flattened features: 4096 -> 2048 (8,390,656), 2048 -> 1024 (2,098,176), 1024 -> 100.
    config = vit_flax.ViTConfig.recipe("strong")
    model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
    assert count(model, nnx.Param) == 3136 + 4096 + 5 * 83_200 + 128 + 8_390_656 + 2_098_176 \
        + 102_500 == 11_014_692


def test_weights_have_the_keras_layout():
    model = nnx.eval_shape(lambda: ViT(vit_flax.ViTConfig(), rngs=nnx.Rngs(0)))
    shape = lambda variable: tuple(variable.shape)  # noqa: E731
    assert len(model.blocks) == 8
    block = model.blocks[0]
    assert shape(model.patch_encoder.projection.kernel) == (108, 64)
    assert shape(model.patch_encoder.position_embedding.embedding) == (144, 64)
    for projection in (block.attention.query, block.attention.key, block.attention.value):
        assert shape(projection.kernel) == (64, 4, 64)  # EinsumDense "abc,cde->abde"
        assert shape(projection.bias) == (4, 64)
    assert shape(block.attention.attention_output.kernel) == (4, 64, 64)
    assert shape(block.attention.attention_output.bias) == (64,)
    assert [shape(d.kernel) for d in block.mlp.dense] == [(64, 128), (128, 64)]
    assert [shape(d.kernel) for d in model.head.mlp.dense] == [(9216, 2048), (2048, 1024)]
    assert shape(model.head.logits.kernel) == (1024, 100)


def test_initialisers_follow_keras():
    model = ViT(vit_flax.ViTConfig(), rngs=nnx.Rngs(0))
    table = np.asarray(model.patch_encoder.position_embedding.embedding[...])
    assert table.min() >= -0.05 and table.max() <= 0.05  # Embedding: U(-0.05, 0.05)
    kernel = np.asarray(model.blocks[0].attention.query.kernel[...])
    # glorot_uniform with fan_in 64, fan_out 4 * 64: limit sqrt(6 / 320).
    limit = np.sqrt(6 / 320)
    assert kernel.min() >= -limit and kernel.max() <= limit
    assert abs(kernel.std() - limit / np.sqrt(3)) < 0.02 * limit  # 16,384 draws: ~0.6% noise
    assert not np.any(model.blocks[0].attention.query.bias[...])


def test_patches_order_matches_extract_patches():
    images = jnp.arange(2 * 12 * 12 * 3, dtype=jnp.float32).reshape(2, 12, 12, 3)
    result = np.asarray(patches(images, 4))
    assert result.shape == (2, 9, 48)
    expected = np.stack([
        np.asarray(images[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4, :]).reshape(-1)
        for b in range(2) for r in range(3) for c in range(3)]).reshape(2, 9, 48)
    np.testing.assert_array_equal(result, expected)  # A reshape: exact.


@pytest.mark.slow
@pytest.mark.parametrize("head", ["flatten", "gap", "cls"])
def test_logits_shape_and_modes(tiny_config, head):
    model = ViT(tiny_config.replace(head=head), rngs=nnx.Rngs(0))
    images = jnp.asarray(random_images(4, 8))
    logits = model(images)
    assert logits.shape == (4, 3)
    np.testing.assert_array_equal(logits, model(images))  # Inference is deterministic.
    # uint8 and the same values as float32 give the same logits (Normalization casts).
    np.testing.assert_array_equal(logits, model(images.astype(jnp.float32)))
    train_a = model(images, train=True, rngs=nnx.Rngs(augment=1, dropout=2))
    train_b = model(images, train=True, rngs=nnx.Rngs(augment=1, dropout=2))
    train_c = model(images, train=True, rngs=nnx.Rngs(augment=3, dropout=4))
    np.testing.assert_array_equal(train_a, train_b)  # The keys decide all randomness.
    assert not np.allclose(train_a, train_c)
    assert not np.allclose(train_a, logits)


def test_dropout_keeps_each_element_with_probability_one_minus_rate():
    specs = [((200, 50), 0.1), ((100, 100), 0.5), ((7,), 0.0), ((10_000,), 0.5)]
    tenth, half, none, other_half = dropout_masks(nnx.Rngs(dropout=0), True, specs)
    assert none is None and tenth.shape == (200, 50) and tenth.dtype == jnp.bool_
    # 10,000 independent draws each: the kept fraction within 5 standard deviations.
    for mask, rate in ((tenth, 0.1), (half, 0.5), (other_half, 0.5)):
        assert abs(float(mask.mean()) - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / 1e4)
    # Two masks of one draw are different bits: they agree on ~half of their elements.
    agreement = float(jnp.mean(half.reshape(-1) == other_half))
    assert abs(agreement - 0.5) < 5 * np.sqrt(0.25 / 1e4)
    # Kept elements are scaled by 1 / (1 - rate), as keras.layers.Dropout does.
    dropped = np.asarray(dropout(jnp.ones((200, 50)), 0.1, tenth))
    np.testing.assert_allclose(np.unique(dropped), [0.0, 1 / 0.9], rtol=1e-7)
    assert all(mask is None for mask in dropout_masks(None, False, specs))
    np.testing.assert_array_equal(dropout(jnp.ones(3), 0.5, None), jnp.ones(3))


def test_model_rejects_wrong_inputs(tiny_config):
    model = ViT(tiny_config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\(batch, 8, 8, 3\), got \(4, 9, 8, 3\)"):
        model(jnp.zeros((4, 9, 8, 3)))
    with pytest.raises(ValueError, match="needs rngs"):
        model(jnp.zeros((4, 8, 8, 3)), train=True)


def test_predict_batches_and_checks_inputs(tiny_config):
    model = ViT(tiny_config, rngs=nnx.Rngs(0))
    images = random_images(11, 8)
    expected = np.asarray(model(jnp.asarray(images)))
    # Batches of 4 (the last padded) give the one-call logits; XLA may fuse the two
    # programs differently, hence float32 round-off tolerance.
    np.testing.assert_allclose(vit_flax.predict(model, images, batch_size=4), expected,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 3\), got \(11, 8, 8\)"):
        vit_flax.predict(model, images[..., 0])
    with pytest.raises(ValueError, match="uint8 or float images, got int64"):
        vit_flax.predict(model, images.astype(np.int64))


@pytest.mark.parametrize("changes, message", [
    (dict(image_size=70), "divisible by patch_size"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(head="pool"), "head must be one of"),
    (dict(epochs=-1), "epochs must be >= 0"),
    (dict(mlp_head_units=()), "mlp_head_units"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(microbatch_size=100), r"multiple of microbatch_size \(100\); e.g. "
                                r"microbatch_size=64, or microbatch_size=256 for one pass"),
    (dict(microbatch_size=0), "microbatch_size must be a positive integer"),
])
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(vit_flax.ConfigError, match=message):
        vit_flax.ViTConfig(**changes)


def test_config_round_trips_through_json():
    config = vit_flax.ViTConfig(head="gap", mlp_head_units=(32, 16))
    assert vit_flax.ViTConfig.from_json(config.to_json()) == config
    assert config.num_patches == 144 and config.transformer_units == (128, 64)
