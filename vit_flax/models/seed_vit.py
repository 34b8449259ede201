"""The seed's Vision Transformer in Flax NNX, one module per Keras layer.

Attribute names mirror the Keras model (``patch_encoder.projection``,
``attention.query``, ``attention_output``, ``mlp.dense_1`` ...) so the Keras -> Flax weight
mapping reads as a table. The module imports nothing from data loading or training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vit_flax.config import ViTConfig
from vit_flax.models import augment

# Keras' initializers: Dense and EinsumDense kernels glorot_uniform, Embedding U(-0.05, 0.05).
glorot_uniform = nnx.initializers.xavier_uniform()


def keras_embedding_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-0.05, maxval=0.05)


def compute_dtype(config: ViTConfig):
    """The dtype of the matmuls; None keeps float32 inputs and weights as they are."""
    return None if config.dtype == "float32" else jnp.dtype(config.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """keras.activations.gelu: the exact (erf) form, not the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


DropoutSpec = tuple[tuple[int, ...], float]  # (shape of the input, rate)


def dropout_masks(rngs: nnx.Rngs | None, train: bool,
                  specs: Sequence[DropoutSpec]) -> list[jax.Array | None]:
    """Keep-masks for several dropouts, from one draw of random bits.

    An element is kept when its 32 random bits are >= rate * 2**32: with probability
    1 - rate (to 2**-32), each element on its own, as keras.layers.Dropout draws them. None
    (no dropout) when not training or for a rate of 0. One draw for all of a block's dropouts
    rather than one each: every draw inlines its own copy of the threefry hash, and each copy
    costs XLA:CPU ~0.1 s of compilation (measured: 24 draws in the seed's blocks, 2.4 s).
    The masks are tagged "dropout_mask" so that BLOCK_REMAT_POLICY keeps them (a byte per
    element) instead of the scaled outputs or a second draw in the backward pass.
    """
    sizes = [math.prod(shape) if train and rate > 0.0 else 0 for shape, rate in specs]
    if not any(sizes):
        return [None] * len(specs)
    bits = jax.random.bits(rngs.dropout(), (sum(sizes),), jnp.uint32)
    masks, start = [], 0
    for (shape, rate), size in zip(specs, sizes, strict=True):
        if not size:
            masks.append(None)
            continue
        threshold = np.uint32(min(round(rate * 2**32), 2**32 - 1))
        keep = bits[start:start + size].reshape(shape) >= threshold
        masks.append(checkpoint_name(keep, "dropout_mask"))
        start += size
    return masks


def dropout(x: jax.Array, rate: float, keep: jax.Array | None) -> jax.Array:
    """keras.layers.Dropout with a mask of dropout_masks: kept elements scaled by
    1 / (1 - rate), the others zeroed; the identity without a mask."""
    return x if keep is None else jnp.where(keep, x / (1.0 - rate), 0.0)


# What a transformer block keeps for its backward pass: the outputs of its matmuls (the
# attention inputs named, in the layout the attention uses), the attention probabilities and
# the dropout masks. The rest (layer norms, GELU, the scaled dropout outputs) is recomputed
# from those: elementwise work only. Plain autodiff keeps ~3 (batch, heads, tokens, tokens)
# float32 tensors per block instead of one (85 MB each for the seed at batch 256). Measured
# on the seed's train step, batch 256 in one pass: 3.0 GB of XLA temporaries instead of 4.0.
BLOCK_REMAT_POLICY = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(
        "query", "key", "value", "attention_probabilities", "attended", "dropout_mask"))


class NormalizationStatistic(nnx.Variable):
    """Adapted, never trained: Normalization's mean, variance and count."""


