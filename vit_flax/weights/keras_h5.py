"""The seed's Keras `.weights.h5` without Keras: h5py reads it, and its layers are matched to a
vit_flax `ViT` by structure.

Layers are matched by structure, never by name: Keras names layers `dense_17` or
`multi_head_attention_3` depending on what the process built before, and the weights file
renames them again (`layers/dense_16`). Each side is read into the same `Structure` --
Normalization, PatchEncoder, one group of layers per transformer block, the head -- in the
model's topological order; the two are then checked layer by layer (counts, weights, shapes)
before anything is read or copied, so a mismatch raises `WeightMismatchError` and copies
nothing. parity/convert.py adds the Keras model's side to the same structures.

The one assumption about order: within one kind of layer (all Dense, all LayerNormalization,
all MultiHeadAttention), the model's layer order is the order of the seed's graph. Keras'
functional models list layers topologically, and its saver numbers file groups in that order.

A weights file is untrusted input: its declared shapes are checked before a dataset is read
(a small file can declare a huge array), its block count before the model is built, and its
values must be finite real numbers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax.config import ViTConfig
from vit_flax.models.factory import abstract_model, check_filled
from vit_flax.models.seed_vit import ViT

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


def read_array(dataset, error: type[Exception] = ValueError) -> np.ndarray:
    """An h5 dataset's values, its shape already checked by the caller against the model's:
    real numbers only (a complex or text dataset is refused, not cast), stored in this file
    as large as they are declared (an unwritten dataset of a declared 10^6 x 10^6 costs a
    few bytes on disk and 4 TB when read), every value finite."""
    where = f"{dataset.file.filename} {dataset.name}"
    if dataset.dtype.kind not in "fiu":
        raise error(f"{where} holds {dataset.dtype} values; weights are real numbers "
                    f"(casting would lose information)")
    if dataset.is_virtual or dataset.external:
        raise error(f"{where} keeps its values in other files; a weights file holds its own")
    unfiltered = dataset.id.get_create_plist().get_nfilters() == 0
    if unfiltered and dataset.id.get_storage_size() < dataset.nbytes:
        raise error(f"{where} declares shape {dataset.shape} ({dataset.nbytes} bytes) but "
                    f"stores {dataset.id.get_storage_size()} bytes: a damaged or crafted file")
    value = np.asarray(dataset[()])
    if not np.isfinite(value).all():
        raise error(f"{where} holds {np.size(value) - np.isfinite(value).sum()} NaN or "
                    f"infinite values; a trained model's weights are finite")
    return value


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
    if not isinstance(model, ViT):
        raise WeightMismatchError(f"a {type(model).__name__} is not the seed's ViT "
                                  f"(architecture='seed'), the model a .weights.h5 holds")
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


def exactly_one(found: list, what: str, description: str):
    if len(found) != 1:
        raise WeightMismatchError(f"{description} has {len(found)} {what} layers, the seed's "
                                  f"model has one: {[layer.name for layer in found]}")
    return found[0]


def split_blocks(description: str, layer_norms: list, attentions: list, denses: list,
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
                                lambda v=v: read_array(v, WeightMismatchError), ref=v)
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
    normalization = exactly_one(kinds.get("normalization", []), "Normalization", description)
    encoder = exactly_one(kinds.get("patch_encoder", []), "PatchEncoder", description)
    attentions = kinds.get("attention", [])
    norms, mlps, head = split_blocks(description, kinds.get("layer_norm", []), attentions,
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



# --- loading ----------------------------------------------------------------------------------

def load_keras_weights(path: str | Path, config: ViTConfig) -> ViT:
    """A ViT of `config` from a `.weights.h5` written by Keras' save_weights/ModelCheckpoint
    for the seed's Keras model; WeightMismatchError (one line) where they differ."""
    import h5py  # The one reader of .h5 files; nothing else needs it.

    path = Path(path)
    if config.architecture != "seed":
        raise WeightMismatchError(f"config.architecture={config.architecture!r}: a "
                                  f".weights.h5 holds the seed's Keras model, architecture "
                                  f"'seed'")
    with h5py.File(path, "r") as h5file:
        source = h5_structure(h5file, f"weights file {path.name}")
        # Before the model is built: a config of 10,000 blocks costs minutes to build.
        if len(source.blocks) != config.transformer_layers:
            raise WeightMismatchError(
                f"{source.description} has {len(source.blocks)} transformer blocks, "
                f"config.transformer_layers is {config.transformer_layers}")
        model = abstract_model(config)
        copy_weights(source, flax_structure(model))
    return check_filled(model, WeightMismatchError)
