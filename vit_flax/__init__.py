"""vit_flax: the Keras "Image classification with Vision Transformer" example in JAX/Flax."""

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.data import DataError
from vit_flax.inference import load, predict
from vit_flax.model import ViT, create_model
from vit_flax.trainer import run, train

__all__ = ["ConfigError", "DataError", "ViT", "ViTConfig", "create_model", "load", "predict",
           "run", "train"]
__version__ = "0.1.0"
