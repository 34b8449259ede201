"""load_pretrained without Keras: presets in Keras Hub's layout, workdirs, errors.

The presets here are written by `write_preset` (h5py, following weight_table and the group
names the Keras saver records); that keras_hub's own save_to_preset writes this layout, and
that a loaded preset computes what the Keras model does, is parity/test_keras_hub.py's.
"""

from __future__ import annotations

import json

import h5py
import jax
import numpy as np
import pytest
from conftest import TINY, random_images, write_preset
from flax import nnx

from vit_flax import ViT, ViTConfig
from vit_flax.infra.checkpoints import save_model
from vit_flax.models.hub_vit import ViTHub, ViTHubConfig, resample_posemb
from vit_flax.weights.keras_hub import (
    PretrainedError,
    load_pretrained,
    variable_at,
    weight_table,
)

CLASSIFIER = ViTHubConfig(image_shape=(16, 16, 3), patch_size=8, num_layers=2, num_heads=2,
                          hidden_dim=8, mlp_dim=12, num_classes=3, intermediate_dim=5)
CONVERTER = {"image_size": [16, 16], "scale": [0.5, 0.25, 2.0], "offset": [-1.0, 0.0, 1.0]}


def arrays(model) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


def float_images(config: ViTHubConfig, seed: int = 0) -> np.ndarray:
    return random_images(2, config.image_shape[0], seed).astype(np.float32)


