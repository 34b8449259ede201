"""vit_flax: the Keras "Image classification with Vision Transformer" example in JAX/Flax.

Importing it changes nothing process-wide (no matplotlib backend, no JAX rule): the
process-wide speed settings are applied by `run` (and so train.py), see vit_flax.runtime.
"""

from vit_flax.checkpoints import CheckpointError
from vit_flax.config import ConfigError, ViTConfig
from vit_flax.data import DataError
from vit_flax.experiment import run
from vit_flax.group import sweep, train_group
from vit_flax.inference import load, predict
from vit_flax.model import ViT
from vit_flax.models import create_model
from vit_flax.pretrained import load_pretrained
from vit_flax.research import attention_heatmaps, attention_maps, features
from vit_flax.signals import Interrupted
from vit_flax.trainer import train
from vit_flax.vit import ViTHub, ViTHubConfig

__all__ = ["CheckpointError", "ConfigError", "DataError", "Interrupted", "ViT", "ViTConfig",
           "ViTHub", "ViTHubConfig", "attention_heatmaps", "attention_maps", "create_model",
           "features", "load",
           "load_pretrained", "predict", "run", "sweep", "train", "train_group"]
__version__ = "0.1.0"
