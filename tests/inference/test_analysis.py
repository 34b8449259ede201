"""features and attention_maps (vit_flax.inference.analysis) on the standard ViT and the
seed's ViT."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, random_images
from flax import nnx

from vit_flax import ViT, ViTConfig
from vit_flax.inference import analysis as research
from vit_flax.models.hub_vit import ViTHub, ViTHubConfig

HUB = ViTHubConfig(image_shape=(16, 16, 3), patch_size=8, num_layers=3, num_heads=2,
                   hidden_dim=8, mlp_dim=12, num_classes=4, intermediate_dim=6)


@pytest.fixture(scope="module", params=["hub", "seed"])
def model_and_images(request):
    if request.param == "hub":
        return ViTHub(HUB, rngs=nnx.Rngs(0)), random_images(2, 16).astype(np.float32) / 128 - 1
    # The seed's "cls" head: a class token, 9 patches.
    return ViT(ViTConfig(**TINY, head="cls"), rngs=nnx.Rngs(0)), random_images(2, 8)


def test_attention_maps_shapes_and_rows(model_and_images):
    model, images = model_and_images
    maps = research.attention_maps(model, images)
    tokens, heads, blocks = (5, 2, 3) if isinstance(model, ViTHub) else (10, 2, 1)
    assert [p.shape for p in maps.probabilities] == [(2, heads, tokens, tokens)] * blocks
    assert maps.rollout.shape == (2, tokens, tokens)
    for probabilities in maps.probabilities:
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(maps.rollout.sum(-1), 1.0, rtol=1e-6)
    assert (np.asarray(maps.rollout) >= 0).all()


def test_the_probabilities_are_the_ones_the_attention_uses(model_and_images):
    """probabilities @ values through the output projection is the attention's own output."""
    model, images = model_and_images
    x, blocks = research._tokens_and_blocks(model, jnp.asarray(images))
    _, norm, attention = blocks[0]
    normed = norm(x)
    probabilities = research.attention_probabilities(attention, normed)
    attended = jnp.einsum("bhqk,bkhd->bqhd", probabilities, attention.value(normed))
    np.testing.assert_allclose(attention.attention_output(attended),
                               attention(normed, keep=None), atol=1e-6)


def test_features_are_what_the_logits_dense_reads(model_and_images):
    model, images = model_and_images
    features = research.features(model, images)
    last = model.predictions if isinstance(model, ViTHub) else model.head.logits
    assert features.shape == (2, 6 if isinstance(model, ViTHub) else TINY["mlp_head_units"][-1])
    np.testing.assert_allclose(last(features), model(images), atol=1e-6)
    assert isinstance(last, nnx.Linear)  # The model itself is left as it was.


def test_backbone_features_are_the_class_token():
    model = ViTHub(HUB.replace(num_classes=None, intermediate_dim=None), rngs=nnx.Rngs(0))
    images = random_images(2, 16).astype(np.float32)
    np.testing.assert_array_equal(research.features(model, images), model(images)[:, 0])


def test_rollout_of_a_hand_computed_two_block_example():
    # Block 1: heads [[1, 0], [.5, .5]] and [[0, 1], [.5, .5]] average to all 0.5; plus the
    # identity and renormalised: [[.75, .25], [.25, .75]]. Block 2: both heads [[1, 0],
    # [1, 0]]; plus the identity [[2, 0], [1, 1]] / 2 = [[1, 0], [.5, .5]]. The rollout is
    # block 2's times block 1's: [[.75, .25], [.5, .5]].
    first = jnp.asarray([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]])
    second = jnp.asarray([[[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]]])
    np.testing.assert_allclose(research.attention_rollout([first, second]),
                               [[[0.75, 0.25], [0.5, 0.5]]], atol=1e-7)
    np.testing.assert_allclose(research.attention_rollout([first]),
                               [[[0.75, 0.25], [0.25, 0.75]]], atol=1e-7)


def test_heatmaps_are_the_class_tokens_rollout_row_over_the_patches(model_and_images):
    model, images = model_and_images
    heatmaps = research.attention_heatmaps(model, images)
    grid = (2, 2) if isinstance(model, ViTHub) else (3, 3)
    assert heatmaps.shape == (2, *grid)
    row = research.attention_maps(model, images).rollout[:, 0, 1:]  # Class token first.
    np.testing.assert_allclose(heatmaps.reshape(2, -1), row / row.sum(-1, keepdims=True),
                               rtol=1e-6)


def test_heatmaps_without_a_class_token_average_every_tokens_row():
    model = ViT(ViTConfig(**TINY), rngs=nnx.Rngs(0))  # The seed's flatten head: 9 patches.
    images = random_images(3, 8)
    rollout = research.attention_maps(model, images).rollout
    heatmaps = research.attention_heatmaps(model, images)
    np.testing.assert_allclose(heatmaps.reshape(3, 9), rollout.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(heatmaps.sum(axis=(1, 2)), 1.0, rtol=1e-6)
