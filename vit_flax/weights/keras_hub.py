"""Pretrained models without Keras: Keras Hub presets (h5py + json), vit_flax workdirs, and
the seed's Keras `.weights.h5` (keras_h5).

A Keras Hub preset is the directory `save_to_preset` writes: `config.json` (the ViTBackbone's
constructor arguments) and `model.weights.h5` (its weights), for a ViTImageClassifier also
`task.json` and `task.weights.h5` (the head), and with a preprocessor `image_converter.json` /
`preprocessor.json`, whose scale and offset become ViTHubConfig.scale / offset. Weights are
found by `weight_table`: each vit_flax array, the Keras variable it mirrors, and where the
Keras saver keeps that variable (groups named after Keras Hub's attributes; the `name` each
group records is checked against the Keras layer's).

A preset is untrusted input: its JSON is checked field by field (a one-line PretrainedError
naming the field), its block count against the weights file before a model is built, and
each dataset's declared shape and type before it is read; weights must be finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax.config import ConfigError
from vit_flax.inference.predict import load
from vit_flax.infra.workdir import BEST_CHECKPOINT
from vit_flax.models.factory import abstract_model, check_filled
from vit_flax.models.hub_vit import ViTHub, ViTHubConfig, resample_posemb
from vit_flax.weights.keras_h5 import load_keras_weights, read_array

MODEL_WEIGHTS, TASK_WEIGHTS = "model.weights.h5", "task.weights.h5"  # Backbone, head.
BACKBONE_FILES = ("config.json", MODEL_WEIGHTS)
# ViTBackbone's get_config() keys that are ViTHubConfig fields of the same name.
BACKBONE_FIELDS = ("image_shape", "num_layers", "num_heads", "hidden_dim", "mlp_dim",
                   "dropout_rate", "attention_dropout", "layer_norm_epsilon", "use_mha_bias",
                   "use_mlp_bias", "use_class_token", "use_patch_bias")


ENCODER_LAYERS = "layers/vi_t_encoder/encoder_layers"  # The transformer blocks' groups.


def block_group(index: int) -> str:
    """The saver names list items after their class, numbered from the second on."""
    return "vi_t_encoder_block" + (f"_{index}" if index else "")


class PretrainedError(ValueError):
    """A preset that is not a Keras Hub ViT of the expected layout; the message says where."""


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    flax: tuple[str | int, ...]  # Attributes from the ViTHub: ("backbone", ..., "kernel").
    keras: str  # The Keras variable's path: "vit_encoder/transformer_block_1/ln_1/gamma".
    h5: str  # Its dataset in the preset's weights file: "layers/.../layer_norm_1/vars/0".
    file: str = MODEL_WEIGHTS  # The backbone's; the head's is TASK_WEIGHTS.
    reshape: bool = False  # The patch Conv2D kernel (p, p, C, D) is the Dense's (p*p*C, D).


DENSE = (("kernel", "kernel"), ("bias", "bias"))  # (vit_flax name, Keras name), by index.
NORM = (("scale", "gamma"), ("bias", "beta"))


def _layer(flax: tuple, keras: str, h5: str, names, use_bias: bool = True,
           **options) -> list[WeightEntry]:
    """One layer's entries: Keras' saver numbers its variables vars/0 (kernel), vars/1."""
    names = names if use_bias else names[:1]
    return [WeightEntry((*flax, ours), f"{keras}/{theirs}", f"{h5}/vars/{index}", **options)
            for index, (ours, theirs) in enumerate(names)]


def _block_entries(config: ViTHubConfig, i: int) -> list[WeightEntry]:
    flax = ("backbone", "vit_encoder", "transformer_blocks", i)
    keras = f"vit_encoder/transformer_block_{i + 1}"
    h5 = f"{ENCODER_LAYERS}/{block_group(i)}"
    entries = _layer((*flax, "ln_1"), f"{keras}/ln_1", f"{h5}/layer_norm_1", NORM)
    for part, saved in (("query", "query_dense"), ("key", "key_dense"),
                        ("value", "value_dense"), ("attention_output", "output_dense")):
        entries += _layer((*flax, "mha", part), f"{keras}/mha/{part}", f"{h5}/mha/{saved}",
                          DENSE, config.use_mha_bias)
    entries += _layer((*flax, "ln_2"), f"{keras}/ln_2", f"{h5}/layer_norm_2", NORM)
    for dense in ("dense_1", "dense_2"):
        entries += _layer((*flax, "mlp", dense), f"{keras}/mlp/{dense}", f"{h5}/mlp/{dense}",
                          DENSE, config.use_mlp_bias)
    return entries


def _head_entries(config: ViTHubConfig) -> list[WeightEntry]:
    """The task file's Dense layers are named by class in graph order: dense, dense_1."""
    layers = (["pre_logits"] if config.intermediate_dim is not None else []) + ["predictions"]
    return [entry for index, name in enumerate(layers)
            for entry in _layer((name,), name, "layers/dense" + (f"_{index}" if index else ""),
                                DENSE, file=TASK_WEIGHTS)]


