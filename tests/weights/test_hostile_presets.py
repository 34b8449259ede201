"""Broken or hostile Keras Hub presets: each ends in one line naming what is wrong, before
it costs memory or time (a small file can declare a huge array, a config.json any size).

The presets are written by conftest's `write_preset`, then edited as a careless or hostile
hand would.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import write_preset
from flax import nnx

from vit_flax.config import ConfigError
from vit_flax.models.hub_vit import ViTHub, ViTHubConfig
from vit_flax.weights import finetune, keras_hub
from vit_flax.weights.keras_hub import PretrainedError, load_pretrained

CONFIG = ViTHubConfig(image_shape=(16, 16, 3), patch_size=8, num_layers=2, num_heads=2,
                      hidden_dim=8, mlp_dim=12, num_classes=3)
KERNEL = ("layers/vi_t_encoder/encoder_layers/vi_t_encoder_block/mlp/dense_1/vars/0",
          "(8, 12)")  # The first block's first MLP kernel, and its shape.
CONVERTER = {"scale": [0.5, 0.5, 0.5], "offset": [-1.0, -1.0, -1.0]}


@pytest.fixture(scope="module")
def model():
    return ViTHub(CONFIG, rngs=nnx.Rngs(0))


def edit_json(name: str, change):
    def edit(preset):
        path = preset / name
        document = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps(change(document)))

    return edit


def backbone_argument(name: str, value):
    return edit_json("config.json", lambda d: {**d, "config": {**d["config"], name: value}})


def without_converter(edit):
    """Only preprocessor.json: image_converter.json is read first when there is one."""
    def edited(preset):
        (preset / "image_converter.json").unlink()
        edit(preset)

    return edited


def replace_dataset(name: str, **dataset):
    def edit(preset):
        with h5py.File(preset / "model.weights.h5", "a") as file:
            attrs = dict(file[name].parent.attrs)
            del file[name]
            file.create_dataset(name, **dataset)
            file[name].parent.attrs.update(attrs)

    return edit


CASES = {
    "config null": (edit_json("config.json", lambda d: {**d, "config": None}),
                    r"the backbone \(config.json\)'s \"config\" must be a JSON object, got null"),
    "config a list": (edit_json("config.json", lambda d: [d]),
                      r"the backbone \(config.json\) must be a JSON object, got a list"),
    "patch_size a string": (backbone_argument("patch_size", "4"),
                            r"patch_size must be an integer or a pair of integers, got '4'"),
    "image_shape a number": (backbone_argument("image_shape", 5),
                             r"image_shape must be 3 integers \(height, width, channels\), "
                             r"got 5"),
    "use_class_token a string": (backbone_argument("use_class_token", "no"),
                                 r"use_class_token must be true or false, got 'no'"),
    "num_layers 10000": (backbone_argument("num_layers", 10_000),
                         r"model.weights.h5 holds 2 transformer blocks \(layers/vi_t_encoder/"
                         r"encoder_layers\), its config.json num_layers is 10000"),
    "converter a list": (edit_json("image_converter.json", lambda d: {"config": [1, 2]}),
                         r"image_converter.json's \"config\" must be a JSON object, got a list"),
    "preprocessor's converter a list": (
        without_converter(edit_json("preprocessor.json",
                                    lambda d: {"config": {"image_converter": [1]}})),
        r"preprocessor.json's image_converter must be a JSON object, got a list"),
    "task config a list": (edit_json("task.json", lambda d: {"config": [3]}),
                           r"task.json's \"config\" must be a JSON object, got a list"),
    "task without classes": (edit_json("task.json", lambda d: {"config": {}}),
                             r"the classifier \(task.json\) has no num_classes"),
    "converter scale 0": (edit_json("image_converter.json",
                                    lambda d: {"config": {**CONVERTER, "scale": 0}}),
                          r"scale must be non-zero for every channel, got \(0.0, 0.0, 0.0\)"),
    "converter scale NaN": (edit_json("image_converter.json",
                                      lambda d: {"config": {**CONVERTER, "scale": np.nan}}),
                            r"scale must be null, a finite number or a list of them"),
    "converter offset a string": (
        edit_json("image_converter.json", lambda d: {"config": {**CONVERTER, "offset": "1"}}),
        r"the image converter's offset must be a number or a list of numbers, got '1'"),
    "converter variance 0": (
        edit_json("image_converter.json",
                  lambda d: {"config": {"scale": 1.0, "mean": [0, 0, 0], "variance": [1, 0, 1]}}),
        r"the image converter's variance must be > 0"),
    "declared huge": (replace_dataset(KERNEL[0], shape=(10**6, 10**6), dtype=np.float32,
                                      chunks=(64, 64)),
                      r"mlp/dense_1/kernel has shape \(1000000, 1000000\), vit_flax "
                      r"backbone.*mlp.dense_1.kernel \(8, 12\)"),
    "declared, not stored": (replace_dataset(KERNEL[0], shape=(8, 12), dtype=np.float32,
                                             chunks=(2, 2)),
                             r"dense_1/vars/0 declares shape \(8, 12\) \(384 bytes\) but stores "
                             r"0 bytes"),
    "complex weights": (replace_dataset(KERNEL[0], data=np.ones((8, 12), np.complex64)),
                        r"dense_1/vars/0 holds complex64 values; weights are real numbers"),
    "NaN weights": (replace_dataset(KERNEL[0], data=np.full((8, 12), np.nan, np.float32)),
                    r"dense_1/vars/0 holds 96 NaN or infinite values"),
    "a text dataset": (replace_dataset(KERNEL[0], data=np.full((8, 12), b"x")),
                       r"dense_1/vars/0 holds \|S1 values; weights are real numbers"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_preset_is_one_line(model, tmp_path, monkeypatch, case):
    edit, expected = CASES[case]
    preset = write_preset(model, tmp_path / "preset", CONVERTER)
    edit(preset)

    def no_model(config):  # Every refusal comes before a model of the config is built.
        raise AssertionError(f"a model of {config} was built")

    if case == "num_layers 10000":
        monkeypatch.setattr(keras_hub, "abstract_model", no_model)
    with pytest.raises(PretrainedError, match=expected) as error:
        load_pretrained(preset)
    assert "\n" not in str(error.value)
    # Fine-tuning from it: the same, as the ConfigError train.py prints in one line.
    with pytest.raises(ConfigError, match=f"^init_from={preset}: .*{expected}") as error:
        finetune.load_source(preset)
    assert "\n" not in str(error.value)


def test_a_link_to_another_file_is_refused(model, tmp_path):
    preset = write_preset(model, tmp_path / "preset")
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as file:
        file.create_dataset("secret", data=np.ones((8, 12), np.float32))
    with h5py.File(preset / "model.weights.h5", "a") as file:
        del file[KERNEL[0]]
        file[KERNEL[0]] = h5py.ExternalLink(str(outside), "secret")
    with pytest.raises(PretrainedError, match=r"model.weights.h5 links to another file \(layers/"
                                              r"vi_t_encoder/.*dense_1/vars/0\)"):
        load_pretrained(preset)


@pytest.mark.parametrize("text, expected", [
    ("[1]", "expected a JSON object of its fields, got a list"),
    ("{", "the text is not JSON"),
    ('{"hidden": 8}', "unknown fields hidden"),
    ('{"use_class_token": "no"}', "use_class_token must be true or false, got 'no'"),
    ('{"use_mha_bias": 1}', "use_mha_bias must be true or false, got 1"),
    ('{"patch_size": "4"}', "patch_size must be an integer, got '4'"),
    ('{"num_classes": 2.5}', "num_classes must be an integer, got 2.5"),
    ('{"image_shape": [224, 224]}', r"image_shape must be 3 integers .* got \[224, 224\]"),
    ('{"layer_norm_epsilon": NaN}', "layer_norm_epsilon must be a finite number, got nan"),
    ('{"layer_norm_epsilon": 0}', "layer_norm_epsilon must be > 0, got 0"),
    ('{"dropout_rate": true}', "dropout_rate must be a finite number, got True"),
    ('{"scale": [1, 0, 1]}', r"scale must be non-zero for every channel"),
    ('{"offset": [1, Infinity, 1]}', "offset must be null, a finite number or a list"),
])
def test_hub_config_from_json_checks_every_type(text, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        ViTHubConfig.from_json(text)
    assert "\n" not in str(error.value)


def test_hub_config_round_trips_through_json():
    config = CONFIG.replace(scale=(0.5, 0.25, 2.0), offset=(-1.0, 0.0, 1.0))
    assert ViTHubConfig.from_json(config.to_json()) == config
