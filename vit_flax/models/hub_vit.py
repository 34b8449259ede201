"""The standard Vision Transformer (Keras Hub's ViTBackbone and ViTImageClassifier) in Flax NNX.

Dosovitskiy et al. 2020, as keras_hub 0.32 builds it: patches embedded by a Conv2D of stride
= kernel = patch size (here a Dense on `model.patches`' flattened patches: the same numbers,
see `conv_kernel_init`), a class token, a learned position embedding, pre-norm blocks whose
MLP is Dense -> GELU -> Dense, a final LayerNorm; then ViTImageClassifier's head (class token
or mean of the tokens, an optional tanh Dense "pre_logits", the "predictions" Dense).

Attribute names are Keras Hub's layer names (``vit_patching_and_embedding.patch_embedding``,
``transformer_blocks[i].ln_1``, ``mha.query``, ``mlp.dense_1``, ``predictions`` ...), so
`vit_flax.weights.keras_hub.weight_table` reads as a table. The attention (with Keras' weight
layout), the patches, GELU, dropout and glorot_uniform are model.py's; what is Keras Hub's own
is here: the embedding, the block MLP, the head and their initializers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax.config import (
    DTYPES,
    STANDARD_SIZES,
    ConfigError,
    Dtype,
    ViTConfig,
    json_fields,
)
from vit_flax.models.seed_vit import (
    BLOCK_REMAT_POLICY,
    DataAugmentation,
    MultiHeadAttention,
    check_call,
    compute_dtype,
    dropout,
    dropout_masks,
    gelu,
    glorot_uniform,
    patches,
    prepend_class_token,
)

Pooling = Literal["token", "gap"]
Activation = Literal[None, "linear", "softmax", "sigmoid"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
ACTIVATIONS: tuple = get_args(Activation)

SIZES = STANDARD_SIZES  # The named sizes: (patch_size, num_layers, num_heads, hidden, mlp).
# ViTHubConfig's fields by type, for its checks.
INT_FIELDS = ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")
OPTIONAL_INT_FIELDS = ("num_classes", "intermediate_dim")
BOOL_FIELDS = ("use_mha_bias", "use_mlp_bias", "use_class_token", "use_patch_bias")
FLOAT_FIELDS = ("dropout_rate", "attention_dropout", "layer_norm_epsilon", "head_dropout")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ViTHubConfig:
    """ViTBackbone's constructor arguments, then ViTImageClassifier's, then the image
    converter's scale and offset. num_classes=None is the backbone alone (tokens out)."""

    image_shape: tuple[int, int, int] = (224, 224, 3)
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    dropout_rate: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-6
    use_mha_bias: bool = True
    use_mlp_bias: bool = True
    use_class_token: bool = True
    use_patch_bias: bool = True
    # --- ViTImageClassifier ---
    num_classes: int | None = None
    pooling: Pooling = "token"
    intermediate_dim: int | None = None
    activation: Activation = None
    head_dropout: float = 0.0  # ViTImageClassifier's `dropout` (before "predictions").
    # --- ViTImageConverter: images * scale + offset, per channel; None skips the step ---
    scale: tuple[float, ...] | None = None
    offset: tuple[float, ...] | None = None
    dtype: Dtype = "float32"  # As ViTConfig.dtype: the matmuls'.

    def __post_init__(self):
        self._check_types()
        object.__setattr__(self, "image_shape", tuple(self.image_shape))
        for name in ("scale", "offset"):
            value = getattr(self, name)
            if isinstance(value, int | float):  # Keras takes one number for all channels.
                value = (value,) * self.image_shape[-1]
            object.__setattr__(self, name, None if value is None else tuple(map(float, value)))
        self._check()

    def _check_types(self) -> None:
        """Each field of its type (a preset's JSON may hold anything): a one-line ConfigError
        naming the first field that is not, never a cast ("no" is not False)."""
        shape = self.image_shape
        if not (isinstance(shape, list | tuple) and len(shape) == 3
                and all(_is_int(v) for v in shape)):
            raise ConfigError(f"image_shape must be 3 integers (height, width, channels), "
                              f"got {shape!r}")
        for name in INT_FIELDS + OPTIONAL_INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) and not (value is None and name in OPTIONAL_INT_FIELDS):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        for name in ("scale", "offset"):
            value = getattr(self, name)
            items = value if isinstance(value, list | tuple) else [value]
            if value is not None and not all(_is_number(v) and math.isfinite(v) for v in items):
                raise ConfigError(f"{name} must be null, a finite number or a list of them (one "
                                  f"per channel), got {value!r}")

    def _check(self) -> None:
        height, width, channels = self.image_shape
        sizes = dict(height=height, width=width, channels=channels, patch_size=self.patch_size,
                     num_layers=self.num_layers, num_heads=self.num_heads,
                     hidden_dim=self.hidden_dim, mlp_dim=self.mlp_dim)
        sizes.update({k: getattr(self, k) for k in ("num_classes", "intermediate_dim")
                      if getattr(self, k) is not None})
        bad = {k: v for k, v in sizes.items() if v <= 0}
        if bad:
            raise ConfigError(f"ViTHubConfig sizes must be positive integers, got {bad}")
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(f"image_shape {self.image_shape} is not divisible by "
                              f"patch_size {self.patch_size}")
        rates = {k: getattr(self, k) for k in ("dropout_rate", "attention_dropout",
                                                "head_dropout")}
        if not all(0.0 <= r < 1.0 for r in rates.values()):
            raise ConfigError(f"dropout rates must be in [0, 1), got {rates}")
        if self.layer_norm_epsilon <= 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        choices = dict(pooling=(self.pooling, POOLINGS), activation=(self.activation,
                       ACTIVATIONS), dtype=(self.dtype, DTYPES))
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        self._check_scaling(channels)

    def _check_scaling(self, channels: int) -> None:
        for name in ("scale", "offset"):
            value = getattr(self, name)
            if value is not None and len(value) != channels:
                raise ConfigError(f"{name} has {len(value)} values for {channels} channels")
        if self.scale is not None and 0.0 in self.scale:
            # Every image would become the offset: a model that sees nothing.
            raise ConfigError(f"scale must be non-zero for every channel, got {self.scale}")

    @classmethod
    def named(cls, name: str, **changes) -> ViTHubConfig:
        """A named size ("vit-b16", ...: SIZES) at 224x224, with `changes` applied."""
        if name not in SIZES:
            raise ConfigError(f"unknown ViT size {name!r}; one of {', '.join(SIZES)}")
        patch_size, num_layers, num_heads, hidden_dim, mlp_dim = SIZES[name]
        return cls(patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
                   hidden_dim=hidden_dim, mlp_dim=mlp_dim, **changes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image the model receives, as ViTConfig's."""
        return self.image_shape

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of patches."""
        return self.image_shape[0] // self.patch_size, self.image_shape[1] // self.patch_size

    @property
    def num_positions(self) -> int:
        rows, cols = self.grid
        return rows * cols + self.use_class_token

    def replace(self, **changes) -> ViTHubConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ViTHubConfig:
        """The config of `to_json`'s text; a ConfigError (one line) for anything else."""
        return cls(**json_fields(cls, text))


# --- Keras Hub's initializers -----------------------------------------------------------------

def normal(stddev: float):
    """keras.initializers.RandomNormal(stddev=...): class token ("random_normal": 0.05),
    position embedding (0.02), the MLP biases (1e-6)."""
    return nnx.initializers.normal(stddev)


def conv_kernel_init(patch_size: int, channels: int):
    """Conv2D's glorot_uniform, drawn on its (p, p, C, D) kernel (fans p*p*C and p*p*D, as
    Keras counts a convolution's), then flattened to the Dense's (p*p*C, D).

    The flattening is the weight mapping too: row-major (row, column, channel) is the order
    `model.patches` lays out a patch in, so the Dense computes what the convolution does.
    """
    def init(key, shape, dtype=jnp.float32):
        return glorot_uniform(key, (patch_size, patch_size, channels, shape[-1]),
                              dtype).reshape(shape)

    return init


# --- modules ------------------------------------------------------------------------------------

class ViTPatchingAndEmbedding(nnx.Module):
    """Patch embedding, class token, position embedding (keras_hub's layer of that name)."""

    def __init__(self, config: ViTHubConfig, *, rngs: nnx.Rngs):
        channels, dim = config.image_shape[-1], config.hidden_dim
        patch_dim = config.patch_size ** 2 * channels
        self.patch_size = config.patch_size
        self.patch_embedding = nnx.Linear(
            patch_dim, dim, use_bias=config.use_patch_bias,
            kernel_init=conv_kernel_init(config.patch_size, channels),
            dtype=compute_dtype(config), rngs=rngs)
        if config.use_class_token:
            self.class_token = nnx.Param(normal(0.05)(rngs.params(), (1, 1, dim)))
        self.position_embedding = nnx.Embed(config.num_positions, dim,
                                            embedding_init=normal(0.02), rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        tokens = self.patch_embedding(patches(images, self.patch_size))
        if hasattr(self, "class_token"):
            tokens = prepend_class_token(tokens, self.class_token[...])
        return tokens + self.position_embedding.embedding[...]


class MLP(nnx.Module):
    """keras_hub's ViT MLP: Dense(mlp_dim, gelu) -> Dropout -> Dense(hidden_dim) -> Dropout."""

    def __init__(self, config: ViTHubConfig, *, rngs: nnx.Rngs):
        def dense(a, b):
            return nnx.Linear(a, b, use_bias=config.use_mlp_bias, kernel_init=glorot_uniform,
                              bias_init=normal(1e-6), dtype=compute_dtype(config), rngs=rngs)

        self.dense_1 = dense(config.hidden_dim, config.mlp_dim)
        self.dense_2 = dense(config.mlp_dim, config.hidden_dim)
        self.dropout_rate = config.dropout_rate

    def dropout_specs(self, x: jax.Array):
        shape = x.shape[:-1]
        return [((*shape, self.dense_1.out_features), self.dropout_rate),
                ((*shape, self.dense_2.out_features), self.dropout_rate)]

    def __call__(self, x: jax.Array, *, keeps) -> jax.Array:
        x = dropout(gelu(self.dense_1(x)), self.dropout_rate, keeps[0])
        return dropout(self.dense_2(x), self.dropout_rate, keeps[1])


def _layer_norm(config: ViTHubConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: the two-pass variance Keras computes.
    return nnx.LayerNorm(config.hidden_dim, epsilon=config.layer_norm_epsilon,
                         use_fast_variance=False, rngs=rngs)


def _attention(config: ViTHubConfig, rngs: nnx.Rngs) -> MultiHeadAttention:
    """The seed's attention (Keras' weight layout) at key_dim = hidden_dim / num_heads. For
    use_mha_bias=False its biases are dropped: model.MultiHeadAttention has no use_bias."""
    attention = MultiHeadAttention(config.hidden_dim, config.num_heads,
                                   config.hidden_dim // config.num_heads,
                                   config.attention_dropout, dtype=compute_dtype(config),
                                   rngs=rngs)
    if not config.use_mha_bias:
        for projection in (attention.query, attention.key, attention.value,
                           attention.attention_output):
            projection.use_bias, projection.bias = False, nnx.data(None)
    return attention


class ViTEncoderBlock(nnx.Module):
    """x2 = x + Dropout(MHA(LN(x))); out = x2 + MLP(LN(x2))."""

    def __init__(self, config: ViTHubConfig, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(config, rngs)
        self.mha = _attention(config, rngs)
        self.ln_2 = _layer_norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        attention_keep, output_keep, *mlp_keeps = dropout_masks(
            rngs, train, [self.mha.dropout_spec(x), (x.shape, self.dropout_rate),
                          *self.mlp.dropout_specs(x)])
        attended = self.mha(self.ln_1(x), keep=attention_keep)
        x2 = x + dropout(attended, self.dropout_rate, output_keep)
        return x2 + self.mlp(self.ln_2(x2), keeps=mlp_keeps)


@nnx.remat(static_argnums=(2,), policy=BLOCK_REMAT_POLICY)
def _remat_block(block: ViTEncoderBlock, x: jax.Array, train: bool,
                 rngs: nnx.Rngs | None) -> jax.Array:
    # What the seed's blocks keep for the backward pass (model.BLOCK_REMAT_POLICY).
    return block(x, train=train, rngs=rngs)


class ViTEncoder(nnx.Module):
    """Dropout on the embeddings, the blocks, the final LayerNorm "ln"."""

    def __init__(self, config: ViTHubConfig, *, rngs: nnx.Rngs):
        self.transformer_blocks = nnx.List([ViTEncoderBlock(config, rngs=rngs)
                                            for _ in range(config.num_layers)])
        self.ln = _layer_norm(config, rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        [keep] = dropout_masks(rngs, train, [(x.shape, self.dropout_rate)])
        x = dropout(x, self.dropout_rate, keep)
        for block in self.transformer_blocks:
            x = _remat_block(block, x, train, rngs)
        return self.ln(x)


class ViTBackbone(nnx.Module):
    """Images (already scaled) -> tokens (batch, num_positions, hidden_dim)."""

    def __init__(self, config: ViTHubConfig, *, rngs: nnx.Rngs):
        self.vit_patching_and_embedding = ViTPatchingAndEmbedding(config, rngs=rngs)
        self.vit_encoder = ViTEncoder(config, rngs=rngs)

    def __call__(self, images: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.vit_encoder(self.vit_patching_and_embedding(images), train=train,
                                rngs=rngs)


OUTPUT_ACTIVATIONS = {None: lambda x: x, "linear": lambda x: x,
                      "softmax": jax.nn.softmax, "sigmoid": jax.nn.sigmoid}


class ViTHub(nnx.Module):
    """Raw images in (the converter's scale and offset applied), then the backbone; with
    num_classes, ViTImageClassifier's head: its outputs (logits unless `activation`)."""

    def __init__(self, config: ViTHubConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = ViTBackbone(config, rngs=rngs)
        if config.num_classes is None:
            return
        features = config.hidden_dim
        if config.intermediate_dim is not None:
            self.pre_logits = nnx.Linear(features, config.intermediate_dim,
                                         kernel_init=glorot_uniform, rngs=rngs)
            features = config.intermediate_dim
        self.predictions = nnx.Linear(features, config.num_classes, kernel_init=glorot_uniform,
                                      rngs=rngs)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """ViTImageConverter's rescaling: float32 images * scale + offset."""
        expected = self.config.image_shape
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"ViTHub expects images of shape (batch, "
                             f"{', '.join(map(str, expected))}), got {images.shape}")
        x = jnp.asarray(images, jnp.float32)
        if self.config.scale is not None:
            x = x * jnp.asarray(self.config.scale, jnp.float32)
        if self.config.offset is not None:
            x = x + jnp.asarray(self.config.offset, jnp.float32)
        return x

    def pool(self, tokens: jax.Array) -> jax.Array:
        """The classifier's pre-logits: class token or token mean, then "pre_logits" (tanh)."""
        x = tokens[:, 0] if self.config.pooling == "token" else tokens.mean(axis=1)
        if hasattr(self, "pre_logits"):
            x = jnp.tanh(self.pre_logits(x))
        return x

    def __call__(self, images: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        if train and rngs is None:
            raise ValueError("train=True needs rngs=nnx.Rngs(dropout=...)")
        return self.classify(self.preprocess(images), train=train, rngs=rngs)

    def classify(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
        """The backbone and the head on images already preprocessed."""
        tokens = self.backbone(x, train=train, rngs=rngs)
        if self.config.num_classes is None:
            return tokens
        x = self.pool(tokens)
        [keep] = dropout_masks(rngs, train, [(x.shape, self.config.head_dropout)])
        logits = self.predictions(dropout(x, self.config.head_dropout, keep))
        return OUTPUT_ACTIVATIONS[self.config.activation](logits)


def hub_config(config: ViTConfig) -> ViTHubConfig:
    """The ViTHubConfig of a ViTConfig with architecture='standard' (StandardViT's ViT):
    images at image_size (the input pipeline resizes them), no converter scaling (its
    Normalization normalizes)."""
    mlp_dim, dim = config.transformer_units
    return ViTHubConfig(
        image_shape=(config.image_size, config.image_size, config.channels),
        patch_size=config.patch_size, num_layers=config.transformer_layers,
        num_heads=config.num_heads, hidden_dim=dim, mlp_dim=mlp_dim,
        dropout_rate=config.dropout, attention_dropout=config.attention_dropout,
        layer_norm_epsilon=config.layer_norm_epsilon, num_classes=config.num_classes,
        pooling="token" if config.head == "cls" else "gap",
        intermediate_dim=config.mlp_head_units[0] if config.mlp_head_units else None,
        head_dropout=config.head_dropout, dtype=config.dtype)


class StandardViT(nnx.Module):
    """The standard ViT as vit_flax trains it (architecture='standard', train.py --model):
    the seed's input pipeline (`data_augmentation`: Normalization, resize to image_size, the
    recipe's augmentation), then Keras Hub's ViTBackbone and ViTImageClassifier (`vit`).
    Called as the seed's ViT is: raw images in, logits out."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.data_augmentation = DataAugmentation(config)
        self.vit = ViTHub(hub_config(config), rngs=rngs)

    def __call__(self, images: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None, mix: jax.Array | None = None) -> jax.Array:
        check_call(self, images, train, rngs)
        x = self.data_augmentation(images, train=train, rngs=rngs, mix=mix)
        return self.vit.classify(x, train=train, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Trainable parameters, as Keras' count_params() counts a Keras Hub ViT."""
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --- position embeddings at another resolution ------------------------------------------------

def _linear_weights(old: int, new: int) -> np.ndarray:
    """(new, old) linear-interpolation weights with the end points on the end points, as
    scipy.ndimage.zoom(order=1) samples (its default grid_mode=False)."""
    coords = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
    low = np.minimum(np.floor(coords).astype(int), old - 1)
    high = np.minimum(low + 1, old - 1)
    weights = np.zeros((new, old))
    np.add.at(weights, (np.arange(new), low), 1.0 - (coords - low))
    np.add.at(weights, (np.arange(new), high), coords - low)
    return weights


def resample_posemb(posemb, new_grid: int | tuple[int, int],
                    old_grid: tuple[int, int] | None = None) -> np.ndarray:
    """Position embeddings (tokens, dim) for another patch grid: big_vision's resample_posemb
    (bilinear, scipy.ndimage.zoom order=1) for fine-tuning at another resolution.

    The rows before the grid (the class token) are kept as they are; `old_grid` defaults to
    the largest square the rows hold (197 rows: the class token and 14 x 14).
    """
    posemb = np.asarray(posemb)
    tokens, dim = posemb.shape
    new_grid = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    if old_grid is None:
        side = math.isqrt(tokens)
        old_grid = (side, side)
    prefix = tokens - old_grid[0] * old_grid[1]
    if prefix < 0:
        raise ValueError(f"{tokens} position embeddings cannot hold a {old_grid} grid")
    if tuple(old_grid) == new_grid:
        return posemb
    grid = posemb[prefix:].reshape(*old_grid, dim).astype(np.float64)
    grid = np.einsum("io,jp,opd->ijd", _linear_weights(old_grid[0], new_grid[0]),
                     _linear_weights(old_grid[1], new_grid[1]), grid)
    return np.concatenate([posemb[:prefix], grid.reshape(-1, dim).astype(posemb.dtype)])