def weight_table(config: ViTHubConfig) -> list[WeightEntry]:
    """Every array of a ViTHub of `config`, with its Keras variable and its preset dataset."""
    embedding = ("backbone", "vit_patching_and_embedding")
    h5 = "layers/vi_t_patching_and_embedding"
    entries = _layer((*embedding, "patch_embedding"), "vit_patching_and_embedding/"
                     "patch_embedding", f"{h5}/patch_embedding", DENSE, config.use_patch_bias)
    entries = [dataclasses.replace(entries[0], reshape=True), *entries[1:]]
    if config.use_class_token:
        entries.append(WeightEntry((*embedding, "class_token"),
                                   "vit_patching_and_embedding/class_token", f"{h5}/vars/0"))
    entries += _layer((*embedding, "position_embedding"), "vit_patching_and_embedding/"
                      "position_embedding", f"{h5}/position_embedding",
                      (("embedding", "embeddings"),))
    for i in range(config.num_layers):
        entries += _block_entries(config, i)
    entries += _layer(("backbone", "vit_encoder", "ln"), "vit_encoder/ln",
                      "layers/vi_t_encoder/layer_norm", NORM)
    return entries + (_head_entries(config) if config.num_classes is not None else [])


# --- writing arrays into a model ----------------------------------------------------------------

def variable_at(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
    node = model
    for step in path:
        node = node[step] if isinstance(step, int) else getattr(node, step)
    return node


def write(model: nnx.Module, entry: WeightEntry, value: np.ndarray) -> None:
    """Copy `value` into the array of `entry`; another shape is a PretrainedError."""
    variable = variable_at(model, entry.flax)
    target = variable.get_value()
    if entry.reshape and value.size == target.size:
        value = value.reshape(target.shape)
    if tuple(value.shape) != tuple(target.shape):
        raise PretrainedError(f"Keras {entry.keras} has shape {tuple(value.shape)}, vit_flax "
                              f"{'.'.join(map(str, entry.flax))} {tuple(target.shape)}")
    variable.set_value(jnp.asarray(value, target.dtype))


# --- Keras Hub presets: the JSON files ------------------------------------------------------------

JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
              int: "a number", float: "a number", type(None): "null"}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise PretrainedError(f"{path} is not JSON ({error})") from None


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise PretrainedError(f"{where} must be a JSON object, got "
                              f"{JSON_TYPES.get(type(value), type(value).__name__)}")
    return value


def _config_of(document, where: str) -> dict:
    """The arguments of a serialized Keras object: {"class_name": ..., "config": {...}}."""
    return _object(_object(document, where).get("config"), f'{where}\'s "config"')


def _numbers(value, name: str, where: str) -> np.ndarray | None:
    """A converter argument: null, a number, or a list of numbers (one per channel)."""
    if value is None:
        return None
    items = value if isinstance(value, list | tuple) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, int | float) for v in items):
        raise PretrainedError(f"{where}: the image converter's {name} must be a number or a "
                              f"list of numbers, got {value!r}")
    return np.asarray(value, np.float64)


def converter_scaling(converter: dict, where: str = "the image converter") -> dict:
    """ViTImageConverter's scale and offset (None: that step skipped). Presets saved before
    keras_hub renamed them hold mean and variance: x * scale / std - mean / std."""
    scale, offset = (_numbers(converter.get(k), k, where) for k in ("scale", "offset"))
    if "mean" in converter and "variance" in converter:
        mean, variance = (_numbers(converter[k], k, where) for k in ("mean", "variance"))
        if variance is None or mean is None or not (variance > 0).all():
            raise PretrainedError(f"{where}: the image converter's variance must be > 0 and "
                                  f"its mean given, got mean {converter['mean']!r}, "
                                  f"variance {converter['variance']!r}")
        std = np.sqrt(variance)
        scale = 1.0 if scale is None else scale
        scale, offset = scale / std, -mean / std
    return {name: None if value is None else (float(value) if value.ndim == 0
                                              else tuple(map(float, value)))
            for name, value in (("scale", scale), ("offset", offset))}


def _converter(path: Path) -> dict | None:
    if (path / "image_converter.json").is_file():
        return _config_of(_read_json(path / "image_converter.json"), "image_converter.json")
    if (path / "preprocessor.json").is_file():
        converter = _config_of(_read_json(path / "preprocessor.json"),
                               "preprocessor.json").get("image_converter")
        return None if converter is None else _config_of(
            converter, "preprocessor.json's image_converter")
    return None


