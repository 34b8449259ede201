"""Using a trained model: load and predict, features and attention maps."""

from vit_flax.inference.predict import load, predict

__all__ = ["load", "predict"]
