"""One frozen configuration for the model and its training recipe.

Every default is the value of the Keras example (keras-io "Image classification with Vision
Transformer", Keras 3 version), so ``ViTConfig()`` *is* the seed's experiment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Literal, get_args

Architecture = Literal["seed", "standard"]
Head = Literal["flatten", "gap", "cls"]
Dtype = Literal["float32", "bfloat16"]
Schedule = Literal["constant", "cosine"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
HEADS: tuple[str, ...] = get_args(Head)
DTYPES: tuple[str, ...] = get_args(Dtype)
SCHEDULES: tuple[str, ...] = get_args(Schedule)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


def _field(default, help: str, *, flag: bool = True):
    """A config field with its meaning (train.py's --help) and whether train.py has a flag
    for it (fields set from the data, like num_classes, have none)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    # --- data ---
    num_classes: int = _field(100, "CIFAR-100's fine labels; set from the data.", flag=False)
    input_size: int = _field(
        32, "side of the square images the model receives (CIFAR: 32); folder images are "
        "resized to it")
    channels: int = _field(3, "RGB", flag=False)
    # --- preprocessing and augmentation (Keras' `data_augmentation` Sequential) ---
    image_size: int = _field(72, "images are resized (bilinear) to this side inside the model")
    rotation_factor: float = _field(
        0.02, "RandomRotation: angle ~ U(-f, f) of a full turn (0.02: +-7.2 degrees)")
    zoom_factor: float = _field(0.2, "RandomZoom: height and width zoom each ~ U(1-f, 1+f)")
    # --- model ---
    architecture: Architecture = _field(
        "seed", "seed: the Keras example's ViT; standard: Keras Hub's ViTBackbone + "
        "ViTImageClassifier (the ViT paper's: class token, block MLP 4 x projection_dim, "
        "final LayerNorm; head cls or gap, mlp_head_units: none or one pre-logits Dense), "
        "with the same input pipeline; --model sets it with a named size")
    patch_size: int = _field(6, "side of the non-overlapping patches: (72 / 6)^2 = 144")
    projection_dim: int = _field(64, "width of every token")
    num_heads: int = _field(4, "attention heads; Keras' key_dim is projection_dim, per head")
    transformer_layers: int = _field(8, "pre-norm transformer blocks")
    mlp_dim: int = _field(
        0, "width of each block MLP's hidden Dense; 0: its architecture's, 2 x "
        "projection_dim for the seed, 4 x for the standard ViT (a Keras Hub preset may have "
        "another)")
    mlp_head_units: tuple[int, ...] = _field(
        (2048, 1024), "Dense widths of the classifier MLP, a comma list")
    head: Head = _field("flatten", "how tokens become one vector: flatten (the seed), "
                        "gap (mean of the tokens) or cls (a class token)")
    attention_dropout: float = _field(0.1, "dropout on the attention probabilities")
    dropout: float = _field(0.1, "dropout after each Dense of the block MLPs")
    head_dropout: float = _field(0.5, "dropout before and inside the classifier MLP")
    layer_norm_epsilon: float = _field(1e-6, "LayerNorm epsilon (the seed's; Keras' default "
                                       "is 1e-3)")
    # float32 is the seed's and what parity checks.
    dtype: Dtype = _field("float32", "matmul dtype: bfloat16 = mixed precision (weights, "
                          "optimizer state, LayerNorm, softmax and loss stay float32)")
    # --- training (Keras' AdamW + fit) ---
    learning_rate: float = _field(1e-3, "AdamW learning rate")
    weight_decay: float = _field(1e-4, "AdamW weight decay")
    batch_size: int = _field(256, "examples per optimizer step")
    # A batch larger than this is split into micro-batches whose gradients are summed before
    # the one optimizer step, so the update is the batch's mean gradient either way (only
    # the random draws differ) while activation memory scales with the micro-batch. On a
    # 2-core CPU, 128 is as fast per image as 256 and needs half the memory (benchmarks/).
    microbatch_size: int = _field(
        128, "examples per forward/backward pass; a larger batch is split into micro-batches "
        "whose gradients are summed (one optimizer step per batch either way)")
    epochs: int = _field(100, "epochs to train (the seed's text: 100; its code: 10 to try)")
    validation_split: float = _field(
        0.1, "the last fraction of the training examples validates, as Keras' fit")
    seed: int = _field(0, "initial weights, shuffles, dropout and augmentation derive from it")
    # --- the strong recipe's ingredients: every default is "off", the seed's recipe ---
    schedule: Schedule = _field("constant", "learning-rate schedule: constant (the seed's), or "
                                "cosine decay to 0 after a linear warmup")
    warmup_epochs: float = _field(0.0, "epochs of linear learning-rate warmup from 0")
    label_smoothing: float = _field(0.0, "weight of the uniform distribution in the targets")
    crop_padding: int = _field(0, "random crop of the input size after zero-padding each "
                               "side by this many pixels (0: none)")
    randaugment_ops: int = _field(0, "RandAugment: operations per image (0: none)")
    randaugment_magnitude: float = _field(9.0, "RandAugment: magnitude, 0..10")
    mixup_alpha: float = _field(0.0, "mixup: lambda ~ Beta(a, a) (0: none)")
    cutmix_alpha: float = _field(0.0, "cutmix: kept area ~ Beta(a, a) (0: none; with mixup "
                                 "on, each batch takes one of the two)")
    random_erasing: float = _field(0.0, "probability of erasing a random rectangle of an image")
    stochastic_depth: float = _field(0.0, "drop-path rate of the last block (linear from 0 "
                                     "at the first)")

    def __post_init__(self):
        if isinstance(self.mlp_head_units, list):
            object.__setattr__(self, "mlp_head_units", tuple(self.mlp_head_units))
        self._check_floats()
        self._check_sizes()
        if self.mlp_dim == self.default_mlp_dim:  # One spelling per model: equal configs.
            object.__setattr__(self, "mlp_dim", 0)
        self._check_choices_and_rates()
        self._check_training()
        self._check_standard()

    def _check_floats(self):
        """Every float field a finite number first: NaN passes no comparison, so a range
        check alone would let it through (a NaN LayerNorm epsilon trains NaN)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(field.default, float) and (
                    isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not math.isfinite(value)):
                raise ConfigError(f"{field.name} must be finite, got {value!r}")
        if self.layer_norm_epsilon <= 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")

    def _check_sizes(self):
        positive = ("num_classes", "input_size", "channels", "image_size", "patch_size",
                    "projection_dim", "num_heads", "transformer_layers", "batch_size",
                    "microbatch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.mlp_dim, int) or isinstance(self.mlp_dim, bool) \
                or self.mlp_dim < 0:
            raise ConfigError(f"mlp_dim must be an integer >= 0 (0: the architecture's), got "
                              f"{self.mlp_dim!r}")
        if self.image_size % self.patch_size:
            nearest = max(self.image_size // self.patch_size, 1) * self.patch_size
            raise ConfigError(
                f"image_size ({self.image_size}) must be divisible by patch_size "
                f"({self.patch_size}); e.g. image_size={nearest}")
        if self.batch_size % self.pass_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of microbatch_size "
                f"({self.microbatch_size}); e.g. microbatch_size="
                f"{max(d for d in range(1, self.pass_size + 1) if self.batch_size % d == 0)}"
                f", or microbatch_size={self.batch_size} for one pass")
        if (not self.mlp_head_units and self.architecture == "seed") or any(
                not isinstance(u, int) or u <= 0 for u in self.mlp_head_units):
            raise ConfigError(
                f"mlp_head_units must be positive integers, got {self.mlp_head_units}")

    def _check_choices_and_rates(self):
        for name, choices in (("architecture", ARCHITECTURES), ("dtype", DTYPES),
                              ("head", HEADS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got "
                                  f"{getattr(self, name)!r}")
        for name in ("attention_dropout", "dropout", "head_dropout", "validation_split",
                     "label_smoothing", "random_erasing", "stochastic_depth"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if not 0.0 <= self.rotation_factor <= 0.5 or not 0.0 <= self.zoom_factor < 1.0:
            raise ConfigError(
                f"rotation_factor must be in [0, 0.5] and zoom_factor in [0, 1), "
                f"got {self.rotation_factor} and {self.zoom_factor}")
        for name in ("crop_padding", "randaugment_ops"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.randaugment_magnitude <= 10.0:
            raise ConfigError(f"randaugment_magnitude must be in [0, 10], got "
                              f"{self.randaugment_magnitude}")

    def _check_standard(self):
        """What Keras Hub's ViT can be: it has no flatten head, one optional pre-logits
        Dense, and no stochastic depth."""
        if self.architecture != "standard":
            return
        if self.head == "flatten" or len(self.mlp_head_units) > 1 or self.stochastic_depth:
            raise ConfigError(
                f"architecture='standard' takes head 'cls' or 'gap', at most one "
                f"mlp_head_units (a pre-logits Dense) and stochastic_depth 0; got head="
                f"{self.head!r}, mlp_head_units={self.mlp_head_units}, stochastic_depth="
                f"{self.stochastic_depth}")
        if self.projection_dim % self.num_heads:
            raise ConfigError(f"projection_dim ({self.projection_dim}) must be divisible by "
                              f"num_heads ({self.num_heads}) for architecture='standard'")

    def _check_training(self):
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0
                and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(
                f"learning_rate must be finite and > 0, weight_decay finite and >= 0, got "
                f"{self.learning_rate} and {self.weight_decay}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for name in ("warmup_epochs", "mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be finite and >= 0, got {value}")

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
        """The block MLP's widths: [mlp_dim, dim]; by default [2 * dim, dim] as in the seed,
        [4 * dim, dim] for the standard ViT (the ViT paper's, every named size's)."""
        return (self.mlp_dim or self.default_mlp_dim, self.projection_dim)

    @property
    def default_mlp_dim(self) -> int:
        """The block MLP's hidden width when mlp_dim is 0."""
        return (4 if self.architecture == "standard" else 2) * self.projection_dim

    @classmethod
    def recipe(cls, name: str, model: str = "seed", **fields) -> ViTConfig:
        """The config of a named recipe (RECIPES) for a named model (MODELS: its
        architecture fields win over the recipe's); a field given here wins over both."""
        if name not in RECIPES:
            raise ConfigError(f"recipe must be one of {tuple(RECIPES)}, got {name!r}")
        if model not in MODELS:
            raise ConfigError(f"model must be one of {tuple(MODELS)}, got {model!r}")
        return cls(**{**RECIPES[name], **MODELS[model], **fields})

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        """The config of `to_json`'s text; a ConfigError (one line) for anything else."""
        values = json_fields(cls, text)
        for field in dataclasses.fields(cls):
            if field.name in values and not _json_type_fits(values[field.name], field.default):
                raise ConfigError(f"not a ViTConfig: {field.name} must be of the type of "
                                  f"{field.default!r}, got {values[field.name]!r}")
        try:
            return cls(**values)
        except TypeError as error:  # A value of the wrong type that no check names.
            raise ConfigError(f"not a ViTConfig: {error}") from None


def json_fields(cls, text: str) -> dict:
    """The fields of a config dataclass `cls` in a JSON text: a ConfigError (one line) when
    the text is not JSON, not an object, or names a field `cls` does not have."""
    try:
        values = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"not a {cls.__name__}: the text is not JSON ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"not a {cls.__name__}: expected a JSON object of its fields, got "
                          f"a {type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"not a {cls.__name__}: unknown fields {', '.join(unknown)}")
    return values


def _json_type_fits(value, default) -> bool:
    """Whether a JSON value can be the field whose default is `default`: an int field takes
    an int, a float field a number, a str field a str, a tuple field a list of ints."""
    if isinstance(value, bool):
        return False
    if isinstance(default, tuple):
        return isinstance(value, list | tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


# The recipes: the fields where each differs from the seed's (ViTConfig's defaults). "keras"
# is the seed exactly (parity is checked on it); "strong" trains a small native-resolution
# ViT with a warmup + cosine schedule and light regularization. The README's recipe table
# gives each field's reason and what was measured.
RECIPES: dict[str, dict] = {
    "keras": {},
    # Chosen for a small compute budget (README, "Recipes": measured on ~25 minutes of one
    # CPU core): a model ~6x cheaper per training image than the seed's (153-176 against 28
    # images/s), so it trains 6 epochs where the seed's trains one; regularization light
    # enough for so few epochs.
    "strong": dict(
        image_size=32, patch_size=4,  # Native resolution, 64 tokens: no 32 -> 72 upsampling.
        projection_dim=64, num_heads=4, transformer_layers=5,
        # The seed's flatten head (2048, 1024 over all 64 tokens): measured 11.7 points above a
        # pooled (gap) head at a short budget, and 5.6 above flatten with one 256 Dense.
        attention_dropout=0.0, dropout=0.0, head_dropout=0.0,
        rotation_factor=0.0, zoom_factor=0.0, crop_padding=4,  # The CIFAR crop (+ flip).
        label_smoothing=0.1,
        schedule="cosine", warmup_epochs=0.5, weight_decay=0.05,
        batch_size=128, microbatch_size=128),
}


# (patch_size, num_layers, num_heads, hidden_dim, mlp_dim): Table 1 of the ViT paper (B, L),
# DeiT's Ti and S, as Keras Hub's presets and big_vision name them.
STANDARD_SIZES = {
    "vit-ti16": (16, 12, 3, 192, 768),
    "vit-s16": (16, 12, 6, 384, 1536),
    "vit-b16": (16, 12, 12, 768, 3072),
    "vit-b32": (32, 12, 12, 768, 3072),
    "vit-l16": (16, 24, 16, 1024, 4096),
}
# The models (train.py --model): the seed's ViT as the fields say, or a standard ViT of a
# named size at 224 x 224 with Keras Hub's defaults (no dropout, class-token head, no
# pre-logits Dense); every size's MLP is 4 x its width, as architecture='standard' builds.
MODELS: dict[str, dict] = {
    "seed": {},
    **{name: dict(architecture="standard", patch_size=patch, transformer_layers=layers,
                  num_heads=heads, projection_dim=dim, image_size=224, head="cls",
                  mlp_head_units=(), attention_dropout=0.0, dropout=0.0, head_dropout=0.0)
       for name, (patch, layers, heads, dim, _) in STANDARD_SIZES.items()},
}