def _patch_size(value, where: str) -> int:
    pair = [value, value] if isinstance(value, int) else value
    if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in pair)):
        raise PretrainedError(f"{where}: patch_size must be an integer or a pair of integers, "
                              f"got {value!r}")
    if pair[0] != pair[1]:
        raise PretrainedError(f"{where}: vit_flax reads square patches, not patch_size "
                              f"{value!r}")
    return pair[0]


def _backbone_fields(backbone, where: str) -> dict:
    backbone = _object(backbone, f"{where}: the backbone (config.json)")
    if backbone.get("class_name") != "ViTBackbone":
        raise PretrainedError(f"{where} describes a {backbone.get('class_name')!r}, not a "
                              f"keras_hub ViTBackbone")
    arguments = _config_of(backbone, f"{where}: the backbone (config.json)")
    if arguments.get("data_format", "channels_last") != "channels_last":
        raise PretrainedError(f"{where}: vit_flax reads channels-last images, not "
                              f"data_format {arguments.get('data_format')!r}")
    return dict(patch_size=_patch_size(arguments.get("patch_size"), where),
                **{k: arguments[k] for k in BACKBONE_FIELDS if k in arguments})


def _task_fields(task, where: str) -> dict:
    task = _object(task, f"{where}: the classifier (task.json's \"config\")")
    if "num_classes" not in task:
        raise PretrainedError(f"{where}: the classifier (task.json) has no num_classes")
    return dict(num_classes=task["num_classes"], pooling=task.get("pooling", "token"),
                intermediate_dim=task.get("intermediate_dim"),
                activation=task.get("activation"), head_dropout=task.get("dropout", 0.0))


def hub_config(backbone: dict, task: dict | None = None, converter: dict | None = None,
               where: str = "the Keras model") -> ViTHubConfig:
    """The ViTHubConfig of a serialized ViTBackbone ({"class_name", "config"}: config.json),
    a ViTImageClassifier's get_config() (task.json's "config") and an image converter's;
    PretrainedError (one line, naming the field) for anything else."""
    fields = _backbone_fields(backbone, where)
    if task is not None:
        fields.update(_task_fields(task, where))
    if converter is not None:
        fields.update(converter_scaling(converter, where))
    try:
        return ViTHubConfig(**fields)
    except ConfigError as error:
        raise PretrainedError(f"{where}: {error}") from None


def preset_config(path: str | os.PathLike) -> ViTHubConfig:
    """The ViTHubConfig of a Keras Hub preset directory: backbone, head (task.json), scaling."""
    path = Path(path)
    task = _config_of(_read_json(path / "task.json"), "task.json") \
        if (path / "task.json").is_file() else None
    return hub_config(_read_json(path / "config.json"), task, _converter(path),
                      f"preset {path}")


# --- Keras Hub presets: the weights ---------------------------------------------------------------

def _open_h5(path: Path, stack: contextlib.ExitStack):
    import h5py  # The one reader of .h5 files; nothing else needs it.

    try:
        file = stack.enter_context(h5py.File(path, "r"))
    except OSError as error:
        raise PretrainedError(f"{path} is not a readable HDF5 file ({error})") from None
    links = []
    file.visititems_links(lambda name, link: links.append(name) if isinstance(
        link, h5py.ExternalLink) else None)
    if links:
        raise PretrainedError(f"{path} links to another file ({links[0]}): a preset's "
                              f"weights are its own")
    return file


def _check_block_count(file, config: ViTHubConfig) -> None:
    """Before a model is built: a config.json claiming 10,000 blocks would take minutes."""
    import h5py

    group = file.get(ENCODER_LAYERS)
    held = [k for k in group if k.startswith("vi_t_encoder_block")] \
        if isinstance(group, h5py.Group) else []
    if len(held) != config.num_layers or set(held) != {block_group(i) for i in range(
            config.num_layers)}:
        raise PretrainedError(f"{file.filename} holds {len(held)} transformer blocks "
                              f"({ENCODER_LAYERS}), its config.json num_layers is "
                              f"{config.num_layers}")


def _expected_shapes(entry: WeightEntry, saved: nnx.Module) -> set[tuple[int, ...]]:
    """The shapes the preset's dataset of `entry` may have: its array's in a model of the
    preset's own config (`saved`: shapes only); the patch kernel also as the Conv2D's."""
    shape = tuple(variable_at(saved, entry.flax).get_value().shape)
    if not entry.reshape:
        return {shape}
    patch, channels = saved.config.patch_size, saved.config.image_shape[-1]
    return {shape, (patch, patch, channels, shape[-1])}


