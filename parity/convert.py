"""Weights between the seed's Keras model and a vit_flax `ViT`, both ways.

The Keras-free part -- the `Structure` both sides are read into, matching by structure, the
`.weights.h5` reader (`load_keras_weights`) -- is vit_flax.weights.keras_h5; here is what
needs a Keras model: reading one into a `Structure` (`keras_structure`), the config it implies
(`config_from_keras`), and the conversions `keras_to_flax` / `flax_to_keras`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from vit_flax import ViT, ViTConfig
from vit_flax.models.factory import abstract_model, check_filled
from vit_flax.weights.keras_h5 import (  # noqa: F401 (parity.convert's names, as before)
    ATTENTION_PARTS,
    BLOCK_LAYERS,
    H5_CLASS_PREFIXES,
    Layer,
    Structure,
    Weight,
    WeightMismatchError,
    copy_weights,
    exactly_one,
    flax_structure,
    h5_structure,
    load_keras_weights,
    match,
    split_blocks,
    suffix_key,
)

# --- Keras model side -----------------------------------------------------------------------

def _keras():
    import keras  # Only the Keras-model paths need Keras; loading a .weights.h5 does not.

    return keras


def _keras_weight(name: str, variable) -> Weight:
    if not isinstance(variable, _keras().Variable):
        raise WeightMismatchError(f"{name} is not a plain Keras variable ({type(variable)}): "
                                  f"quantized or LoRA layers are not supported")
    return Weight(name, tuple(variable.shape), lambda: np.asarray(variable.numpy()),
                  variable.assign, variable)


def _keras_layer(layer, label_suffix: str = "", **variables) -> Layer:
    return Layer(f"Keras layer {layer.name!r}{label_suffix}",
                 [_keras_weight(name, v) for name, v in variables.items()])


def _dense(layer, suffix: str = "") -> Layer:
    if layer.bias is None:
        return _keras_layer(layer, suffix, kernel=layer.kernel)
    return _keras_layer(layer, suffix, kernel=layer.kernel, bias=layer.bias)


def flat_keras_layers(model) -> list:
    """The model's layers in order, nested Sequential/Functional models expanded."""
    keras = _keras()
    layers = []
    for layer in model.layers:
        layers += flat_keras_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return layers


def _sublayers(layer) -> list:
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _is_patch_encoder(layer) -> bool:
    """The seed's PatchEncoder by structure: one Dense and one Embedding inside."""
    keras = _keras()
    kinds = sorted(type(sub).__name__ for sub in _sublayers(layer)
                   if isinstance(sub, (keras.layers.Dense, keras.layers.Embedding)))
    return kinds == ["Dense", "Embedding"]


@dataclasses.dataclass
class KerasLayers:
    """The layers of a seed-shaped Keras model that matter, by kind, in graph order."""

    normalization: list
    patch_encoder: list
    layer_norms: list
    attentions: list
    denses: list
    dropouts: list
    others: list  # Resizing, the random layers, Flatten / pooling: read for the config.


def classify_keras_layers(model) -> KerasLayers:
    keras = _keras()
    kinds = KerasLayers([], [], [], [], [], [], [])
    by_type = ((keras.layers.Normalization, kinds.normalization),
               (keras.layers.LayerNormalization, kinds.layer_norms),
               (keras.layers.MultiHeadAttention, kinds.attentions),
               (keras.layers.Dense, kinds.denses), (keras.layers.Dropout, kinds.dropouts))
    for layer in flat_keras_layers(model):
        bucket = next((b for t, b in by_type if isinstance(layer, t)), None)
        if bucket is None and _is_patch_encoder(layer):
            bucket = kinds.patch_encoder
        if bucket is not None:
            bucket.append(layer)
        elif layer.weights:
            raise WeightMismatchError(
                f"Keras layer {layer.name!r} ({type(layer).__name__}) has weights "
                f"{[tuple(w.shape) for w in layer.weights]} that vit_flax has no place for")
        else:
            kinds.others.append(layer)
    return kinds


def _check_block_order(model, norms: list, attentions: list, mlps: list, head: list) -> None:
    """In the model's (topological) layer order, each block must read LN, MHA, LN, Dense,
    Dense, before the next block's: the seed's wiring, not merely its layer counts."""
    position = {id(layer): i for i, layer in enumerate(flat_keras_layers(model))}
    sequence = [layer for (n1, n2), attention, (d1, d2) in zip(norms, attentions, mlps,
                                                               strict=True)
                for layer in (n1, attention, n2, d1, d2)] + head
    for before, after in itertools.pairwise(sequence):
        if position[id(before)] > position[id(after)]:
            raise WeightMismatchError(
                f"the Keras model {model.name!r} is not wired like the seed's: layer "
                f"{after.name!r} comes before {before.name!r}")


