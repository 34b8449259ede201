"""The model a config names: the seed's ViT (seed_vit.py) or the standard ViT (hub_vit.py), by
`ViTConfig.architecture`; and the one abstract-model helper every weight reader fills (a
restore target, a preset, a Keras weights file). Here, not in either model file, because
hub_vit.py builds on seed_vit.py's layers."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from vit_flax.config import ViTConfig
from vit_flax.models.hub_vit import StandardViT, ViTHub, ViTHubConfig
from vit_flax.models.seed_vit import ViT

Model = ViT | StandardViT


def new_model(config: ViTConfig, rngs: nnx.Rngs) -> Model:
    """The architecture's module, initialised from `rngs`."""
    if config.architecture == "standard":
        return StandardViT(config, rngs=rngs)
    return ViT(config, rngs=rngs)


def create_model(config: ViTConfig, train_images: np.ndarray | None = None, *,
                 statistics: tuple | None = None) -> Model:
    """A freshly initialised model of `config` (weights from nnx.Rngs(config.seed)), its
    Normalization adapted on `train_images` when given (as the seed adapts on x_train), or
    set to `statistics` (mean, variance, count: what adapt computes, computed elsewhere);
    without either it normalizes with mean 0 and variance 1."""
    model = new_model(config, nnx.Rngs(config.seed))
    if statistics is not None:
        model.data_augmentation.normalization.set_statistics(*statistics)
    elif train_images is not None:
        model.data_augmentation.normalization.adapt(np.asarray(train_images))
    return model


def abstract_model(config: ViTConfig | ViTHubConfig) -> Model | ViTHub:
    """The model of `config` (a ViTConfig's architecture, or a ViTHubConfig's ViTHub) as
    shapes only (no memory, no random draws): every array must be written before use
    (`check_filled`)."""
    if isinstance(config, ViTHubConfig):
        return nnx.eval_shape(lambda: ViTHub(config, rngs=nnx.Rngs(0)))
    return nnx.eval_shape(lambda: new_model(config, nnx.Rngs(0)))


def check_filled(model: nnx.Module, error: type[Exception] = ValueError) -> nnx.Module:
    """`model` when every array of an `abstract_model` was written; else `error` naming the
    arrays left: a reader that left one unwritten is a bug, never a partial model."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    missing = [jax.tree_util.keystr(path) for path, leaf in leaves
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise error(f"no source weight for vit_flax {', '.join(missing)}")
    return model