def _read_entry(files: dict, entry: WeightEntry, saved: nnx.Module) -> np.ndarray:
    file = files[entry.file]
    dataset = file.get(entry.h5)
    if dataset is None or not hasattr(dataset, "dtype"):
        raise PretrainedError(f"{file.filename} has no {entry.h5} (Keras {entry.keras}): not "
                              f"a ViT of this config, or another keras_hub layout")
    # The saver records each layer's own name: a check that the group is the layer we mean.
    recorded = dataset.parent.attrs.get("name")
    expected = entry.keras.rsplit("/", 2)[-2]
    if recorded is not None and recorded != expected:
        raise PretrainedError(f"{file.filename} {entry.h5} belongs to Keras layer "
                              f"{recorded!r}, expected {expected!r}")
    shapes = _expected_shapes(entry, saved)
    if tuple(dataset.shape) not in shapes:  # Before reading: the file may declare anything.
        raise PretrainedError(f"Keras {entry.keras} has shape {tuple(dataset.shape)}, vit_flax "
                              f"{'.'.join(map(str, entry.flax))} {min(shapes, key=len)}")
    return np.asarray(read_array(dataset, PretrainedError), np.float32)


def _adapt_value(entry: WeightEntry, value: np.ndarray, saved: ViTHubConfig,
                 config: ViTHubConfig) -> np.ndarray:
    """The saved position embedding resampled when the patch grid changes."""
    if entry.flax[-2:] == ("position_embedding", "embedding") and saved.grid != config.grid:
        return resample_posemb(value, config.grid, old_grid=saved.grid)
    return value


def _read_preset(path: Path, saved: ViTHubConfig, config: ViTHubConfig,
                 fresh_head: bool) -> dict[WeightEntry, np.ndarray]:
    """Every array `config` takes from the preset (not the head's when `fresh_head`), each
    checked (shape, type, finite values) before the next is read."""
    with contextlib.ExitStack() as stack:
        files = {MODEL_WEIGHTS: _open_h5(path / MODEL_WEIGHTS, stack)}
        _check_block_count(files[MODEL_WEIGHTS], saved)
        entries = [e for e in weight_table(config) if not fresh_head or e.file == MODEL_WEIGHTS]
        for name in sorted({e.file for e in entries} - set(files)):
            files[name] = _open_h5(path / name, stack)
        shapes = abstract_model(saved)
        return {entry: _read_entry(files, entry, shapes) for entry in entries}


def load_preset(path: str | os.PathLike, *, num_classes: int | None = None,
                image_shape: tuple[int, int, int] | None = None,
                seed: int = 0) -> tuple[ViTHub, ViTHubConfig]:
    """A ViTHub with a Keras Hub preset's weights, and its config.

    num_classes: a freshly initialised head (nnx.Rngs(seed)) of that many classes instead of
    the preset's (the start of fine-tuning); image_shape: another input size, the position
    embedding resampled to its patch grid (resample_posemb).
    """
    path = Path(path)
    saved = preset_config(path)
    changes = {k: v for k, v in (("num_classes", num_classes), ("image_shape", image_shape))
               if v is not None}
    config = saved.replace(**changes)
    fresh_head = num_classes is not None
    values = _read_preset(path, saved, config, fresh_head)
    # A new head needs initial weights; otherwise every array comes from the preset.
    model = ViTHub(config, rngs=nnx.Rngs(seed)) if fresh_head else abstract_model(config)
    for entry, value in values.items():
        write(model, entry, _adapt_value(entry, value, saved, config))
    check_filled(model, PretrainedError)
    return model, config


def is_preset(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in BACKBONE_FILES)


def load_pretrained(path: str | os.PathLike, *, config=None, num_classes: int | None = None,
                    image_shape: tuple[int, int, int] | None = None, seed: int = 0):
    """(model, config) from any of:

    - a Keras Hub preset directory (`is_preset`): a ViTHub (`load_preset`; num_classes,
      image_shape and seed apply here only);
    - a vit_flax workdir (`best_checkpoint/`): its model (the seed's ViT or a StandardViT),
      as `vit_flax.load`;
    - the seed's Keras `.weights.h5` (save_weights / ModelCheckpoint), with `config` the
      vit_flax.ViTConfig it was built from.
    """
    path = Path(path)
    if is_preset(path):
        return load_preset(path, num_classes=num_classes, image_shape=image_shape, seed=seed)
    if num_classes is not None or image_shape is not None:
        raise ValueError(f"num_classes and image_shape apply to Keras Hub presets; {path} is "
                         f"not one (no {' and '.join(BACKBONE_FILES)})")
    if (path / BEST_CHECKPOINT).is_dir():
        return load(path)
    if path.is_file() and path.name.endswith(".weights.h5"):
        if config is None:
            raise ValueError(f"{path.name} holds the seed model's weights only: pass "
                             f"config=the vit_flax.ViTConfig it was built from")
        return load_keras_weights(path, config), config
    raise FileNotFoundError(f"{path} is neither a Keras Hub preset directory ("
                            f"{', '.join(BACKBONE_FILES)}), a vit_flax workdir "
                            f"({BEST_CHECKPOINT}/) nor a .weights.h5 file")
