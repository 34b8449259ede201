"""Using a trained model: load and predict, features and attention maps."""

from vit_flax.inference.classify import load_classifier
from vit_flax.inference.predict import load, predict

# `classify` the function is vit_flax.classify: here the name stays the module's
# (vit_flax.inference.classify), which predict.py and the tests import.
__all__ = ["load", "load_classifier", "predict"]
