"""vit_flax: the Keras "Image classification with Vision Transformer" example in JAX/Flax.

Importing it changes nothing process-wide (no matplotlib backend, no JAX rule): the
process-wide speed settings are applied by `run` (and so train.py), see vit_flax.infra.runtime.
"""

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.data.sources import DataError
from vit_flax.inference.analysis import attention_heatmaps, attention_maps, features
from vit_flax.inference.classify import classify
from vit_flax.inference.predict import load, predict
from vit_flax.infra.checkpoints import CheckpointError
from vit_flax.infra.signals import Interrupted
from vit_flax.models import create_model
from vit_flax.models.hub_vit import ViTHub, ViTHubConfig
from vit_flax.models.seed_vit import ViT
from vit_flax.training.group import sweep
from vit_flax.training.loop import train, train_group
from vit_flax.training.run import run
from vit_flax.weights.keras_hub import load_pretrained

__all__ = ["CheckpointError", "ConfigError", "DataError", "Interrupted", "ViT", "ViTConfig",
           "ViTHub", "ViTHubConfig", "attention_heatmaps", "attention_maps", "classify",
           "create_model",
           "features", "load",
           "load_pretrained", "predict", "run", "sweep", "train", "train_group"]
__version__ = "0.1.0"
