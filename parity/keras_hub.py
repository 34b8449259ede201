"""keras_hub's standard ViT (ViTBackbone, ViTImageClassifier) as a vit_flax `ViTHub`.

The configuration is read off the Keras model (its get_config(), the same dicts a preset's
config.json and task.json hold); each weight is found by its Keras variable path through
`vit_flax.weights.keras_hub.weight_table`, the table the preset loader reads .h5 files with. Those
paths are made of the layer names keras_hub hard-codes ("vit_encoder/transformer_block_1/
ln_1/gamma", "predictions/kernel"), never of auto-generated ones, so they do not depend on
what the process built before. Every Keras weight must find its vit_flax array and the
reverse, or WeightMismatchError says which.
"""

from __future__ import annotations

import keras
import keras_hub
import numpy as np

from vit_flax.models.factory import abstract_model, check_filled
from vit_flax.models.hub_vit import ViTHub, ViTHubConfig
from vit_flax.weights import keras_hub as pretrained
from vit_flax.weights.keras_h5 import WeightMismatchError


def _parts(model):
    """(backbone, classifier or None) of a ViTBackbone or ViTImageClassifier."""
    if isinstance(model, keras_hub.models.ViTImageClassifier):
        return model.backbone, model
    if isinstance(model, keras_hub.models.ViTBackbone):
        return model, None
    raise WeightMismatchError(f"{type(model).__name__} is not a keras_hub ViTBackbone or "
                              f"ViTImageClassifier")


def config_from_keras_hub(model) -> ViTHubConfig:
    """The ViTHubConfig of `model`, without image scaling: the vit_flax model computes what
    `model(images)` does, and a Keras Hub model's call does not run its preprocessor."""
    backbone, classifier = _parts(model)
    return pretrained.hub_config(keras.saving.serialize_keras_object(backbone),
                                 None if classifier is None else classifier.get_config(),
                                 where=f"the Keras model {model.name!r}")


def keras_hub_to_flax(model) -> ViTHub:
    """A ViTHub with the Keras Hub ViT's configuration and weights."""
    config = config_from_keras_hub(model)
    variables = {variable.path: variable for variable in model.weights}
    table = pretrained.weight_table(config)
    missing = [entry.keras for entry in table if entry.keras not in variables]
    extra = sorted(set(variables) - {entry.keras for entry in table})
    if missing or extra:
        raise WeightMismatchError(f"the Keras model {model.name!r} and a ViTHub of its config "
                                  f"differ: no Keras weight for {missing}, no vit_flax array "
                                  f"for {extra}")
    flax_model = abstract_model(config)
    for entry in table:
        pretrained.write(flax_model, entry, np.asarray(variables[entry.keras].numpy()))
    return check_filled(flax_model, WeightMismatchError)
