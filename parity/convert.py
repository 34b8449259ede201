"""Weights between the seed's Keras model (or its `.weights.h5`) and a vit_flax `ViT`.

Layers are matched by structure, never by name: Keras names layers `dense_17` or
`multi_head_attention_3` depending on what the process built before, and the weights file
renames them again (`layers/dense_16`). Each side is read into the same `Structure` --
Normalization, PatchEncoder, one group of layers per transformer block, the head -- in the
model's topological order; the two are then checked layer by layer (counts, weights, shapes)
before anything is copied, so a mismatch raises `WeightMismatchError` and copies nothing.

The one assumption about order: within one kind of layer (all Dense, all LayerNormalization,
all MultiHeadAttention), the model's layer order is the order of the seed's graph. Keras'
functional models list layers topologically, and its saver numbers file groups in that order.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax import ViT, ViTConfig

# The MultiHeadAttention projections, in vit_flax's order and under Keras' attribute names.
ATTENTION_PARTS = (("query", "query_dense"), ("key", "key_dense"), ("value", "value_dense"),
                   ("attention_output", "output_dense"))
# Layers per transformer block: LN, query, key, value, output, LN, Dense, Dense.
BLOCK_LAYERS = 8


class WeightMismatchError(ValueError):
    """The two models differ: the message names the layer and both shapes (or counts)."""


@dataclasses.dataclass
class Weight:
    """One array of one side, with how to read and write it."""

    name: str  # e.g. "kernel", "vars/0"
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    write: Callable[[np.ndarray], None] | None = None
    ref: object = None  # The Keras variable / nnx.Variable / h5 dataset itself.


@dataclasses.dataclass
class Layer:
    label: str  # Where it lives, for messages: "Keras layer 'dense_17'", "blocks[0].mlp..."
    weights: list[Weight]


@dataclasses.dataclass
class Structure:
    """A seed-shaped model's weights, grouped the same way whatever their origin."""

    description: str  # "the Keras model 'functional_1'", "weights file x.weights.h5", ...
    normalization: Layer
    patch_encoder: list[Layer]  # projection, position embedding
    blocks: list[list[Layer]]  # ln1, query, key, value, attention_output, ln2, dense, dense
    head: list[Layer]  # layer norm, the MLP's Dense layers, the logits Dense

    def layers(self) -> list[Layer]:
        return [self.normalization, *self.patch_encoder,
                *(layer for block in self.blocks for layer in block), *self.head]


# --- matching -------------------------------------------------------------------------------

def _describe(layer: Layer) -> str:
    shapes = ", ".join(f"{w.name} {w.shape}" for w in layer.weights)
    return f"{layer.label} [{shapes}]"


def _check_counts(kind: str, source: Structure, src: list, target: Structure, dst: list,
                  hint: str) -> None:
    if len(src) == len(dst):
        return
    longer, other = (src, dst) if len(src) > len(dst) else (dst, src)
    first_extra = longer[len(other)]
    # A block is named by its attention's query projection: the layer that makes it a block.
    layer = first_extra[1] if isinstance(first_extra, list) else first_extra
    raise WeightMismatchError(
        f"{source.description} has {len(src)} {kind}, {target.description} has {len(dst)} "
        f"({hint}); the first without a counterpart: {_describe(layer)}")


def _pair_layer(source: Layer, target: Layer) -> list[tuple[Weight, Weight]]:
    if len(source.weights) != len(target.weights):
        raise WeightMismatchError(
            f"{_describe(source)} has {len(source.weights)} weights but {_describe(target)} "
            f"has {len(target.weights)}: a missing or extra weight")
    pairs = []
    for src, dst in zip(source.weights, target.weights, strict=True):
        if tuple(src.shape) != tuple(dst.shape):
            raise WeightMismatchError(
                f"shape mismatch: {source.label} {src.name} has shape {tuple(src.shape)}, "
                f"{target.label} {dst.name} has shape {tuple(dst.shape)}")
        pairs.append((src, dst))
    return pairs


