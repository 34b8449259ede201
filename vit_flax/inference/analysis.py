"""What a ViT sees: `features` (the pre-logits) and `attention_maps` (each block's attention
probabilities and their rollout), for the standard ViT (vit.ViTHub, vit.StandardViT) and the
seed's ViT.

Both run in inference mode. The attention probabilities are recomputed from each block's
query and key projections, on the input the model's own block gets (one extra pair of matmuls
per block), so that the attention in model.py needs no hook to hand them out.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax.inference.predict import check_images
from vit_flax.models.hub_vit import StandardViT, ViTHub
from vit_flax.models.seed_vit import ViT, patches


class AttentionMaps(NamedTuple):
    probabilities: list[jax.Array]  # Per block: (batch, heads, query token, key token).
    rollout: jax.Array  # (batch, tokens, tokens): attention_rollout of the probabilities.


class _Identity(nnx.Module):
    def __call__(self, x):
        return x


def features(model: ViT | StandardViT | ViTHub, images) -> jax.Array:
    """(batch, features): the vector the last Dense turns into logits.

    ViTHub (and a StandardViT's, after its input pipeline): the class token (or token mean)
    after the final LayerNorm, through "pre_logits" when it has one (also without a head).
    The seed's ViT: its head MLP's output.
    """
    images = _checked(model, images, "features")
    if isinstance(model, ViTHub):
        return model.pool(model.backbone(model.preprocess(images)))
    if isinstance(model, StandardViT):
        x = model.data_augmentation(images, train=False, rngs=None)
        return model.vit.pool(model.vit.backbone(x))
    # The seed's own forward pass with its logits Dense swapped for the identity, on a view
    # that shares the model's arrays (merge copies no array; the model is left unchanged).
    view = nnx.merge(*nnx.split(model))
    view.head.logits = _Identity()
    return view(images)


def attention_probabilities(attention, x: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(key_dim)) of a model.MultiHeadAttention on its input `x`:
    (batch, heads, query token, key token), float32."""
    query = attention.query(x) * attention.scale  # Keras scales the query first.
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, attention.key(x))
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


def _tokens_and_blocks(model: ViT | StandardViT | ViTHub, images: jax.Array):
    """The tokens the first block reads, and (block, its LayerNorm, its attention) each."""
    if isinstance(model, ViTHub | StandardViT):
        hub = model if isinstance(model, ViTHub) else model.vit
        x = (model.preprocess(images) if isinstance(model, ViTHub)
             else model.data_augmentation(images, train=False, rngs=None))
        tokens = hub.backbone.vit_patching_and_embedding(x)
        return tokens, [(b, b.ln_1, b.mha) for b in hub.backbone.vit_encoder.transformer_blocks]
    x = model.data_augmentation(images, train=False, rngs=None)
    tokens = model.patch_encoder(patches(x, model.config.patch_size))
    return tokens, [(b, b.layer_norm_1, b.attention) for b in model.blocks]


def attention_maps(model: ViT | StandardViT | ViTHub, images) -> AttentionMaps:
    """Every block's attention probabilities and their rollout (Abnar & Zuidema 2020)."""
    x, blocks = _tokens_and_blocks(model, jnp.asarray(images))
    probabilities = []
    for block, norm, attention in blocks:
        probabilities.append(attention_probabilities(attention, norm(x)))
        x = block(x, train=False, rngs=None)
    return AttentionMaps(probabilities, attention_rollout(probabilities))


def patch_grid(model: ViT | StandardViT | ViTHub) -> tuple[int, int]:
    """(rows, columns) of the patches the model's blocks see."""
    if isinstance(model, ViTHub):
        return model.config.grid
    if isinstance(model, StandardViT):
        return model.vit.config.grid
    side = model.config.image_size // model.config.patch_size
    return side, side


def attention_heatmaps(model: ViT | StandardViT | ViTHub, images) -> jax.Array:
    """(batch, rows, columns): how much each patch made of the model's output, by attention
    rollout. With a class token (the seed's "cls" head, a ViTHub with use_class_token) it is
    the class token's row, which is all the head reads; without one (flatten, gap) the mean
    of every token's row, since the head reads every token. Each map sums to 1 over the
    patches only (the class token's own share is left out). One compiled program (run op by
    op, the model's forward pass was ~60 small programs: ~1 s at the end of every run, ~3 s
    when none of them was compiled before)."""
    return _heatmaps(*nnx.split(model), _checked(model, images, "attention_heatmaps"))


def _checked(model, images, caller: str) -> jax.Array:
    """`images` as a JAX array, checked as predict checks its images (check_images)."""
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    check_images(model, images, caller)
    return jnp.asarray(images)


# jax.jit over the split model, not nnx.jit: flax 0.12.1 (the lowest version pyproject.toml
# admits) passes jax.jit an argument that jax 0.9.1 does not take.
@functools.partial(jax.jit, static_argnums=0)
def _heatmaps(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    rollout = attention_maps(model, images).rollout
    rows, columns = patch_grid(model)
    prefix = rollout.shape[-1] - rows * columns  # The class token, if any.
    contribution = rollout[:, 0] if prefix else rollout.mean(axis=1)
    patches_only = contribution[:, prefix:]
    patches_only = patches_only / patches_only.sum(axis=-1, keepdims=True)
    return patches_only.reshape(-1, rows, columns)


def attention_rollout(probabilities: list[jax.Array]) -> jax.Array:
    """Abnar & Zuidema's attention rollout: per block, the heads' mean plus the identity (the
    residual path), rows renormalised; then the product through the blocks, the last block's
    on the left. Row i: how much of token i's final representation each input token made."""
    rollout = None
    for block in probabilities:
        mixed = block.mean(axis=1) + jnp.eye(block.shape[-1], dtype=block.dtype)
        mixed = mixed / mixed.sum(axis=-1, keepdims=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout
