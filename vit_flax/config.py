"""One frozen configuration for the model and its training recipe.

Every default is the value of the Keras example (keras-io "Image classification with Vision
Transformer", Keras 3 version), so ``ViTConfig()`` *is* the seed's experiment.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Literal

HEADS = ("flatten", "gap", "cls")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    # --- data ---
    num_classes: int = 100  # CIFAR-100's fine labels.
    input_size: int = 32  # Side of the square images the model receives (CIFAR is 32x32).
    channels: int = 3  # RGB.
    # --- preprocessing and augmentation (Keras' `data_augmentation` Sequential) ---
    image_size: int = 72  # Images are resized (bilinear) to image_size x image_size.
    rotation_factor: float = 0.02  # RandomRotation: angle ~ U(-f, f) of a full turn (+-7.2 deg).
    zoom_factor: float = 0.2  # RandomZoom: height and width zoom each ~ U(1 - f, 1 + f).
    # --- model ---
    patch_size: int = 6  # Non-overlapping patch_size x patch_size patches: (72 / 6)^2 = 144.
    projection_dim: int = 64  # Width of every token.
    num_heads: int = 4  # Attention heads; Keras' key_dim is projection_dim, per head.
    transformer_layers: int = 8  # Pre-norm transformer blocks.
    mlp_head_units: tuple[int, ...] = (2048, 1024)  # Dense widths of the classifier MLP.
    head: Literal["flatten", "gap", "cls"] = "flatten"  # How tokens become one vector.
    attention_dropout: float = 0.1  # Dropout on the attention probabilities.
    dropout: float = 0.1  # Dropout after each Dense of the block MLPs.
    head_dropout: float = 0.5  # Dropout before and inside the classifier MLP.
    layer_norm_epsilon: float = 1e-6  # The seed passes 1e-6 (Keras' default is 1e-3).
    # Matmul dtype: "bfloat16" = mixed precision (weights, optimizer state, LayerNorm,
    # softmax and loss stay float32). float32 is the seed's and what parity checks.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # --- training (Keras' AdamW + fit) ---
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    # Examples per forward/backward pass: a batch larger than this is split into micro-batches
    # whose gradients are summed before the one optimizer step, so the update is the batch's
    # mean gradient either way (only the random draws differ) while activation memory scales
    # with the micro-batch. On a 2-core CPU, 128 is as fast per image as 256 and needs half
    # the memory (benchmarks/); a batch no larger than this runs in one pass.
    microbatch_size: int = 128
    epochs: int = 100  # The seed's text: 100 for a real run (its code says 10 to try it out).
    validation_split: float = 0.1  # The last 10% of the training arrays, as Keras' fit.
    seed: int = 0  # Initial weights, shuffles, dropout and augmentation all derive from it.

    def __post_init__(self):
        if isinstance(self.mlp_head_units, list):
            object.__setattr__(self, "mlp_head_units", tuple(self.mlp_head_units))
        positive = ("num_classes", "input_size", "channels", "image_size", "patch_size",
                    "projection_dim", "num_heads", "transformer_layers", "batch_size",
                    "microbatch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.image_size % self.patch_size:
            nearest = max(self.image_size // self.patch_size, 1) * self.patch_size
            raise ConfigError(
                f"image_size ({self.image_size}) must be divisible by patch_size "
                f"({self.patch_size}); e.g. --image-size {nearest}")
        if self.batch_size % self.pass_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of microbatch_size "
                f"({self.microbatch_size}); e.g. --microbatch-size "
                f"{max(d for d in range(1, self.pass_size + 1) if self.batch_size % d == 0)}"
                f", or --microbatch-size "
                f"{self.batch_size} for one pass")
        if not self.mlp_head_units or any(u <= 0 for u in self.mlp_head_units):
            raise ConfigError(
                f"mlp_head_units must be positive integers, got {self.mlp_head_units}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {self.head!r}")
        for name in ("attention_dropout", "dropout", "head_dropout", "validation_split"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if not 0.0 <= self.rotation_factor <= 0.5 or not 0.0 <= self.zoom_factor < 1.0:
            raise ConfigError(
                f"rotation_factor must be in [0, 0.5] and zoom_factor in [0, 1), "
                f"got {self.rotation_factor} and {self.zoom_factor}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0
                and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(
                f"learning_rate must be finite and > 0, weight_decay finite and >= 0, got "
                f"{self.learning_rate} and {self.weight_decay}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image the model receives."""
        return (self.input_size, self.input_size, self.channels)

    @property
    def pass_size(self) -> int:
        """Examples per forward/backward pass: the micro-batch, or the whole smaller batch."""
        return min(self.microbatch_size, self.batch_size)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def transformer_units(self) -> tuple[int, int]:
        """The block MLP's widths, [2 * dim, dim] as in the seed."""
        return (2 * self.projection_dim, self.projection_dim)

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls(**json.loads(text))