def _statistics_layer(normalization) -> Layer:
    if getattr(normalization, "input_mean", None) is not None:
        raise WeightMismatchError(
            f"Keras layer {normalization.name!r} was given a fixed mean/variance, which Keras "
            f"keeps as constants, not weights; the seed adapts it (Normalization().adapt)")
    return _keras_layer(normalization, mean=normalization.adapt_mean,
                        variance=normalization.adapt_variance, count=normalization.count)


def keras_structure(model) -> Structure:
    description = f"the Keras model {model.name!r}"
    kinds = classify_keras_layers(model)
    normalization = exactly_one(kinds.normalization, "Normalization", description)
    encoder = exactly_one(kinds.patch_encoder, "PatchEncoder (Dense + Embedding)", description)
    norms, mlps, head = split_blocks(description, kinds.layer_norms, kinds.attentions,
                                      kinds.denses, lambda layer: layer.name)
    _check_block_order(model, norms, kinds.attentions, mlps, head)
    keras = _keras()
    projection = next(s for s in _sublayers(encoder) if isinstance(s, keras.layers.Dense))
    embedding = next(s for s in _sublayers(encoder) if isinstance(s, keras.layers.Embedding))

    def norm_layer(layer):
        return _keras_layer(layer, gamma=layer.gamma, beta=layer.beta)

    blocks = []
    for (norm_1, norm_2), attention, (dense_1, dense_2) in zip(norms, kinds.attentions, mlps,
                                                              strict=True):
        parts = [_dense(getattr(attention, attr), f" of {attention.name!r}")
                 for _, attr in ATTENTION_PARTS]
        blocks.append([norm_layer(norm_1), *parts, norm_layer(norm_2),
                       _dense(dense_1), _dense(dense_2)])
    return Structure(
        description=description,
        normalization=_statistics_layer(normalization),
        patch_encoder=[_dense(projection, f" of {encoder.name!r}"),
                       _keras_layer(embedding, f" of {encoder.name!r}",
                                    embeddings=embedding.embeddings)],
        blocks=blocks,
        head=[norm_layer(head[0]), *(_dense(d) for d in head[1:])],
    )


# --- the configuration a Keras model implies --------------------------------------------------

def _one_value(values: dict, what: str):
    """The single value every named layer agrees on (vit_flax has one setting for all)."""
    distinct = set(values.values())
    if len(distinct) != 1:
        raise WeightMismatchError(f"vit_flax has one {what} but these Keras layers differ: "
                                  f"{values}")
    return distinct.pop()


def _symmetric_factor(layer, lower: float, upper: float, what: str) -> float:
    if not math.isclose(-lower, upper):
        raise WeightMismatchError(f"Keras layer {layer.name!r}: vit_flax's {what} is a "
                                  f"symmetric range, got ({lower}, {upper})")
    return float(upper)


def _augmentation_fields(others: list) -> dict:
    """image_size from Resizing; the random layers' factors (0.0 where a layer is absent)."""
    keras = _keras()
    fields = {"rotation_factor": 0.0, "zoom_factor": 0.0}
    for layer in others:
        if isinstance(layer, keras.layers.Resizing):
            if layer.height != layer.width:
                raise WeightMismatchError(f"Keras layer {layer.name!r} resizes to "
                                          f"{layer.height}x{layer.width}: not square")
            fields["image_size"] = layer.height
        elif isinstance(layer, keras.layers.RandomRotation):
            fields["rotation_factor"] = _symmetric_factor(layer, *layer.factor, "rotation")
        elif isinstance(layer, keras.layers.RandomZoom):
            height = _symmetric_factor(layer, layer.height_lower, layer.height_upper, "zoom")
            width = _symmetric_factor(layer, layer.width_lower, layer.width_upper, "zoom")
            fields["zoom_factor"] = _one_value({"height": height, "width": width},
                                               "zoom factor")
    if "image_size" not in fields:
        raise WeightMismatchError("the Keras model has no Resizing layer (vit_flax resizes)")
    return fields


def _head_kind(others: list) -> str:
    keras = _keras()
    if any(isinstance(layer, keras.layers.Flatten) for layer in others):
        return "flatten"
    if any(isinstance(layer, keras.layers.GlobalAveragePooling1D) for layer in others):
        return "gap"
    raise WeightMismatchError("the Keras model neither flattens nor averages its tokens")


