"""Fine-tuning: a new run that starts from a trained model's weights (train.py --init-from).

What is taken from the source, array by array (`initialize_from`):
- every weight of the same path and shape, as it is;
- the position embedding, resampled to this model's patch grid when the image size or patch
  size differ (vit.resample_posemb: bilinear, as big_vision's; a class token's row kept);
- the input normalization's statistics: the features were learned on inputs normalized so;
- not the classifier (`head.logits`): it stays as initialised, for this data set's classes.
Any other difference (a block more or fewer, another width, a flatten head over another
number of tokens) is a one-line ConfigError naming the array and both shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax.config import ConfigError
from vit_flax.inference import load
from vit_flax.model import ViT
from vit_flax.pretrained import variable_at
from vit_flax.vit import resample_posemb

CLASSIFIER = ("head", "logits")  # Re-initialised: its outputs are the new data set's classes.
POSITION_EMBEDDING = ("patch_encoder", "position_embedding", "embedding")


def _arrays(model: nnx.Module) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(variable.get_value())
            for path, variable in nnx.state(model).flat_state()}


def _name(path: tuple) -> str:
    return ".".join(map(str, path))


def _grid(model: ViT) -> tuple[int, int]:
    side = model.config.image_size // model.config.patch_size
    return side, side


def _taken(path: tuple, mine: np.ndarray, theirs: np.ndarray | None, model: ViT,
           source: ViT) -> np.ndarray | None:
    """The source's value for one of this model's arrays (None: keep this model's)."""
    if path[:len(CLASSIFIER)] == CLASSIFIER:
        return None
    if theirs is None:
        raise ConfigError(f"init_from: the source model has no {_name(path)} (this model's "
                          f"architecture differs from the source's; give the same "
                          f"transformer_layers, head and mlp_head_units)")
    if path == POSITION_EMBEDDING and mine.shape[1:] == theirs.shape[1:]:
        return resample_posemb(theirs, _grid(model), _grid(source))
    if mine.shape != theirs.shape:
        raise ConfigError(f"init_from: {_name(path)} has shape {mine.shape} here and "
                          f"{theirs.shape} in the source model; only the classifier and the "
                          f"position embedding may differ")
    return theirs


def initialize_from(model: ViT, source: ViT) -> dict[str, list[str]]:
    """Set `model`'s weights from `source` (in place) by the module docstring's rules.
    Returns the array names by what happened to them: taken, resampled, kept (initialised)."""
    mine, theirs = _arrays(model), _arrays(source)
    extra = sorted(set(theirs) - set(mine))
    extra = [path for path in extra if path[:len(CLASSIFIER)] != CLASSIFIER]
    if extra:
        raise ConfigError(f"init_from: the source model has {_name(extra[0])}, which this "
                          f"model has not (this model's architecture differs from the "
                          f"source's; give the same transformer_layers, head and "
                          f"mlp_head_units)")
    report = {"taken": [], "resampled": [], "kept": []}
    for path, value in mine.items():
        taken = _taken(path, value, theirs.get(path), model, source)
        if taken is None:
            report["kept"].append(_name(path))
            continue
        report["taken" if taken is theirs[path] else "resampled"].append(_name(path))
        variable_at(model, path).set_value(jnp.asarray(taken, value.dtype))
    return report


def load_source(path: str | os.PathLike) -> ViT:
    """The model to start from: a vit_flax workdir's best model (a train.py run)."""
    path = Path(path)
    try:
        source, _ = load(path)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise ConfigError(f"init_from={path}: {error}") from None
    if not isinstance(source, ViT):
        raise ConfigError(f"init_from={path} holds a {type(source).__name__}; train.py "
                          f"fine-tunes the seed's ViT family")
    return source
