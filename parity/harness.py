"""What the parity tests and compare_training share: data, fixed augmentation, gradients.

"Fixed augmentation" replaces the random draws -- never the transforms -- on both sides:
Keras' random layers get a `get_random_transformation` that returns given parameters (the
layer's own `transform_images` then runs, Keras' matrix code included), and vit_flax's
`augment.sample_*` functions are swapped for ones that return the same parameters (the
model's own `random_augment` and transforms then run, inside the real train step).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
from flax import nnx
from keras import ops

from parity.convert import flat_keras_layers
from vit_flax import ViT, ViTConfig
from vit_flax.models import augment

# Every layer kind of the seed's model, small enough for eager Keras training on two cores:
# 2 blocks instead of 8, a (64, 32) head MLP instead of (2048, 1024), 10 classes.
SMALL = ViTConfig(transformer_layers=2, mlp_head_units=(64, 32), num_classes=10)
# Training-math comparisons switch every dropout off (augmentation is fixed separately).
NO_DROPOUT = dict(attention_dropout=0.0, dropout=0.0, head_dropout=0.0)


def random_images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class AugmentationParameters:
    """One batch's random-layer parameters, as the layers would draw them."""

    flips: np.ndarray  # (B,) bool: mirror the width axis.
    angles: np.ndarray  # (B,) degrees.
    height_zooms: np.ndarray  # (B,)
    width_zooms: np.ndarray  # (B,)

    @classmethod
    def draw(cls, batch: int, seed: int, rotation_factor: float = 0.02,
             zoom_factor: float = 0.2) -> AugmentationParameters:
        rng = np.random.default_rng(seed)
        zooms = rng.uniform(1 - zoom_factor, 1 + zoom_factor, (2, batch)).astype(np.float32)
        return cls(rng.uniform(size=batch) <= 0.5,
                   rng.uniform(-360 * rotation_factor, 360 * rotation_factor,
                               batch).astype(np.float32),
                   zooms[0], zooms[1])


# --- Keras side -------------------------------------------------------------------------------

def _fixed_flip(params: AugmentationParameters):
    def transformation(data, training=True, seed=None):
        if not training:
            return None
        return {"flips": ops.convert_to_tensor(params.flips[:, None, None, None]),
                "input_shape": ops.shape(data)}

    return transformation


def _fixed_rotation(layer, params: AugmentationParameters):
    def transformation(data, training=True, seed=None):
        if not training:
            return None
        batch, height, width = ops.shape(data)[:3]
        angle = ops.convert_to_tensor(params.angles, "float32")
        zeros, ones = ops.zeros([batch]), ops.ones([batch])
        # Keras' own matrix code, as RandomRotation.get_random_transformation calls it.
        matrix = layer._compute_affine_matrix(
            center_x=0.5, center_y=0.5, angle=angle, translate_x=zeros, translate_y=zeros,
            scale=ones, shear_x=zeros, shear_y=zeros, height=height, width=width)
        return {"angle": angle, "rotation_matrix": matrix, "image_height": height,
                "image_width": width, "batch_size": batch}

    return transformation


def _fixed_zoom(params: AugmentationParameters):
    def transformation(data, training=True, seed=None):
        if not training:
            return None
        return {"height_zoom": ops.convert_to_tensor(params.height_zooms[:, None]),
                "width_zoom": ops.convert_to_tensor(params.width_zooms[:, None]),
                "input_shape": ops.shape(data)}

    return transformation


def fix_keras_augmentation(layers, params: AugmentationParameters) -> None:
    """Make the random layers among `layers` (or a model's) apply `params` when training."""
    if isinstance(layers, keras.Model):
        layers = flat_keras_layers(layers)
    for layer in layers:
        if isinstance(layer, keras.layers.RandomFlip):
            layer.get_random_transformation = _fixed_flip(params)
        elif isinstance(layer, keras.layers.RandomRotation):
            layer.get_random_transformation = _fixed_rotation(layer, params)
        elif isinstance(layer, keras.layers.RandomZoom):
            layer.get_random_transformation = _fixed_zoom(params)


def keras_gradients(model: keras.Model, images, labels) -> tuple[float, dict[int, np.ndarray]]:
    """(loss, {id(variable): gradient}) from Keras' own JAX training path.

    `compute_loss_and_updates` under `jax.value_and_grad` is what Keras' JAX `train_step`
    runs (the model must be compiled); training=True, as in fit.
    """
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    metrics = [v.value for v in model.metrics_variables]
    optimizer = [v.value for v in model.optimizer.variables]
    grad_fn = jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)
    (loss, _), grads = grad_fn(trainable, non_trainable, metrics, images, labels, None,
                               training=True, optimizer_variables=optimizer)
    return float(loss), {id(v): np.asarray(g) for v, g in zip(model.trainable_variables, grads,
                                                               strict=True)}


# --- vit_flax side ----------------------------------------------------------------------------

def fix_flax_augmentation(monkeypatch, params: AugmentationParameters) -> None:
    """vit_flax's random_augment draws `params` (the transforms themselves are untouched)."""
    monkeypatch.setattr(augment, "sample_flips", lambda key, batch: jnp.asarray(params.flips))
    monkeypatch.setattr(augment, "sample_angles",
                        lambda key, batch, factor: jnp.asarray(params.angles))
    monkeypatch.setattr(augment, "sample_zooms",
                        lambda key, batch, factor: (jnp.asarray(params.height_zooms),
                                                    jnp.asarray(params.width_zooms)))


def capture_gradients() -> optax.GradientTransformation:
    """An 'optimizer' that keeps the gradients as its state and leaves the weights alone:
    run through vit_flax's real train step, it hands back that step's gradients."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        del state, params
        return jax.tree.map(jnp.zeros_like, updates), updates

    return optax.GradientTransformation(init, update)


def model_with(model: ViT, params: nnx.State) -> ViT:
    """A ViT of the same structure holding `params` (e.g. gradients) as its weights."""
    graphdef, _, statistics = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, params, statistics)