def config_from_keras(model, base: ViTConfig | None = None) -> ViTConfig:
    """The ViTConfig of a Keras model built from the seed's code.

    Training settings (learning rate, batch size, epochs ...) are not in a Keras model: they
    come from `base` (default ViTConfig()). Absent random layers give factors of 0.0.
    """
    kinds = classify_keras_layers(model)
    structure = keras_structure(model)
    projection = structure.patch_encoder[0].weights[0].shape  # (patch_dim, projection_dim)
    channels = structure.normalization.weights[0].shape[0]
    patch_size = math.isqrt(projection[0] // channels)
    _, height, width, input_channels = model.input_shape
    attention = {a.name: (a.num_heads, a.key_dim, a.dropout) for a in kinds.attentions}
    blocks = len(kinds.attentions)
    dropouts = {d.name: d.rate for d in kinds.dropouts}
    names = list(dropouts)
    fields = dict(
        num_classes=structure.head[-1].weights[0].shape[1],
        input_size=height, channels=channels, patch_size=patch_size,
        projection_dim=projection[1], transformer_layers=blocks,
        mlp_head_units=tuple(layer.weights[0].shape[1] for layer in structure.head[1:-1]),
        head=_head_kind(kinds.others),
        layer_norm_epsilon=_one_value({n.name: n.epsilon for n in kinds.layer_norms},
                                      "LayerNormalization epsilon"),
        **_augmentation_fields(kinds.others),
    )
    if height != width or input_channels != channels:
        raise WeightMismatchError(f"Keras input shape {model.input_shape} is not square "
                                  f"with {channels} channels")
    if blocks:
        heads, key_dim, attention_dropout = _one_value(attention, "(num_heads, key_dim, "
                                                                  "attention dropout)")
        if key_dim != fields["projection_dim"]:
            raise WeightMismatchError(f"MultiHeadAttention key_dim {key_dim}: vit_flax uses "
                                      f"key_dim = projection_dim = {fields['projection_dim']}")
        fields.update(num_heads=heads, attention_dropout=float(attention_dropout),
                      mlp_dim=structure.blocks[0][6].weights[0].shape[1])  # 2 x width: 0.
        fields["dropout"] = float(_one_value({n: dropouts[n] for n in names[:2 * blocks]},
                                             "block dropout rate"))
    if names[2 * blocks:]:
        fields["head_dropout"] = float(_one_value({n: dropouts[n] for n in names[2 * blocks:]},
                                                  "head dropout rate"))
    return (base or ViTConfig()).replace(**fields)


MODEL_FIELDS = ("num_classes", "input_size", "channels", "image_size", "rotation_factor",
                "zoom_factor", "patch_size", "projection_dim", "num_heads",
                "transformer_layers", "mlp_dim", "mlp_head_units", "head", "attention_dropout",
                "dropout", "head_dropout", "layer_norm_epsilon")


def check_config(config: ViTConfig, keras_model) -> None:
    """`config` must describe `keras_model`: weights (shapes) first, then the settings."""
    match(keras_structure(keras_model), flax_structure(abstract_model(config)))
    implied = config_from_keras(keras_model)
    differ = {f: (getattr(config, f), getattr(implied, f)) for f in MODEL_FIELDS
              if getattr(config, f) != getattr(implied, f)}
    if differ:
        detail = "; ".join(f"config.{f}={mine!r}, Keras {theirs!r}"
                           for f, (mine, theirs) in differ.items())
        raise WeightMismatchError(f"the config does not describe the Keras model "
                                  f"{keras_model.name!r}: {detail}")


# --- public API -------------------------------------------------------------------------------

def keras_to_flax(keras_model, config: ViTConfig | None = None) -> ViT:
    """A vit_flax ViT with the Keras model's weights and Normalization statistics.

    Without `config`, the configuration is read off the Keras model (`config_from_keras`);
    with one, it must describe the Keras model, or WeightMismatchError says where not.
    """
    if config is None:
        config = config_from_keras(keras_model)
    else:
        check_config(config, keras_model)
    model = abstract_model(config)
    copy_weights(keras_structure(keras_model), flax_structure(model))
    return check_filled(model, WeightMismatchError)


def flax_to_keras(flax_model: ViT, keras_model):
    """Write the ViT's weights and statistics into the seed-shaped `keras_model`; returns it."""
    check_config(flax_model.config, keras_model)
    copy_weights(flax_structure(flax_model), keras_structure(keras_model))
    # Normalization snapshots its statistics into constants; assign() alone leaves them stale.
    for layer in classify_keras_layers(keras_model).normalization:
        layer.finalize_state()
    return keras_model
