"""The model a config names: the seed's ViT (model.py) or the standard ViT (vit.py), by
`ViTConfig.architecture`. Here, not in either, because vit.py builds on model.py's layers."""

from __future__ import annotations

import numpy as np
from flax import nnx

from vit_flax.config import ViTConfig
from vit_flax.models.hub_vit import StandardViT
from vit_flax.models.seed_vit import ViT

Model = ViT | StandardViT


def new_model(config: ViTConfig, rngs: nnx.Rngs) -> Model:
    """The architecture's module, initialised from `rngs`."""
    if config.architecture == "standard":
        return StandardViT(config, rngs=rngs)
    return ViT(config, rngs=rngs)


def create_model(config: ViTConfig, train_images: np.ndarray | None = None) -> Model:
    """A freshly initialised model of `config` (weights from nnx.Rngs(config.seed)), its
    Normalization adapted on `train_images` when given (as the seed adapts on x_train);
    without them it normalizes with mean 0 and variance 1."""
    model = new_model(config, nnx.Rngs(config.seed))
    if train_images is not None:
        model.data_augmentation.normalization.adapt(np.asarray(train_images))
    return model


def abstract_model(config: ViTConfig) -> Model:
    """The model of `config` as shapes only (no memory, no random draws): a restore target."""
    return nnx.eval_shape(lambda: new_model(config, nnx.Rngs(0)))