class Normalization(nnx.Module):
    """keras.layers.Normalization over the channel axis, adapted on the training images."""

    def __init__(self, channels: int):
        self.mean = NormalizationStatistic(jnp.zeros((channels,), jnp.float32))
        self.variance = NormalizationStatistic(jnp.ones((channels,), jnp.float32))
        # Keras keeps a `count` weight "for backwards compatibility"; it is the 7th statistic.
        self.count = NormalizationStatistic(jnp.zeros((), jnp.int32))

    def adapt(self, images: np.ndarray) -> None:
        """Normalization.adapt(images): the images' per-channel mean and variance. Keras'
        adapt leaves `count` at 0; here it holds the number of images (nothing reads it)."""
        self.set_statistics(*augment.channel_statistics(images), len(images))

    def set_statistics(self, mean: np.ndarray, variance: np.ndarray, count: int) -> None:
        """adapt's result computed elsewhere (a split streamed from disk, in chunks)."""
        self.mean[...] = jnp.asarray(mean)
        self.variance[...] = jnp.asarray(variance)
        self.count[...] = jnp.asarray(count, jnp.int32)

    def __call__(self, images: jax.Array) -> jax.Array:
        return augment.normalize(images, self.mean[...], self.variance[...])


class DataAugmentation(nnx.Module):
    """The seed's `data_augmentation` Sequential; the random layers act only when training.

    The strong recipe's augmentations (config fields, off in the seed's recipe) wrap it:
    random crop and RandAugment on the raw pixels before it, random erasing after it.
    """

    def __init__(self, config: ViTConfig):
        self.normalization = Normalization(config.channels)
        self.config = config

    def __call__(self, images, *, train: bool, rngs: nnx.Rngs | None,
                 mix: jax.Array | None = None) -> jax.Array:
        """`mix`: mixup/cutmix's per-pixel weight (1, H, W, 1) of each image against the
        batch reversed, applied to the normalized images (augment.sample_mixing)."""
        config = self.config
        if train and config.crop_padding:
            images = augment.random_crop(rngs.augment(), images, config.crop_padding)
        if train and config.randaugment_ops:
            images = augment.rand_augment(rngs.augment(), images, config.randaugment_ops,
                                          config.randaugment_magnitude)
        x = self.normalization(images)
        if mix is not None:
            x = mix * x + (1.0 - mix) * x[::-1]
        x = augment.resize(x, config.image_size)
        if train:
            x = augment.random_augment(rngs.augment(), x, config.rotation_factor,
                                       config.zoom_factor)
        if train and config.random_erasing:
            x = augment.random_erasing(rngs.augment(), x, config.random_erasing)
        return x


def patches(images: jax.Array, patch_size: int) -> jax.Array:
    """keras.ops.image.extract_patches + reshape: (B, H, W, C) -> (B, N, p*p*C).

    Patches in row-major order; inside a patch the order is (row, column, channel), exactly
    as Keras' identity-kernel convolution lays them out.
    """
    batch, height, width, channels = images.shape
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


