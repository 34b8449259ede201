"""Using a trained model: load and predict, features and attention maps."""

from vit_flax.inference.classify import classify, load_classifier
from vit_flax.inference.predict import load, predict

__all__ = ["classify", "load", "load_classifier", "predict"]