def match(source: Structure, target: Structure) -> list[tuple[Weight, Weight]]:
    """Every (source, target) weight pair, after checking counts and shapes everywhere."""
    _check_counts("transformer blocks", source, source.blocks, target, target.blocks,
                  "config.transformer_layers")
    _check_counts("head layers (LayerNorm + Dense)", source, source.head, target, target.head,
                  "config.mlp_head_units + the logits Dense")
    pairs = []
    for src, dst in zip(source.layers(), target.layers(), strict=True):
        pairs += _pair_layer(src, dst)
    return pairs


def copy_weights(source: Structure, target: Structure) -> None:
    """All or nothing: `match` checks everything before the first write."""
    for src, dst in match(source, target):
        dst.write(src.read())


# --- vit_flax side --------------------------------------------------------------------------

def _flax_weight(name: str, variable: nnx.Variable) -> Weight:
    def write(value):
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))

    return Weight(name, tuple(variable.get_value().shape),
                  lambda: np.asarray(variable.get_value()), write, variable)


def _flax_layer(label: str, module, names: tuple[str, ...]) -> Layer:
    return Layer(f"vit_flax {label}", [_flax_weight(n, getattr(module, n)) for n in names])


def flax_structure(model: ViT) -> Structure:
    config = model.config
    if config.head == "cls":
        raise WeightMismatchError("vit_flax head='cls' has a class token the seed's Keras "
                                  "model does not have")
    dense, norm = ("kernel", "bias"), ("scale", "bias")
    blocks = []
    for i, block in enumerate(model.blocks):
        attention = block.attention
        blocks.append([
            _flax_layer(f"blocks[{i}].layer_norm_1", block.layer_norm_1, norm),
            *(_flax_layer(f"blocks[{i}].attention.{part}", getattr(attention, part), dense)
              for part, _ in ATTENTION_PARTS),
            _flax_layer(f"blocks[{i}].layer_norm_2", block.layer_norm_2, norm),
            *(_flax_layer(f"blocks[{i}].mlp.dense[{j}]", d, dense)
              for j, d in enumerate(block.mlp.dense)),
        ])
    head = model.head
    encoder = model.patch_encoder
    return Structure(
        description=f"the vit_flax model ({config.transformer_layers} blocks, "
                    f"mlp_head_units={config.mlp_head_units})",
        normalization=_flax_layer("data_augmentation.normalization",
                                  model.data_augmentation.normalization,
                                  ("mean", "variance", "count")),
        patch_encoder=[_flax_layer("patch_encoder.projection", encoder.projection, dense),
                       _flax_layer("patch_encoder.position_embedding",
                                   encoder.position_embedding, ("embedding",))],
        blocks=blocks,
        head=[_flax_layer("head.layer_norm", head.layer_norm, norm),
              *(_flax_layer(f"head.mlp.dense[{j}]", d, dense)
                for j, d in enumerate(head.mlp.dense)),
              _flax_layer("head.logits", head.logits, dense)],
    )


def abstract_vit(config: ViTConfig) -> ViT:
    """A ViT whose arrays are shapes only: every one must be written before use."""
    return nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))


