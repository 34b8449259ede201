"""Fine-tuning: a new run that starts from a trained model's weights (train.py --init-from).

The source is a vit_flax workdir (a train.py run) or a Keras Hub ViT preset directory (as
`save_to_preset` writes it, e.g. vit_base_patch16_224_imagenet21k; read with h5py, no Keras),
for a model of the standard architecture (train.py --model vit-b16 ...).
What is taken from the source, array by array (`initialize_from`):
- every weight of the same path and shape, as it is;
- the position embedding, resampled to this model's patch grid when the image size or patch
  size differ (vit.resample_posemb: bilinear, as big_vision's; a class token's row kept);
- the input normalization: a run's statistics, or a preset's image-converter scaling as
  the equivalent statistics (x * scale + offset = (x - mean) / sqrt(variance)): the
  features were learned on inputs normalized so;
- not the classifier (`head.logits`, the standard ViT's `predictions`): it stays as
  initialised, for this data set's classes.
Any other difference (a block more or fewer, another width, a flatten head over another
number of tokens, another architecture) is a one-line ConfigError naming the array and both
shapes. `config_for_source` avoids those: it takes the architecture from the source, so that
a run restates only what may differ (image size, classes, the recipe).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.inference.analysis import patch_grid
from vit_flax.inference.predict import load
from vit_flax.infra.workdir import CONFIG_FILE
from vit_flax.models import Model
from vit_flax.models.hub_vit import StandardViT, ViTHub, resample_posemb
from vit_flax.weights.keras_hub import (
    PretrainedError,
    is_preset,
    load_preset,
    preset_config,
    variable_at,
)

# Per architecture: the classifier (re-initialised: its outputs are the new data set's
# classes) and the position embedding (resampled to another patch grid).
CLASSIFIER = {"seed": ("head", "logits"), "standard": ("vit", "predictions")}
POSITION_EMBEDDING = {
    "seed": ("patch_encoder", "position_embedding", "embedding"),
    "standard": ("vit", "backbone", "vit_patching_and_embedding", "position_embedding",
                 "embedding")}
NORMALIZATION = ("data_augmentation", "normalization")


def _arrays(model: nnx.Module) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(variable.get_value())
            for path, variable in nnx.state(model).flat_state()}


def _name(path: tuple) -> str:
    return ".".join(map(str, path))


def _architecture(model) -> str:
    return "seed" if not isinstance(model, ViTHub | StandardViT) else "standard"


def _preset_arrays(source: ViTHub) -> dict[tuple, np.ndarray]:
    """A preset's ViT as the arrays of a StandardViT: under `vit`, and its converter's
    scale and offset as the Normalization statistics that compute the same."""
    arrays = {("vit", *path): value for path, value in _arrays(source).items()}
    channels = source.config.image_shape[-1]
    scale = np.asarray(source.config.scale or (1.0,) * channels, np.float64)
    offset = np.asarray(source.config.offset or (0.0,) * channels, np.float64)
    with np.errstate(over="ignore"):  # An overflow is the error below, not a warning.
        mean = (-offset / scale).astype(np.float32)
        variance = (1.0 / scale ** 2).astype(np.float32)
    if not (np.isfinite(mean).all() and np.isfinite(variance).all() and (variance > 0).all()):
        # Checked here, not after a run trained on images all mapped to one value.
        raise ConfigError(f"init_from: the preset's image converter (scale {scale.tolist()}, "
                          f"offset {offset.tolist()}) gives Normalization statistics that "
                          f"float32 cannot hold (mean {mean.tolist()}, variance "
                          f"{variance.tolist()}); give the converter a scale near 1/255 or 1/127.5")
    arrays[(*NORMALIZATION, "mean")] = mean
    arrays[(*NORMALIZATION, "variance")] = variance
    arrays[(*NORMALIZATION, "count")] = np.zeros((), np.int32)  # Adapted on no images.
    return arrays


def _taken(path: tuple, mine: np.ndarray, theirs: np.ndarray | None, model: Model,
           source) -> np.ndarray | None:
    """The source's value for one of this model's arrays (None: keep this model's)."""
    architecture = _architecture(model)
    if path[:len(CLASSIFIER[architecture])] == CLASSIFIER[architecture]:
        return None
    if theirs is None:
        raise ConfigError(f"init_from: the source model has no {_name(path)} (this model's "
                          f"architecture differs from the source's; give the same "
                          f"architecture, transformer_layers, head and mlp_head_units)")
    if path == POSITION_EMBEDDING[architecture] and mine.shape[1:] == theirs.shape[1:]:
        return resample_posemb(theirs, patch_grid(model), patch_grid(source))
    if mine.shape != theirs.shape:
        raise ConfigError(f"init_from: {_name(path)} has shape {mine.shape} here and "
                          f"{theirs.shape} in the source model; only the classifier and the "
                          f"position embedding may differ")
    return theirs


def initialize_from(model: Model, source: Model | ViTHub) -> dict[str, list[str]]:
    """Set `model`'s weights from `source` (a trained model, or a preset's ViTHub) in place,
    by the module docstring's rules. Returns the array names by what happened to them:
    taken, resampled, kept (initialised)."""
    mine = _arrays(model)
    theirs = _preset_arrays(source) if isinstance(source, ViTHub) else _arrays(source)
    classifier = CLASSIFIER[_architecture(model)]
    extra = sorted(set(theirs) - set(mine))
    extra = [path for path in extra if path[:len(classifier)] != classifier]
    if extra:
        raise ConfigError(f"init_from: the source model has {_name(extra[0])}, which this "
                          f"model has not (this model's architecture differs from the "
                          f"source's; give the same architecture, transformer_layers, head "
                          f"and mlp_head_units)")
    report = {"taken": [], "resampled": [], "kept": []}
    for path, value in mine.items():
        taken = _taken(path, value, theirs.get(path), model, source)
        if taken is None:
            report["kept"].append(_name(path))
            continue
        report["taken" if taken is theirs[path] else "resampled"].append(_name(path))
        variable_at(model, path).set_value(jnp.asarray(taken, value.dtype))
    return report


def lacks_converter(source: Model | ViTHub) -> bool:
    """A preset saved without its image converter: the model it defines takes the pixels
    as they come (0-255), and so does a model started from it (identity Normalization)."""
    return isinstance(source, ViTHub) and source.config.scale is None \
        and source.config.offset is None


def load_source(path: str | os.PathLike) -> Model | ViTHub:
    """The model to start from: a vit_flax workdir's best model (a train.py run), or a
    Keras Hub ViT preset directory's ViT (its own head, which is not taken)."""
    path = Path(path)
    if is_preset(path):
        try:
            return load_preset(path)[0]
        except (PretrainedError, OSError, KeyError, ValueError) as error:
            raise ConfigError(f"init_from={path}: not a readable Keras Hub ViT preset "
                              f"({error})") from None
    try:
        source, _ = load(path)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise ConfigError(f"init_from={path}: {error} (or a Keras Hub preset directory: "
                          f"config.json and model.weights.h5)") from None
    return source


# --- the architecture a source fixes ---------------------------------------------------------

# The fields of a source's architecture: its weights' shapes and what they compute. Image size
# (the position embedding is resampled), classes (the classifier is new) and the recipe are
# the run's own.
ARCHITECTURE_FIELDS = ("architecture", "patch_size", "projection_dim", "num_heads",
                       "transformer_layers", "mlp_dim", "mlp_head_units", "head",
                       "layer_norm_epsilon")
# What vit_flax's standard ViT always has, and a Keras Hub ViT may not.
STANDARD_ONLY = ("use_mha_bias", "use_mlp_bias", "use_class_token", "use_patch_bias")


def _preset_fields(path: Path, channels: int) -> tuple[dict, dict]:
    """(fields a preset fixes, fields it suggests: its image size, and the head a backbone
    without a classifier leaves open)."""
    try:
        hub = preset_config(path)
    except PretrainedError as error:
        raise ConfigError(f"init_from={path}: not a readable Keras Hub ViT preset ({error})"
                          ) from None
    lacking = [name for name in STANDARD_ONLY if not getattr(hub, name)]
    if lacking or hub.image_shape[-1] != channels:
        raise ConfigError(f"init_from={path}: the preset has {hub.image_shape[-1]} channels "
                          f"and {', '.join(f'{n}=False' for n in lacking) or 'every bias'}; "
                          f"vit_flax's standard ViT takes {channels} channels and has every "
                          f"bias and a class token")
    fixed = dict(architecture="standard", patch_size=hub.patch_size,
                 projection_dim=hub.hidden_dim, num_heads=hub.num_heads,
                 transformer_layers=hub.num_layers, mlp_dim=hub.mlp_dim,
                 layer_norm_epsilon=hub.layer_norm_epsilon)
    head = dict(head="cls" if hub.pooling == "token" else "gap",
                mlp_head_units=(hub.intermediate_dim,) if hub.intermediate_dim else ())
    suggested = dict(head="cls", mlp_head_units=())
    if hub.num_classes is not None:  # A classifier: its pooling and pre-logits are taken.
        fixed.update(head)
    height, width, _ = hub.image_shape
    return fixed, suggested | ({"image_size": height} if height == width else {})


def _run_fields(path: Path) -> tuple[dict, dict]:
    """(fields a vit_flax run fixes, fields it suggests: its image size)."""
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"init_from={path}: neither a vit_flax run ({CONFIG_FILE}, "
                          f"best_checkpoint/) nor a Keras Hub preset directory (config.json "
                          f"and model.weights.h5)")
    try:
        saved = ViTConfig.from_json((path / CONFIG_FILE).read_text())
    except ConfigError as error:
        raise ConfigError(f"init_from={path}: {error}") from None
    fixed = {name: getattr(saved, name) for name in ARCHITECTURE_FIELDS}
    fixed["mlp_dim"] = saved.transformer_units[0]
    return fixed, {"image_size": saved.image_size}