@pytest.fixture(scope="module")
def classifier():
    return ViTHub(CLASSIFIER, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("config", [CLASSIFIER, CLASSIFIER.replace(
    num_classes=None, use_mha_bias=False, use_mlp_bias=False, use_patch_bias=False,
    use_class_token=False, num_layers=12)], ids=["classifier", "bare-12-blocks"])
def test_weight_table_names_every_array_once(config):
    table = weight_table(config)
    model = ViTHub(config, rngs=nnx.Rngs(0))
    assert sorted(str(variable_at(model, e.flax).get_value().shape) for e in table) == \
        sorted(str(a.shape) for a in arrays(model).values())
    assert len({e.flax for e in table}) == len(arrays(model)) == len(table)
    assert len({e.keras for e in table}) == len({(e.file, e.h5) for e in table}) == len(table)


def test_a_preset_loads_bit_identically(tmp_path, classifier):
    write_preset(classifier, tmp_path / "preset", CONVERTER)
    model, config = load_pretrained(tmp_path / "preset")
    assert config == CLASSIFIER.replace(scale=(0.5, 0.25, 2.0), offset=(-1.0, 0.0, 1.0))
    theirs = arrays(classifier)
    for path, value in arrays(model).items():
        np.testing.assert_array_equal(value, theirs[path], err_msg=path)
    images = float_images(config)
    # The converter's scaling is the model's first step: the same as the unscaled model on
    # images * scale + offset.
    scaled = images * np.float32(CONVERTER["scale"]) + np.float32(CONVERTER["offset"])
    np.testing.assert_allclose(model(images), classifier(scaled), atol=1e-6)


@pytest.mark.parametrize("files, expected", [
    # Only preprocessor.json, the converter nested in it.
    ({"preprocessor.json": {"config": {"image_converter": {"config": CONVERTER}}}},
     dict(scale=(0.5, 0.25, 2.0), offset=(-1.0, 0.0, 1.0))),
    # One number for every channel.
    ({"image_converter.json": {"config": {"scale": 0.5, "offset": -1.0}}},
     dict(scale=(0.5,) * 3, offset=(-1.0,) * 3)),
    # Keras Hub's older arguments: x * scale / sqrt(variance) - mean / sqrt(variance).
    ({"image_converter.json": {"config": {"scale": 1.0, "mean": [1.0, 2.0, 3.0],
                                          "variance": [4.0, 16.0, 1.0]}}},
     dict(scale=(0.5, 0.25, 1.0), offset=(-0.5, -0.5, -3.0))),
    ({}, dict(scale=None, offset=None)),
])
def test_converter_scaling_is_read(tmp_path, classifier, files, expected):
    preset = write_preset(classifier, tmp_path / "preset")
    for name, content in files.items():
        (preset / name).write_text(json.dumps(content))
    _, config = load_pretrained(preset)
    assert (config.scale, config.offset) == (expected["scale"], expected["offset"])


def test_a_new_head_and_another_resolution(tmp_path, classifier):
    preset = write_preset(classifier, tmp_path / "preset")
    model, config = load_pretrained(preset, num_classes=7, image_shape=(32, 24, 3), seed=1)
    assert config == CLASSIFIER.replace(num_classes=7, image_shape=(32, 24, 3))
    assert model(np.zeros((2, 32, 24, 3), np.float32)).shape == (2, 7)
    ours, theirs = arrays(model.backbone), arrays(classifier.backbone)
    position = "['vit_patching_and_embedding']['position_embedding']['embedding'].value"
    np.testing.assert_array_equal(ours.pop(position), resample_posemb(
        theirs.pop(position), (4, 3), old_grid=(2, 2)))
    for path, value in ours.items():
        np.testing.assert_array_equal(value, theirs[path], err_msg=path)
    fresh = ViTHub(config, rngs=nnx.Rngs(1))  # The head is seed 1's initial one.
    np.testing.assert_array_equal(model.predictions.kernel[...], fresh.predictions.kernel[...])


def test_a_preset_of_another_layout_is_an_error(tmp_path, classifier):
    preset = write_preset(classifier, tmp_path / "preset")
    with h5py.File(preset / "model.weights.h5", "a") as file:
        group = "layers/vi_t_encoder/encoder_layers/vi_t_encoder_block_1/mlp/dense_1/vars"
        file[group].attrs["name"] = "dense_7"
    with pytest.raises(PretrainedError, match=r"vi_t_encoder_block_1/mlp/dense_1/vars/0 "
                                              r"belongs to Keras layer 'dense_7'"):
        load_pretrained(preset)
    with h5py.File(preset / "model.weights.h5", "a") as file:
        file[group].attrs["name"] = "dense_1"
        del file["layers/vi_t_encoder/layer_norm"]
    with pytest.raises(PretrainedError, match=r"has no layers/vi_t_encoder/layer_norm/vars/0 "
                                              r"\(Keras vit_encoder/ln/gamma\)"):
        load_pretrained(preset)


def test_a_config_that_does_not_fit_the_weights_is_an_error(tmp_path, classifier):
    preset = write_preset(classifier, tmp_path / "preset")
    config = json.loads((preset / "config.json").read_text())
    config["config"]["mlp_dim"] = 16
    (preset / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match=r"transformer_block_1/mlp/dense_1/kernel has "
                                              r"shape \(8, 12\), vit_flax .* \(8, 16\)"):
        load_pretrained(preset)
    (preset / "config.json").write_text(json.dumps({"class_name": "ResNetBackbone"}))
    with pytest.raises(PretrainedError, match="'ResNetBackbone', not a keras_hub ViTBackbone"):
        load_pretrained(preset)


def test_a_workdir_loads_as_vit_flax_load(tmp_path):
    config = ViTConfig(**TINY)
    seed_model = ViT(config, rngs=nnx.Rngs(2))
    (tmp_path / "run").mkdir()  # save_model writes into a workdir, which a run creates.
    save_model(tmp_path / "run" / "best_checkpoint", seed_model)
    (tmp_path / "run" / "config.json").write_text(config.to_json())
    model, loaded = load_pretrained(tmp_path / "run")
    assert loaded == config
    for path, value in arrays(model).items():
        np.testing.assert_array_equal(value, arrays(seed_model)[path], err_msg=path)
    with pytest.raises(ValueError, match="apply to Keras Hub presets"):
        load_pretrained(tmp_path / "run", num_classes=3)


@pytest.mark.slow
def test_the_seeds_keras_weights_file(tmp_path):
    # parity sets Keras' JAX backend before its keras_reference imports Keras.
    keras_reference = pytest.importorskip("parity.keras_reference")

    config = ViTConfig(**TINY)
    keras_model = keras_reference.build_keras_vit(config, adapt_images=random_images(8, 8))
    keras_model.save_weights(tmp_path / "seed.weights.h5")
    model, loaded = load_pretrained(tmp_path / "seed.weights.h5", config=config)
    images = random_images(3, 8, seed=4)
    np.testing.assert_allclose(model(images), keras_model.predict(images, verbose=0),
                               atol=1e-5)
    with pytest.raises(ValueError, match="pass config="):
        load_pretrained(tmp_path / "seed.weights.h5")


def test_anything_else_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a Keras Hub preset directory"):
        load_pretrained(tmp_path)