def check_filled(model: ViT) -> ViT:
    """A conversion that left an array unwritten is a bug, never a partial model."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    missing = [jax.tree_util.keystr(path) for path, leaf in leaves
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise WeightMismatchError(f"no source weight for vit_flax {', '.join(missing)}")
    return model


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


def _exactly_one(found: list, what: str, description: str):
    if len(found) != 1:
        raise WeightMismatchError(f"{description} has {len(found)} {what} layers, the seed's "
                                  f"model has one: {[layer.name for layer in found]}")
    return found[0]


def _split_blocks(description: str, layer_norms: list, attentions: list, denses: list,
                  label: Callable) -> tuple[list, list, list]:
    """(per-block layer norms, per-block Denses, head layers) from the by-kind lists.

    Block i owns LayerNorms 2i and 2i+1 and Denses 2i and 2i+1 (the seed's mlp of two
    widths); what follows is the head.
    """
    blocks = len(attentions)
    if len(layer_norms) != 2 * blocks + 1 or len(denses) < 2 * blocks + 1:
        raise WeightMismatchError(
            f"{description} is not shaped like the seed's model: {blocks} MultiHeadAttention, "
            f"{len(layer_norms)} LayerNormalization (expected {2 * blocks + 1}) and "
            f"{len(denses)} Dense layers (expected at least {2 * blocks + 1}): "
            f"{[label(x) for x in layer_norms + denses]}")
    norms = [layer_norms[2 * i:2 * i + 2] for i in range(blocks)]
    mlps = [denses[2 * i:2 * i + 2] for i in range(blocks)]
    return norms, mlps, [layer_norms[-1], *denses[2 * blocks:]]


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
    normalization = _exactly_one(kinds.normalization, "Normalization", description)
    encoder = _exactly_one(kinds.patch_encoder, "PatchEncoder (Dense + Embedding)", description)
    norms, mlps, head = _split_blocks(description, kinds.layer_norms, kinds.attentions,
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
        fields.update(num_heads=heads, attention_dropout=float(attention_dropout))
        fields["dropout"] = float(_one_value({n: dropouts[n] for n in names[:2 * blocks]},
                                             "block dropout rate"))
    if names[2 * blocks:]:
        fields["head_dropout"] = float(_one_value({n: dropouts[n] for n in names[2 * blocks:]},
                                                  "head dropout rate"))
    return (base or ViTConfig()).replace(**fields)


MODEL_FIELDS = ("num_classes", "input_size", "channels", "image_size", "rotation_factor",
                "zoom_factor", "patch_size", "projection_dim", "num_heads",
                "transformer_layers", "mlp_head_units", "head", "attention_dropout", "dropout",
                "head_dropout", "layer_norm_epsilon")


def check_config(config: ViTConfig, keras_model) -> None:
    """`config` must describe `keras_model`: weights (shapes) first, then the settings."""
    match(keras_structure(keras_model), flax_structure(abstract_vit(config)))
    implied = config_from_keras(keras_model)
    differ = {f: (getattr(config, f), getattr(implied, f)) for f in MODEL_FIELDS
              if getattr(config, f) != getattr(implied, f)}
    if differ:
        detail = "; ".join(f"config.{f}={mine!r}, Keras {theirs!r}"
                           for f, (mine, theirs) in differ.items())
        raise WeightMismatchError(f"the config does not describe the Keras model "
                                  f"{keras_model.name!r}: {detail}")


# --- .weights.h5 side -------------------------------------------------------------------------

# The group names Keras' saver gives the seed's weighted layers (snake-cased class names).
H5_CLASS_PREFIXES = {"dense": "dense", "layer_normalization": "layer_norm",
                     "normalization": "normalization"}


def suffix_key(name: str) -> tuple[str, int]:
    """Keras' saver numbers repeated names dense, dense_1, ..., dense_10: sort by the number."""
    found = re.fullmatch(r"(.*)_(\d+)", name)
    return (found.group(1), int(found.group(2)) + 1) if found else (name, 0)


def _vars(group) -> list:
    """A layer group's datasets, vars/0, vars/1, ... in numeric order."""
    if "vars" not in group:
        return []
    return [group["vars"][k] for k in sorted(group["vars"], key=int)]


def _h5_layer(group, variables: list) -> Layer:
    name = group["vars"].attrs.get("name") if "vars" in group else None  # The layer's own name.
    label = f"{group.name}" + (f" (layer {name!r})" if name is not None else "")
    return Layer(label, [Weight(f"vars/{v.name.rsplit('/', 1)[-1]}", tuple(v.shape),
                                lambda v=v: np.asarray(v[()]), ref=v)
                         for v in variables])


def _children(group) -> list:
    import h5py

    return [group[k] for k in sorted(group, key=suffix_key)
            if k != "vars" and isinstance(group[k], h5py.Group)]


def _weighted(group) -> bool:
    return bool(_vars(group)) or any(_weighted(child) for child in _children(group))