class PatchEncoder(nnx.Module):
    """Dense projection of each patch plus a learned position embedding.

    With ``class_token=True`` (the "cls" head, as in the ViT paper) a learned token is put
    before the projected patches and gets a position of its own.
    """

    def __init__(self, num_patches: int, patch_dim: int, projection_dim: int, *,
                 class_token: bool = False, dtype=None, rngs):
        self.projection = nnx.Linear(patch_dim, projection_dim, kernel_init=glorot_uniform,
                                     dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(num_patches + class_token, projection_dim,
                                            embedding_init=keras_embedding_init, rngs=rngs)
        if class_token:
            self.class_token = nnx.Param(jnp.zeros((1, 1, projection_dim), jnp.float32))

    def __call__(self, patch_tokens: jax.Array) -> jax.Array:
        tokens = self.projection(patch_tokens)
        if hasattr(self, "class_token"):
            tokens = prepend_class_token(tokens, self.class_token[...])
        # Embedding(arange(n)) is the whole table.
        return tokens + self.position_embedding.embedding[...]


def prepend_class_token(tokens: jax.Array, class_token: jax.Array) -> jax.Array:
    """(batch, n, dim) tokens -> (batch, 1 + n, dim), the learned (1, 1, dim) token first."""
    batch, _, dim = tokens.shape
    return jnp.concatenate([jnp.broadcast_to(class_token, (batch, 1, dim)), tokens], axis=1)


class MultiHeadAttention(nnx.Module):
    """keras.layers.MultiHeadAttention for self-attention, with Keras' weight layout.

    query/key/value kernels are (dim, heads, key_dim), the output kernel (heads, key_dim, dim).
    The dropout mask (drawn by the block, with its others: dropout_masks) has one element
    per (batch, head, query, key), as Keras draws it (not broadcast as flax's own attention
    does by default).
    """

    def __init__(self, dim: int, num_heads: int, key_dim: int, dropout: float, *, dtype=None,
                 rngs):
        # LinearGeneral draws a flat (fan_in, fan_out) kernel and reshapes it: the same glorot
        # fans Keras' EinsumDense computes from its input and output axes.
        def projection():
            return nnx.LinearGeneral(dim, (num_heads, key_dim), kernel_init=glorot_uniform,
                                     dtype=dtype, rngs=rngs)

        self.query, self.key, self.value = projection(), projection(), projection()
        self.attention_output = nnx.LinearGeneral(
            (num_heads, key_dim), dim, axis=(-2, -1), kernel_init=glorot_uniform, dtype=dtype,
            rngs=rngs)
        self.num_heads = num_heads
        self.dropout_rate = dropout
        self.scale = 1.0 / math.sqrt(key_dim)

    def dropout_spec(self, x: jax.Array) -> DropoutSpec:
        batch, tokens, _ = x.shape
        return (batch, self.num_heads, tokens, tokens), self.dropout_rate

    def __call__(self, x: jax.Array, *, keep: jax.Array | None) -> jax.Array:
        """`keep`: the dropout mask of the attention probabilities (None: no dropout)."""
        def heads_first(projected, name):
            # (batch, heads, tokens, key_dim) as the attention matmuls read it; saving this
            # rather than the projection's output spares a transposed copy per tensor.
            return checkpoint_name(projected.transpose(0, 2, 1, 3), name)

        # Keras scales the query before the dot product.
        query = heads_first(self.query(x) * self.scale, "query")
        key, value = heads_first(self.key(x), "key"), heads_first(self.value(x), "value")
        scores = jnp.einsum("bhsd,bhtd->bhts", key, query)
        probabilities = checkpoint_name(jax.nn.softmax(scores.astype(jnp.float32), axis=-1),
                                        "attention_probabilities")
        probabilities = dropout(probabilities, self.dropout_rate, keep)
        attended = jnp.einsum("bhts,bhsd->bthd", probabilities.astype(value.dtype), value)
        return self.attention_output(checkpoint_name(attended, "attended"))


class MLP(nnx.Module):
    """The seed's `mlp()`: Dense(units, gelu) -> Dropout, for each width."""

    def __init__(self, in_features: int, units: tuple[int, ...], dropout: float, *, dtype=None,
                 rngs):
        widths = (in_features, *units)
        self.dense = nnx.List([
            nnx.Linear(a, b, kernel_init=glorot_uniform, dtype=dtype, rngs=rngs)
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        ])
        self.dropout_rate = dropout

    def dropout_specs(self, x: jax.Array) -> list[DropoutSpec]:
        return [((*x.shape[:-1], dense.out_features), self.dropout_rate)
                for dense in self.dense]

    def __call__(self, x: jax.Array, *, keeps: Sequence[jax.Array | None]) -> jax.Array:
        """`keeps`: a dropout mask (or None) for each Dense's output."""
        for dense, keep in zip(self.dense, keeps, strict=True):
            x = dropout(gelu(dense(x)), self.dropout_rate, keep)
        return x


class TransformerBlock(nnx.Module):
    """Pre-norm block: x2 = x + MHA(LN(x)); out = x2 + MLP(LN(x2)).

    With a `drop_path` rate (stochastic depth, the strong recipe) each residual branch is
    dropped for a whole example with that probability, and scaled by 1 / (1 - rate) when
    kept; the seed's blocks have none.
    """

    def __init__(self, config: ViTConfig, *, drop_path: float = 0.0, rngs):
        dim, eps = config.projection_dim, config.layer_norm_epsilon
        # use_fast_variance=False: the two-pass variance Keras computes.
        self.layer_norm_1 = nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)
        self.attention = MultiHeadAttention(dim, config.num_heads, dim,
                                            config.attention_dropout,
                                            dtype=compute_dtype(config), rngs=rngs)
        self.layer_norm_2 = nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)
        self.mlp = MLP(dim, config.transformer_units, config.dropout,
                       dtype=compute_dtype(config), rngs=rngs)
        self.drop_path = drop_path

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        # One draw for every dropout of the block; a rate of 0 draws no bits for its mask,
        # so the seed's blocks draw exactly what they drew before stochastic depth existed.
        branch = ((x.shape[0], 1, 1), self.drop_path)
        attention_keep, *mlp_keeps, attention_path, mlp_path = dropout_masks(
            rngs, train, [self.attention.dropout_spec(x), *self.mlp.dropout_specs(x),
                          branch, branch])
        attended = self.attention(self.layer_norm_1(x), keep=attention_keep)
        x2 = x + dropout(attended, self.drop_path, attention_path)
        transformed = self.mlp(self.layer_norm_2(x2), keeps=mlp_keeps)
        return x2 + dropout(transformed, self.drop_path, mlp_path)


