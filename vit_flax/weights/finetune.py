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
shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax.config import ConfigError
from vit_flax.inference.analysis import patch_grid
from vit_flax.inference.predict import load
from vit_flax.models import Model
from vit_flax.models.hub_vit import StandardViT, ViTHub, resample_posemb
from vit_flax.weights.keras_hub import PretrainedError, is_preset, load_preset, variable_at

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
    arrays[(*NORMALIZATION, "mean")] = (-offset / scale).astype(np.float32)
    arrays[(*NORMALIZATION, "variance")] = (1.0 / scale ** 2).astype(np.float32)
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