def _h5_kind(group) -> str:
    """What a layer group is, from the shapes it holds (its name is not trusted)."""
    shapes = [tuple(v.shape) for v in _vars(group)]
    children = [c for c in _children(group) if _weighted(c)]
    parts = {c.name.rsplit("/", 1)[-1] for c in children}
    if {attr for _, attr in ATTENTION_PARTS} <= parts and not shapes:
        return "attention"
    if "layers" in parts and not shapes:
        return "container"  # A nested Sequential / Functional: look inside.
    if (not children and len(shapes) == 3 and shapes[2] == () and len(shapes[0]) == 1
            and shapes[0] == shapes[1]):
        return "normalization"
    if not children and len(shapes) == 2 and len(shapes[0]) == 2 and len(shapes[1]) == 1:
        return "dense"
    if not children and len(shapes) == 2 and len(shapes[0]) == len(shapes[1]) == 1:
        return "layer_norm"
    if not shapes and sorted(len(_vars(c)) for c in children) == [1, 2]:
        return "patch_encoder"
    if not (shapes or children):
        return "empty"
    # Shapes fit no layer of the seed's model (a weight missing or extra). The saver's group
    # name starts with the layer's class (dense_3: Dense), never with its own name: take the
    # kind from it, so that matching reports the weight counts and shapes against vit_flax.
    return H5_CLASS_PREFIXES.get(suffix_key(group.name.rsplit("/", 1)[-1])[0], "unknown")


def _h5_layers_by_kind(group, kinds: dict) -> dict:
    for child in _children(group):
        kind = _h5_kind(child)
        if kind == "container":
            _h5_layers_by_kind(child["layers"], kinds)
        elif kind == "unknown":
            raise WeightMismatchError(
                f"{child.name} holds weights vit_flax has no place for: "
                f"{[tuple(v.shape) for v in _vars(child)]}")
        elif kind != "empty":
            kinds.setdefault(kind, []).append(child)
    return kinds


def h5_structure(h5file, description: str) -> Structure:
    if "layers" not in h5file:
        raise WeightMismatchError(f"{description} has no 'layers' group: not a Keras 3 "
                                  f".weights.h5 file")
    kinds = _h5_layers_by_kind(h5file["layers"], {})
    normalization = _exactly_one(kinds.get("normalization", []), "Normalization", description)
    encoder = _exactly_one(kinds.get("patch_encoder", []), "PatchEncoder", description)
    attentions = kinds.get("attention", [])
    norms, mlps, head = _split_blocks(description, kinds.get("layer_norm", []), attentions,
                                      kinds.get("dense", []), lambda g: g.name)

    def plain(group):
        return _h5_layer(group, _vars(group))

    encoder_parts = sorted((c for c in _children(encoder) if _vars(c)),
                           key=lambda c: -len(_vars(c)))  # projection (2 vars), embedding (1)
    blocks = [[plain(n1), *(plain(attention[attr]) for _, attr in ATTENTION_PARTS), plain(n2),
               plain(d1), plain(d2)]
              for (n1, n2), attention, (d1, d2) in zip(norms, attentions, mlps, strict=True)]
    return Structure(description=description, normalization=plain(normalization),
                     patch_encoder=[plain(c) for c in encoder_parts], blocks=blocks,
                     head=[plain(g) for g in head])


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
    model = abstract_vit(config)
    copy_weights(keras_structure(keras_model), flax_structure(model))
    return check_filled(model)


def flax_to_keras(flax_model: ViT, keras_model):
    """Write the ViT's weights and statistics into the seed-shaped `keras_model`; returns it."""
    check_config(flax_model.config, keras_model)
    copy_weights(flax_structure(flax_model), keras_structure(keras_model))
    # Normalization snapshots its statistics into constants; assign() alone leaves them stale.
    for layer in classify_keras_layers(keras_model).normalization:
        layer.finalize_state()
    return keras_model


def load_keras_weights(path: str | Path, config: ViTConfig) -> ViT:
    """A ViT of `config` from a `.weights.h5` written by Keras' save_weights/ModelCheckpoint."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as h5file:
        model = abstract_vit(config)
        copy_weights(h5_structure(h5file, f"weights file {path.name}"), flax_structure(model))
    return check_filled(model)