def drop_path_rates(config: ViTConfig) -> list[float]:
    """Stochastic depth's rates per block: linear from 0 (first) to the config's (last)."""
    layers = config.transformer_layers
    return [config.stochastic_depth * i / max(layers - 1, 1) for i in range(layers)]


class ClassifierHead(nnx.Module):
    """LayerNorm -> flatten | average | class token -> Dropout -> MLP -> Dense logits."""

    def __init__(self, config: ViTConfig, *, rngs):
        dim = config.projection_dim
        self.kind = config.head
        features = dim * config.num_patches if config.head == "flatten" else dim
        self.layer_norm = nnx.LayerNorm(dim, epsilon=config.layer_norm_epsilon,
                                        use_fast_variance=False, rngs=rngs)
        self.dropout_rate = config.head_dropout
        self.mlp = MLP(features, config.mlp_head_units, config.head_dropout,
                       dtype=compute_dtype(config), rngs=rngs)
        self.logits = nnx.Linear(config.mlp_head_units[-1], config.num_classes,
                                 kernel_init=glorot_uniform, dtype=compute_dtype(config),
                                 rngs=rngs)

    def __call__(self, tokens: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        x = self.layer_norm(tokens)
        if self.kind == "flatten":
            x = x.reshape(x.shape[0], -1)
        elif self.kind == "gap":
            x = x.mean(axis=1)
        else:  # "cls": the learned class token sits at position 0.
            x = x[:, 0]
        keep, *mlp_keeps = dropout_masks(
            rngs, train, [(x.shape, self.dropout_rate), *self.mlp.dropout_specs(x)])
        x = dropout(x, self.dropout_rate, keep)
        return self.logits(self.mlp(x, keeps=mlp_keeps))


class ViT(nnx.Module):
    """The seed's `create_vit_classifier()`: raw images in, class logits out.

    Call with ``train=True`` and ``rngs=nnx.Rngs(augment=..., dropout=...)`` for a training
    forward pass (augmentation and dropout on); ``train=False`` is inference (normalize and
    resize only), as Keras' ``model(x, training=False)`` / ``predict``.
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        patch_dim = config.patch_size ** 2 * config.channels
        self.data_augmentation = DataAugmentation(config)
        self.patch_encoder = PatchEncoder(config.num_patches, patch_dim, config.projection_dim,
                                          class_token=config.head == "cls",
                                          dtype=compute_dtype(config), rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(config, drop_path=rate, rngs=rngs)
                                for rate in drop_path_rates(config)])
        self.head = ClassifierHead(config, rngs=rngs)

    def __call__(self, images: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None, mix: jax.Array | None = None) -> jax.Array:
        check_call(self, images, train, rngs)
        x = self.data_augmentation(images, train=train, rngs=rngs, mix=mix)
        x = self.patch_encoder(patches(x, self.config.patch_size))
        for block in self.blocks:
            x = _remat_block(block, x, train, rngs)
        return self.head(x, train=train, rngs=rngs)


def check_call(model: nnx.Module, images: jax.Array, train: bool, rngs) -> None:
    """A ValueError for images of another shape than the model's config says, or a
    training pass without random keys."""
    expected = model.config.input_shape
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"{type(model).__name__} expects images of shape (batch, "
                         f"{', '.join(map(str, expected))}), got {images.shape}")
    if train and rngs is None:
        raise ValueError("train=True needs rngs=nnx.Rngs(augment=..., dropout=...)")


@nnx.remat(static_argnums=(2,), policy=BLOCK_REMAT_POLICY)
def _remat_block(block: TransformerBlock, x: jax.Array, train: bool,
                 rngs: nnx.Rngs | None) -> jax.Array:
    return block(x, train=train, rngs=rngs)
