"""Parity between vit_flax and the Keras example it ports (Keras 3 on its JAX backend).

`keras_to_flax`, `flax_to_keras` and `load_keras_weights` convert weights both ways;
`parity.keras_reference` builds the seed's Keras model from a `vit_flax.ViTConfig`.
"""

import os

# Keras picks its backend once, at its first import: set it before anything imports keras.
# setdefault leaves an explicit choice alone (the conversions work on any backend's numpy).
os.environ.setdefault("KERAS_BACKEND", "jax")

from parity.convert import (  # noqa: E402
    WeightMismatchError,
    config_from_keras,
    flax_to_keras,
    keras_to_flax,
    load_keras_weights,
)

__all__ = ["WeightMismatchError", "config_from_keras", "flax_to_keras", "keras_to_flax",
           "load_keras_weights"]
