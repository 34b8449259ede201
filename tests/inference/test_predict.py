"""predict's input checks: inputs that would give wrong logits, not an error, are refused."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_images
from flax import nnx

import vit_flax
from vit_flax.infra import workdir as layout


@pytest.fixture
def model(tiny_config):
    """Adapted on uint8 pixels, as train.py adapts every model: channel means near 127.5."""
    return vit_flax.create_model(tiny_config, random_images(16, 8, seed=1))


def test_unit_floats_for_a_model_adapted_on_0_255_pixels_are_refused(model):
    images = random_images(5, 8) / np.float32(255)  # In [0, 1]: what torchvision's ToTensor gives.
    mean = np.round(np.asarray(model.data_augmentation.normalization.mean[...]), 1).tolist()
    assert min(mean) > 100
    with pytest.raises(ValueError) as error:
        vit_flax.predict(model, images)
    assert str(error.value) == (
        f"predict got float images in [0, 1], but this model was adapted on pixels in 0..255 "
        f"(channel means {mean}); pass raw pixels: uint8, or floats in 0..255 (e.g. images * 255)")


def test_float_pixels_in_0_255_give_the_uint8_logits(model):
    images = random_images(11, 8)
    expected = vit_flax.predict(model, images, batch_size=4)  # Three batches, the last padded.
    floats = vit_flax.predict(model, images.astype(np.float32), batch_size=4)
    np.testing.assert_allclose(floats, expected, rtol=1e-6, atol=1e-6)
    assert floats.shape == (11, 3)
    # All-black frames are the same on either scale: accepted (they were refused as [0, 1]).
    black = np.zeros((2, 8, 8, 3), np.float32)
    np.testing.assert_allclose(vit_flax.predict(model, black, batch_size=4),
                               vit_flax.predict(model, black.astype(np.uint8), batch_size=4),
                               rtol=1e-6, atol=1e-6)


def test_unit_floats_for_a_model_adapted_on_unit_floats_are_accepted(tiny_config):
    model = vit_flax.create_model(tiny_config, random_images(16, 8, seed=1) / np.float32(255))
    images = random_images(5, 8) / np.float32(255)
    np.testing.assert_allclose(vit_flax.predict(model, images, batch_size=8),
                               np.asarray(model(jnp.asarray(images))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused(model, bad):
    images = random_images(3, 8).astype(np.float32)
    images[1, 2, 3, 0] = images[2, 0, 0, 1] = bad
    with pytest.raises(ValueError) as error:
        vit_flax.predict(model, images)
    assert str(error.value) == ("predict got 2 non-finite pixel values (NaN or inf); pass "
                                "finite pixels")


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "4"])
def test_batch_size_must_be_a_positive_integer(model, batch_size):
    # -1 returned an empty array and True ran as 1; 0, 2.5 and "4" failed inside range().
    with pytest.raises(ValueError) as error:
        vit_flax.predict(model, random_images(3, 8), batch_size=batch_size)
    assert str(error.value) == f"batch_size must be a positive integer, got {batch_size!r}"


def test_numpy_integer_batch_size_and_an_empty_batch_are_accepted(model):
    images = random_images(3, 8)
    np.testing.assert_allclose(vit_flax.predict(model, images, batch_size=np.int64(2)),
                               vit_flax.predict(model, images, batch_size=2), rtol=0, atol=0)
    empty = vit_flax.predict(model, np.zeros((0, 8, 8, 3), np.float32))
    assert empty.shape == (0, 3) and empty.dtype == np.float32


@pytest.mark.parametrize("text, expected", [
    (b"not json", "not a ViTConfig: the text is not JSON"),
    (b"[1, 2]", "not a ViTConfig: expected a JSON object of its fields, got a list"),
    (b'{"epochs": 3, "colour": "red"}', "not a ViTConfig: unknown fields colour"),
    (b'{"epochs": "x"}', "not a ViTConfig: epochs must be of the type of 100, got 'x'"),
    (b'{"mlp_head_units": [16, true]}', "not a ViTConfig: mlp_head_units must be of the type"),
    (b"\xff\xfe{}", "not a vit_flax config.json (not UTF-8 text)"),
], ids=["not-json", "list", "unknown-field", "wrong-type", "bool-in-tuple", "not-utf8"])
def test_load_of_a_foreign_config_json_is_one_line_naming_the_file(tmp_path, text, expected):
    (tmp_path / "best_checkpoint").mkdir()
    (tmp_path / "config.json").write_bytes(text)
    with pytest.raises(vit_flax.ConfigError) as raised:
        vit_flax.load(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / 'config.json'}: {expected}")
    assert "\n" not in str(raised.value)


def test_a_batch_size_above_the_image_count_is_clamped(model, monkeypatch):
    """Issue 24 item 8: predict(x, batch_size=10**9) asked for 179 GiB of padding. The
    compiled batch is the larger of the number of images and the default 256 (which keeps
    the default's program); 10**6 would have padded 192 MB here."""
    # The module, not the package's attribute of the same name (the function).
    predict_module = importlib.import_module("vit_flax.inference.predict")

    images = random_images(3, 8)
    expected = vit_flax.predict(model, images, batch_size=2)
    shapes, original = [], predict_module.forward

    def recording(graphdef, state, images):
        shapes.append(images.shape)
        assert images.shape == (256, 8, 8, 3)  # Before running 10**6 padded images.
        return original(graphdef, state, images)

    monkeypatch.setattr(predict_module, "forward", recording)
    logits = vit_flax.predict(model, images, batch_size=10**6)
    assert shapes == [(256, 8, 8, 3)]
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("analysis", ["features", "attention_heatmaps"])
def test_features_and_heatmaps_check_their_images_as_predict(model, analysis):
    analyse = getattr(vit_flax, analysis)
    unit = random_images(2, 8) / np.float32(255)
    nan = random_images(2, 8).astype(np.float32)
    nan[0, 0, 0, 0] = np.nan
    for images, expected in [
            (unit, f"{analysis} got float images in [0, 1], but this model was adapted on "),
            (nan, f"{analysis} got 1 non-finite pixel values (NaN or inf); pass finite pixels"),
            (random_images(2, 8).astype(np.int32),
             f"{analysis} expects uint8 or float images, got int32"),
            (random_images(2, 16), f"{analysis} expects images of shape (N, 8, 8, 3), got "
                                   f"(2, 16, 16, 3)")]:
        with pytest.raises(ValueError) as error:
            analyse(model, images)
        assert str(error.value).startswith(expected)
    # Inside a jit only the shape and dtype are known: checked, and the values are not.
    images = random_images(2, 8).astype(np.float32)
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda state, x: analyse(nnx.merge(graphdef, state), x))
    expected = analyse(model, images)
    np.testing.assert_allclose(jitted(state, images), expected, rtol=1e-5, atol=1e-6)
    # The model traced, the images known: their values are checked, the model's are not.
    over_model = jax.jit(lambda state: analyse(nnx.merge(graphdef, state), images))
    np.testing.assert_allclose(over_model(state), expected, rtol=1e-5, atol=1e-6)
    # bfloat16 pixels are float pixels (numpy does not count them as floating).
    analyse(model, images.astype(jnp.bfloat16))


def test_load_of_a_group_names_one_of_its_runs(tmp_path):
    (tmp_path / layout.GROUP_MARKER).write_text("{}")
    for name in ("seed-1", "seed-0"):
        (tmp_path / layout.GROUP_RUNS / name).mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        vit_flax.load(tmp_path)
    assert str(error.value) == (
        f"{tmp_path} is a group of runs (train.py --seeds or a grid), not one run: give one of "
        f"its runs, e.g. {tmp_path / 'runs' / 'seed-0'}")