def _given_value(name: str, given: Mapping[str, object], fixed: dict):
    """What a given field means: mlp_dim 0 is its architecture's width; lists are tuples."""
    value = given[name]
    if name == "mlp_dim" and value == 0:
        architecture = given.get("architecture", fixed["architecture"])
        width = given.get("projection_dim", fixed["projection_dim"])
        return (4 if architecture == "standard" else 2) * width
    return tuple(value) if isinstance(value, list) else value


def source_fields(source: str | os.PathLike, given: Mapping[str, object],
                  channels: int = 3, implied: Mapping[str, str] | None = None) -> dict:
    """The ViTConfig fields a fine-tuning run takes from `source` (a Keras Hub preset
    directory or a vit_flax run): its architecture (ARCHITECTURE_FIELDS) and its image size,
    less those in `given` (the fields the user set, with their values). A given field the
    source fixes must agree with it, or a one-line ConfigError names both values, and what
    set it where `implied` says (field -> "model=vit-ti16": a named model's, not the user's
    own); image size, classes and the recipe stay the user's. Reads the source's JSON only."""
    path, implied = Path(source), implied or {}
    fixed, suggested = (_preset_fields(path, channels) if is_preset(path)
                        else _run_fields(path))
    for name, theirs in fixed.items():
        if name in given and _given_value(name, given, fixed) != theirs:
            setter = implied.get(name)
            said = f"{setter} sets {name}={given[name]!r}" if setter else \
                f"{name}={given[name]!r} was given"
            raise ConfigError(f"init_from={path}: {said}, the source has {theirs!r}; leave "
                              f"{setter or name} out to take the source's")
    return {name: value for name, value in (suggested | fixed).items() if name not in given}


def config_for_source(source: str | os.PathLike, config: ViTConfig,
                      given: set[str] | frozenset[str] = frozenset()) -> ViTConfig:
    """`config` with `source_fields` of `source` set: the fields in `given` (the names the
    user set explicitly) are `config`'s, and must agree with the source's."""
    return config.replace(**source_fields(
        source, {name: getattr(config, name) for name in given}, config.channels))
