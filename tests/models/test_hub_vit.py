"""The standard ViT (vit_flax.models.hub_vit) on its own: sizes, layouts, modes, configuration,
and the position-embedding resampler. Its parity with keras_hub is parity/test_keras_hub.py's."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.ndimage
from flax import nnx

from vit_flax.config import ConfigError
from vit_flax.models.factory import abstract_model
from vit_flax.models.hub_vit import (
    SIZES,
    ViTHub,
    ViTHubConfig,
    conv_kernel_init,
    count_params,
    resample_posemb,
)

# Measured with keras_hub 0.32.0 (Keras 3.15.1, JAX backend): count_params() of
# ViTBackbone(image_shape=(224, 224, 3), **size) and of ViTImageClassifier(that backbone,
# num_classes=1000). The backbones of B/16 and L/16 are also the "params" of Keras Hub's
# vit_base_patch16_224 / vit_large_patch16_224 presets.
KERAS_HUB_PARAMS = {
    "vit-ti16": (5_524_416, 5_717_416),
    "vit-s16": (21_665_664, 22_050_664),
    "vit-b16": (85_798_656, 86_567_656),
    "vit-b32": (87_455_232, 88_224_232),
    "vit-l16": (303_301_632, 304_326_632),
}

SMALL = ViTHubConfig(image_shape=(16, 24, 3), patch_size=8, num_layers=2, num_heads=2,
                     hidden_dim=8, mlp_dim=12, num_classes=3)


def random_images(config: ViTHubConfig, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, *config.image_shape)).astype(
        np.float32)


# The base and large sizes take seconds each to trace: `slow`, out of the quick tier.
@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] * (
    name in ("vit-b16", "vit-b32", "vit-l16"))) for name in SIZES])
def test_named_sizes_have_keras_hubs_parameter_counts(name):
    """train.py's --model <name>, the Keras Hub classifier it holds and that classifier's
    backbone: one abstract model per size (vit-l16's takes ~10 s to trace), counted three
    times."""
    from vit_flax import ViTConfig

    backbone, classifier = KERAS_HUB_PARAMS[name]
    model = abstract_model(ViTConfig.recipe("keras", model=name, num_classes=1000))
    assert type(model).__name__ == "StandardViT"
    assert model.vit.config == ViTHubConfig.named(name, num_classes=1000)
    # The Normalization's statistics are not trained parameters, as in Keras.
    assert count_params(model) == count_params(model.vit) == classifier
    assert count_params(model.vit.backbone) == backbone


def test_a_hub_vit_without_classes_is_its_backbone():
    config = ViTHubConfig.named("vit-ti16")
    assert config.num_classes is None
    model = abstract_model(config)
    assert not hasattr(model, "predictions") and not hasattr(model, "pre_logits")
    assert count_params(model) == count_params(model.backbone) == KERAS_HUB_PARAMS["vit-ti16"][0]


def test_patch_embedding_is_the_keras_conv2d():
    """A Dense on model.patches' flattened patches, its kernel the Conv2D's (p, p, C, D)
    reshaped: exactly what Conv2D(kernel_size=p, strides=p, padding="valid") computes."""
    model = ViTHub(SMALL, rngs=nnx.Rngs(0))
    embedding = model.backbone.vit_patching_and_embedding
    kernel = embedding.patch_embedding.kernel[...].reshape(8, 8, 3, 8)
    x = random_images(SMALL)
    conv = jax.lax.conv_general_dilated(x, kernel, (8, 8), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = conv.reshape(2, -1, 8) + embedding.patch_embedding.bias[...]
    tokens = embedding(x)
    np.testing.assert_allclose(tokens[:, 1:] - embedding.position_embedding.embedding[1:],
                               conv, atol=1e-6)


def test_patch_kernel_is_drawn_with_the_conv_fans():
    # Keras' Conv2D glorot_uniform: limit sqrt(6 / (p*p*C + p*p*D)), not the Dense's.
    kernel = conv_kernel_init(16, 3)(jax.random.key(0), (768, 768))
    limit = np.sqrt(6 / (16 * 16 * 3 + 16 * 16 * 768))
    assert kernel.shape == (768, 768)
    assert limit * 0.99 < np.abs(kernel).max() <= limit


def test_without_biases_and_class_token_there_are_none():
    config = SMALL.replace(use_mha_bias=False, use_mlp_bias=False, use_patch_bias=False,
                           use_class_token=False)
    model = abstract_model(config)
    embedding = model.backbone.vit_patching_and_embedding
    block = model.backbone.vit_encoder.transformer_blocks[0]
    assert embedding.patch_embedding.bias is None and not hasattr(embedding, "class_token")
    assert embedding.position_embedding.embedding.shape == (6, 8)  # 2 x 3 patches.
    assert all(getattr(block.mha, part).bias is None
               for part in ("query", "key", "value", "attention_output"))
    assert block.mlp.dense_1.bias is None and block.mlp.dense_2.bias is None
    # Patch bias, class token and its position; per block the q/k/v, output and MLP biases.
    assert count_params(model) == count_params(abstract_model(SMALL)) - (
        8 + 8 + 8 + 2 * (3 * 8 + 8 + 12 + 8))
    x = random_images(config)
    np.testing.assert_array_equal(ViTHub(config, rngs=nnx.Rngs(0))(x).shape, (2, 3))


def test_outputs_by_head():
    x = random_images(SMALL)
    tokens = ViTHub(SMALL.replace(num_classes=None), rngs=nnx.Rngs(0))(x)
    assert tokens.shape == (2, 7, 8)  # The class token and 2 x 3 patches.
    probabilities = ViTHub(SMALL.replace(activation="softmax", pooling="gap",
                                         intermediate_dim=5), rngs=nnx.Rngs(0))(x)
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)


def test_train_mode_draws_dropout_and_inference_does_not():
    config = SMALL.replace(dropout_rate=0.2, attention_dropout=0.2, head_dropout=0.2)
    model, x = ViTHub(config, rngs=nnx.Rngs(0)), random_images(config)
    inference = model(x)
    np.testing.assert_array_equal(model(x), inference)
    first = model(x, train=True, rngs=nnx.Rngs(dropout=1))
    assert not np.allclose(first, inference)
    np.testing.assert_array_equal(model(x, train=True, rngs=nnx.Rngs(dropout=1)), first)
    with pytest.raises(ValueError, match="rngs"):
        model(x, train=True)
    # Without any dropout rate, training computes what inference does.
    plain = ViTHub(SMALL, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain(x, train=True, rngs=nnx.Rngs(dropout=1)), plain(x))


def test_converter_scaling_is_the_first_step():
    config = SMALL.replace(scale=(1 / 255, 2 / 255, 0.5), offset=-1.0)
    model = ViTHub(config, rngs=nnx.Rngs(0))
    raw = np.random.default_rng(3).integers(0, 256, (2, *config.image_shape), dtype=np.uint8)
    expected = raw * np.float32([1 / 255, 2 / 255, 0.5]) - 1.0
    np.testing.assert_allclose(model.preprocess(raw), expected, rtol=1e-6)
    unscaled = ViTHub(SMALL, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model(raw), unscaled(expected), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(batch, 16, 24, 3\), got \(2, 24, 16, 3\)"):
        model(raw.transpose(0, 2, 1, 3))


@pytest.mark.parametrize("change, expected", [
    (dict(image_shape=(20, 24, 3)), "not divisible by patch_size"),
    (dict(num_layers=0), "positive integers"),
    (dict(intermediate_dim=-1), "positive integers"),
    (dict(pooling="max"), "pooling must be one of"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(dropout_rate=1.0), r"dropout rates must be in \[0, 1\)"),
    (dict(scale=(1.0, 2.0)), "scale has 2 values for 3 channels"),
])
def test_bad_configs_are_config_errors(change, expected):
    with pytest.raises(ConfigError, match=expected):
        SMALL.replace(**change)


def test_config_json_round_trip_and_named_sizes():
    config = SMALL.replace(scale=0.5, offset=(-1.0, 0.0, 1.0), intermediate_dim=4)
    assert config.scale == (0.5, 0.5, 0.5)
    assert ViTHubConfig.from_json(config.to_json()) == config
    assert config.input_shape == (16, 24, 3) and config.grid == (2, 3)
    assert ViTHubConfig.named("vit-b32", num_classes=10).patch_size == 32
    with pytest.raises(ConfigError, match="unknown ViT size 'vit-h14'"):
        ViTHubConfig.named("vit-h14")


# --- resample_posemb -------------------------------------------------------------------------

def test_resample_posemb_keeps_an_unchanged_grid():
    posemb = np.random.default_rng(0).normal(size=(197, 4)).astype(np.float32)
    assert resample_posemb(posemb, 14) is posemb


def test_resample_posemb_on_a_known_bilinear_case():
    # A class token and a 2 x 2 grid of 1-d embeddings [[0, 2], [4, 6]] to 3 x 3: the end
    # points stay, the new middle row/column are the averages of their neighbours.
    posemb = np.float32([[9], [0], [2], [4], [6]])
    resampled = resample_posemb(posemb, (3, 3))
    np.testing.assert_array_equal(resampled[0], [9])
    np.testing.assert_allclose(resampled[1:, 0].reshape(3, 3),
                               [[0, 1, 2], [2, 3, 4], [4, 5, 6]], atol=1e-6)


def test_resample_posemb_is_big_visions_scipy_zoom():
    rng = np.random.default_rng(1)
    grid = rng.normal(size=(7, 5, 3))
    posemb = np.concatenate([rng.normal(size=(1, 3)), grid.reshape(-1, 3)]).astype(np.float32)
    resampled = resample_posemb(posemb, (12, 4), old_grid=(7, 5))
    zoomed = scipy.ndimage.zoom(grid, (12 / 7, 4 / 5, 1), order=1)
    assert resampled.shape == (1 + 48, 3) and resampled.dtype == np.float32
    np.testing.assert_array_equal(resampled[0], posemb[0])
    np.testing.assert_allclose(resampled[1:], zoomed.reshape(-1, 3), atol=1e-5)
    no_token = resample_posemb(grid.reshape(-1, 3)[:25], 3)  # 5 x 5 inferred, no prefix.
    assert no_token.shape == (9, 3)


# --- StandardViT: the standard architecture as train.py trains it (--model vit-*) ---------
# (Each --model name's parameter counts: test_named_sizes_have_keras_hubs_parameter_counts.)

@pytest.mark.slow
def test_a_standard_vit_computes_its_keras_hub_vit_on_normalized_images():
    from vit_flax import ViTConfig, create_model

    config = ViTConfig(architecture="standard", num_classes=3, input_size=8, image_size=16,
                       patch_size=8, projection_dim=8, num_heads=2, transformer_layers=2,
                       head="gap", mlp_head_units=(6,), dropout=0.0, attention_dropout=0.0,
                       head_dropout=0.0)
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    model = create_model(config, images)
    assert model.vit.config.pooling == "gap" and model.vit.config.intermediate_dim == 6
    assert model.vit.config.mlp_dim == 32  # 4 x projection_dim, as every named size.
    normalized = model.data_augmentation(images, train=False, rngs=None)
    np.testing.assert_array_equal(model(images), model.vit(normalized))


@pytest.mark.parametrize("fields, expected", [
    (dict(head="flatten"), "takes head 'cls' or 'gap'"),
    (dict(mlp_head_units=(8, 4)), "at most one mlp_head_units"),
    (dict(stochastic_depth=0.1), "stochastic_depth 0"),
    (dict(projection_dim=10, num_heads=4), r"projection_dim \(10\) must be divisible"),
])
def test_what_the_standard_architecture_cannot_be_is_a_config_error(fields, expected):
    from vit_flax import ViTConfig

    base = dict(architecture="standard", head="cls", mlp_head_units=())
    with pytest.raises(ConfigError, match=expected):
        ViTConfig(**{**base, **fields})
    with pytest.raises(ConfigError, match="mlp_head_units must be positive integers"):
        ViTConfig(mlp_head_units=())  # Only the standard head may have no hidden Dense.
