"""The seed's Keras model ("Image classification with Vision Transformer"), built from a
`vit_flax.ViTConfig` instead of the seed's module-level hyperparameters.

The layer code is the seed's, line for line; only the numbers come from the config (the
seed's literal dropout rates 0.1 / 0.1 / 0.5 are config.attention_dropout / dropout /
head_dropout), and Patches / PatchEncoder forward **kwargs (name, dtype) to keras Layer so
that Keras can rebuild them from their own get_config.
`random_layers=False` leaves RandomFlip/RandomRotation/RandomZoom out of the
`data_augmentation` Sequential: the model every test of training math uses, where
augmentation is either absent or injected at fixed parameters.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402

from vit_flax import ViTConfig  # noqa: E402


class Patches(layers.Layer):
    """The seed's Patches layer."""

    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, images):
        input_shape = ops.shape(images)
        batch_size = input_shape[0]
        height = input_shape[1]
        width = input_shape[2]
        channels = input_shape[3]
        num_patches_h = height // self.patch_size
        num_patches_w = width // self.patch_size
        patches = keras.ops.image.extract_patches(images, size=self.patch_size)
        patches = ops.reshape(
            patches,
            (batch_size, num_patches_h * num_patches_w,
             self.patch_size * self.patch_size * channels),
        )
        return patches

    def get_config(self):
        config = super().get_config()
        config.update({"patch_size": self.patch_size})
        return config


class PatchEncoder(layers.Layer):
    """The seed's PatchEncoder: Dense projection + position Embedding."""

    def __init__(self, num_patches, projection_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_patches = num_patches
        self.projection = layers.Dense(units=projection_dim)
        self.position_embedding = layers.Embedding(input_dim=num_patches,
                                                   output_dim=projection_dim)

    def call(self, patch):
        positions = ops.expand_dims(ops.arange(start=0, stop=self.num_patches, step=1), axis=0)
        projected_patches = self.projection(patch)
        encoded = projected_patches + self.position_embedding(positions)
        return encoded

    def get_config(self):
        config = super().get_config()
        config.update({"num_patches": self.num_patches})
        return config


def mlp(x, hidden_units, dropout_rate):
    """The seed's mlp()."""
    for units in hidden_units:
        x = layers.Dense(units, activation=keras.activations.gelu)(x)
        x = layers.Dropout(dropout_rate)(x)
    return x


def build_data_augmentation(config: ViTConfig, adapt_images: np.ndarray | None = None,
                            random_layers: bool = True) -> keras.Sequential:
    """The seed's `data_augmentation` Sequential, adapted on `adapt_images` when given.

    Unadapted, Normalization keeps its initial mean 0 / variance 1 (an identity) until
    `flax_to_keras` or `load_weights` sets the statistics.
    """
    size = config.image_size
    stack = [layers.Normalization(), layers.Resizing(size, size)]
    if random_layers:
        stack += [
            layers.RandomFlip("horizontal"),
            layers.RandomRotation(factor=config.rotation_factor),
            layers.RandomZoom(height_factor=config.zoom_factor, width_factor=config.zoom_factor),
        ]
    data_augmentation = keras.Sequential(stack, name="data_augmentation")
    if adapt_images is not None:
        data_augmentation.layers[0].adapt(adapt_images)
    return data_augmentation


def build_keras_vit(config: ViTConfig, adapt_images: np.ndarray | None = None,
                    random_layers: bool = True) -> keras.Model:
    """The seed's `create_vit_classifier()` for `config` (head "flatten" only: the seed's)."""
    if config.head != "flatten":
        raise ValueError(f"the seed's Keras model flattens the tokens; head={config.head!r} "
                         f"has no Keras reference")
    input_shape = config.input_shape
    data_augmentation = build_data_augmentation(config, adapt_images, random_layers)

    inputs = keras.Input(shape=input_shape)
    augmented = data_augmentation(inputs)
    patches = Patches(config.patch_size)(augmented)
    encoded_patches = PatchEncoder(config.num_patches, config.projection_dim)(patches)

    eps = config.layer_norm_epsilon
    for _ in range(config.transformer_layers):
        x1 = layers.LayerNormalization(epsilon=eps)(encoded_patches)
        attention_output = layers.MultiHeadAttention(
            num_heads=config.num_heads, key_dim=config.projection_dim,
            dropout=config.attention_dropout,
        )(x1, x1)
        x2 = layers.Add()([attention_output, encoded_patches])
        x3 = layers.LayerNormalization(epsilon=eps)(x2)
        x3 = mlp(x3, hidden_units=list(config.transformer_units), dropout_rate=config.dropout)
        encoded_patches = layers.Add()([x3, x2])

    representation = layers.LayerNormalization(epsilon=eps)(encoded_patches)
    representation = layers.Flatten()(representation)
    representation = layers.Dropout(config.head_dropout)(representation)
    features = mlp(representation, hidden_units=list(config.mlp_head_units),
                   dropout_rate=config.head_dropout)
    logits = layers.Dense(config.num_classes)(features)
    return keras.Model(inputs=inputs, outputs=logits)


def compile_like_seed(model: keras.Model, config: ViTConfig) -> keras.Model:
    """The seed's `run_experiment` compile: AdamW, sparse CE from logits, two metrics."""
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=config.learning_rate,
                                         weight_decay=config.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(5, name="top-5-accuracy"),
        ],
    )
    return model
