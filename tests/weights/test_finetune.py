"""Fine-tuning (vit_flax.weights.finetune, train.py --init-from): what is taken from the source,
what is resampled, what stays new, and one-line errors for the rest."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import TINY, TINY_FLAGS, random_images, write_image_folder, write_preset
from flax import nnx
from test_cli import train as cli

import vit_flax
from vit_flax.models.hub_vit import ViTHub, ViTHubConfig, resample_posemb
from vit_flax.weights import finetune


def arrays(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(variable.get_value())
            for path, variable in nnx.state(model).flat_state()}


def models(source_fields: dict, target_fields: dict, target_classes: int = 5):
    """(source, target, target's arrays before): different seeds, so no array agrees by
    chance; the source's normalization adapted on other images than the target's."""
    tiny = vit_flax.ViTConfig(**TINY)
    source = vit_flax.create_model(tiny.replace(seed=1, num_classes=3, **source_fields),
                                   random_images(16, 8))
    target = vit_flax.create_model(tiny.replace(seed=2, num_classes=target_classes,
                                                **target_fields),
                                   random_images(16, 8, seed=3) // 2)
    return source, target, arrays(target)


def test_everything_but_the_classifier_is_taken():
    source, target, before = models({}, {})
    report = finetune.initialize_from(target, source)
    after, theirs = arrays(target), arrays(source)
    assert report["kept"] == ["head.logits.bias", "head.logits.kernel"]
    assert report["resampled"] == [] and len(report["taken"]) == len(after) - 2
    for name, value in after.items():
        expected = before[name] if name.startswith("head.logits") else theirs[name]
        np.testing.assert_array_equal(value, expected, err_msg=name)
    assert after["head.logits.kernel"].shape == (8, 5)  # This data set's 5 classes.
    # The input normalization is the source's: its features were learned on it.
    assert not np.array_equal(theirs["data_augmentation.normalization.mean"],
                              before["data_augmentation.normalization.mean"])


def test_the_classifier_is_new_when_the_class_counts_match():
    # 3 classes in both: the source's classifier fits, and is still not taken (its classes
    # are another data set's).
    source, target, before = models({}, {}, target_classes=3)
    source.head.logits.bias.set_value(np.ones(3, np.float32))  # Both start at zeros.
    report = finetune.initialize_from(target, source)
    assert report["kept"] == ["head.logits.bias", "head.logits.kernel"]
    after, theirs = arrays(target), arrays(source)
    for name in report["kept"]:
        np.testing.assert_array_equal(after[name], before[name])
        assert not np.array_equal(after[name], theirs[name]), name
    np.testing.assert_array_equal(after["head.mlp.dense.1.kernel"],
                                  theirs["head.mlp.dense.1.kernel"])  # The rest is taken.


@pytest.mark.parametrize("head", ["gap", "cls"])
def test_the_position_embedding_is_resampled_to_another_grid(head):
    # 12 / 4 = a 3 x 3 grid in the source, 20 / 4 = 5 x 5 here; cls: its row kept.
    source, target, _ = models({"head": head}, {"head": head, "image_size": 20})
    report = finetune.initialize_from(target, source)
    assert report["resampled"] == ["patch_encoder.position_embedding.embedding"]
    theirs = arrays(source)["patch_encoder.position_embedding.embedding"]
    mine = arrays(target)["patch_encoder.position_embedding.embedding"]
    assert mine.shape == (25 + (head == "cls"), 8)
    np.testing.assert_array_equal(mine, resample_posemb(theirs, 5, (3, 3)))
    if head == "cls":
        np.testing.assert_array_equal(mine[0], theirs[0])
    # Corners of a bilinear resampling with end points on end points: the source's corners.
    np.testing.assert_allclose(mine[-1], theirs[-1], rtol=1e-6)
    logits = target(random_images(2, 8))
    assert logits.shape == (2, 5) and np.isfinite(logits).all()


@pytest.mark.parametrize("source_fields, target_fields, expected", [
    ({}, {"transformer_layers": 2},
     r"^init_from: the source model has no blocks\.1\.attention\.attention_output\.bias "),
    ({"transformer_layers": 2}, {},
     r"^init_from: the source model has blocks\.1\..*, which this model has not"),
    ({}, {"projection_dim": 12},
     r"^init_from: blocks\.0\.attention\.attention_output\.bias has shape \(12,\) here and "
     r"\(8,\) in the source model; only the classifier and the position embedding may differ$"),
    # A flatten head's first Dense reads every token: another grid is another shape.
    ({}, {"image_size": 20},
     r"^init_from: head\.mlp\.dense\.0\.kernel has shape \(200, 16\) here and \(72, 16\)"),
], ids=["fewer blocks in the source", "more blocks in the source", "another width",
        "flatten head over another grid"])
def test_other_differences_are_one_line_errors(source_fields, target_fields, expected):
    source, target, before = models(source_fields, target_fields)
    with pytest.raises(vit_flax.ConfigError, match=expected) as error:
        finetune.initialize_from(target, source)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_train_py_fine_tunes_a_run_on_other_classes(tmp_path, capsys):
    source_images = write_image_folder(tmp_path / "first", train_per_class=6)
    other_images = write_image_folder(tmp_path / "second", ("bird", "ship"),
                                      train_per_class=6, seed=1)
    common = [*TINY_FLAGS, "--head", "gap", "--epochs", "1", "--dataset", "folder"]
    assert cli.main([*common, "--data-dir", str(source_images),
                       "--workdir", str(tmp_path / "source")]) == 0
    assert cli.main([*common, "--data-dir", str(other_images), "--image-size", "16",
                       "--init-from", str(tmp_path / "source"),
                       "--workdir", str(tmp_path / "tuned")]) == 0
    printed = capsys.readouterr().out
    assert f"Starting from {tmp_path / 'source'}: " in printed
    assert "1 resampled, new: head.logits.bias, head.logits.kernel" in printed
    results = json.loads((tmp_path / "tuned" / "results.json").read_text())
    assert results["init_from"] == str(tmp_path / "source")
    assert results["config"]["num_classes"] == 2
    # A source that is not a run: one line, and the workdir is not claimed.
    assert cli.main([*common, "--data-dir", str(other_images),
                       "--init-from", str(tmp_path / "nowhere"),
                       "--workdir", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: --init-from {tmp_path / 'nowhere'}: ") and \
        "\n" not in error
    assert not (tmp_path / "refused" / ".vit_flax-run.json").exists()


# --- the standard ViT (architecture='standard', train.py --model) from a Keras Hub preset ---

STANDARD_FLAGS = ["--architecture", "standard", "--input-size", "16", "--image-size", "16",
                  "--patch-size", "8", "--projection-dim", "8", "--num-heads", "2",
                  "--transformer-layers", "2", "--head", "cls", "--mlp-head-units", "5",
                  "--batch-size", "8"]
STANDARD = vit_flax.ViTConfig(architecture="standard", num_classes=2, input_size=16,
                              image_size=16, patch_size=8, projection_dim=8, num_heads=2,
                              transformer_layers=2, head="cls", mlp_head_units=(5,),
                              batch_size=8)
# Its ViT as a Keras Hub classifier of 3 classes, with an image converter's scaling.
PRESET = ViTHubConfig(image_shape=(16, 16, 3), patch_size=8, num_layers=2, num_heads=2,
                      hidden_dim=8, mlp_dim=32, num_classes=3, intermediate_dim=5,
                      scale=(0.5, 0.25, 2.0), offset=(-1.0, 0.0, 1.0))


def test_a_preset_starts_a_standard_vit_that_computes_what_it_computes(tmp_path):
    hub = ViTHub(PRESET, rngs=nnx.Rngs(4))
    preset = write_preset(hub, tmp_path / "preset", {"image_size": [16, 16],
                                                      "scale": list(PRESET.scale),
                                                      "offset": list(PRESET.offset)})
    model = vit_flax.create_model(STANDARD, random_images(16, 16))
    before = arrays(model)
    source = finetune.load_source(preset)
    assert not finetune.lacks_converter(source)
    report = finetune.initialize_from(model, source)
    assert report["kept"] == ["vit.predictions.bias", "vit.predictions.kernel"]
    assert report["resampled"] == []
    after, theirs = arrays(model), arrays(hub)
    for name in report["kept"]:
        np.testing.assert_array_equal(after[name], before[name])
    for name in report["taken"]:
        if name.startswith("vit."):
            np.testing.assert_array_equal(after[name], theirs[name[len("vit."):]])
    # The converter's x * scale + offset became the Normalization: the same features, on
    # raw 0..255 pixels, within float32 round-off of the two formulas (measured 1e-6).
    images = random_images(4, 16).astype(np.float32)
    np.testing.assert_allclose(vit_flax.features(model, images),
                               vit_flax.features(hub, images), atol=1e-5)


def test_a_presets_scale_float32_cannot_invert_is_refused_before_training():
    hub = ViTHub(dataclasses.replace(PRESET, scale=(1e-30,) * 3), rngs=nnx.Rngs(4))
    model = vit_flax.create_model(STANDARD, random_images(16, 16))
    with pytest.raises(vit_flax.ConfigError) as error:  # 1 / scale**2 is inf in float32.
        finetune.initialize_from(model, hub)
    assert str(error.value).startswith(
        "init_from: the preset's image converter (scale [1e-30, 1e-30, 1e-30], offset ")
    assert "variance [inf, inf, inf]); give the converter a scale near 1/255" in str(error.value)


def test_a_preset_at_another_image_size_has_its_position_embedding_resampled(tmp_path):
    hub = ViTHub(PRESET, rngs=nnx.Rngs(4))
    preset = write_preset(hub, tmp_path / "preset")
    model = vit_flax.create_model(STANDARD.replace(input_size=32, image_size=32))
    report = finetune.initialize_from(model, finetune.load_source(preset))
    name = "vit.backbone.vit_patching_and_embedding.position_embedding.embedding"
    assert report["resampled"] == [name]
    np.testing.assert_allclose(arrays(model)[name],
                               resample_posemb(arrays(hub)[name[len("vit."):]], 4, (2, 2)))
    # No converter: the Normalization is the identity, as the preset's model computes.
    np.testing.assert_array_equal(arrays(model)["data_augmentation.normalization.mean"], 0)
    np.testing.assert_array_equal(arrays(model)["data_augmentation.normalization.variance"],
                                  1)


def test_a_seed_vit_cannot_start_from_a_standard_preset(tmp_path):
    preset = write_preset(ViTHub(PRESET, rngs=nnx.Rngs(4)), tmp_path / "preset")
    model = vit_flax.create_model(vit_flax.ViTConfig(**TINY))
    with pytest.raises(vit_flax.ConfigError, match="^init_from: the source model has .*give "
                                                   "the same architecture"):
        finetune.initialize_from(model, finetune.load_source(preset))


@pytest.mark.slow
def test_train_py_fine_tunes_a_standard_vit_from_a_preset_without_shape_flags(tmp_path,
                                                                            capsys):
    # The preset's MLP is 12 wide, not 4 x 8: no --model size has it, and no flag says it.
    preset = write_preset(ViTHub(PRESET.replace(mlp_dim=12), rngs=nnx.Rngs(4)),
                          tmp_path / "preset")
    images = write_image_folder(tmp_path / "images", ("bird", "ship"), size=16,
                                train_per_class=6, test_per_class=3)
    # --no-unroll-threefry as TINY_FLAGS (the same random bits; the step compiles ~2x faster).
    assert cli.main(["--input-size", "16", "--batch-size", "8", "--epochs", "1",
                     "--no-unroll-threefry",
                     "--dataset", "folder", "--data-dir", str(images), "--init-from",
                     str(preset), "--workdir", str(tmp_path / "tuned")]) == 0
    printed = capsys.readouterr().out
    assert "0 resampled, new: vit.predictions.bias, vit.predictions.kernel" in printed
    assert f"Note: {preset} has no image converter (image_converter.json), so the pixels go " \
           f"in unscaled (0-255)" in printed  # write_preset wrote none.
    model, config = vit_flax.load(tmp_path / "tuned")
    assert type(model).__name__ == "StandardViT"
    assert config == STANDARD.replace(epochs=1, mlp_dim=12)
    results = json.loads((tmp_path / "tuned" / "results.json").read_text())
    test = vit_flax.data.sources.load_folder(images, 16).test
    assert results["test_accuracy"] == pytest.approx(
        np.mean(vit_flax.predict(model, test.images).argmax(-1) == test.labels), abs=1e-7)
    assert (tmp_path / "tuned" / "attention.png").is_file()


# --- config_for_source: the architecture from the source, no shape flags ---------------------

def test_a_presets_architecture_is_taken_even_with_an_mlp_of_another_width(tmp_path):
    hub_config = PRESET.replace(mlp_dim=12)  # Not 4 x 8: no named size has it.
    hub = ViTHub(hub_config, rngs=nnx.Rngs(4))
    preset = write_preset(hub, tmp_path / "preset", {"scale": list(PRESET.scale),
                                                      "offset": list(PRESET.offset)})
    config = finetune.config_for_source(preset, vit_flax.ViTConfig(num_classes=2,
                                                                   input_size=16))
    assert config == STANDARD.replace(mlp_dim=12, num_classes=2, batch_size=256)
    model = vit_flax.create_model(config)
    assert (model.vit.config.mlp_dim, model.vit.config.hidden_dim) == (12, 8)
    report = finetune.initialize_from(model, finetune.load_source(preset))
    assert report["kept"] == ["vit.predictions.bias", "vit.predictions.kernel"]
    images = random_images(4, 16).astype(np.float32)
    np.testing.assert_allclose(vit_flax.features(model, images),
                               vit_flax.features(hub, images), atol=1e-5)


def test_what_the_user_gave_must_agree_with_the_source(tmp_path, capsys):
    preset = write_preset(ViTHub(PRESET, rngs=nnx.Rngs(4)), tmp_path / "preset")
    base = vit_flax.ViTConfig(num_classes=2, input_size=16)
    with pytest.raises(vit_flax.ConfigError, match=(
            rf"^init_from={preset}: patch_size=4 was given, the source has 8; leave "
            rf"patch_size out to take the source's$")):
        finetune.config_for_source(preset, base.replace(patch_size=4, image_size=16),
                                   {"patch_size", "image_size"})
    with pytest.raises(vit_flax.ConfigError, match=r"mlp_dim=64 was given, the source has 32"):
        finetune.config_for_source(preset, base.replace(mlp_dim=64), {"mlp_dim"})
    # Given and equal (the MLP width 4 x 8 spelled out), or what may differ: accepted.
    base = vit_flax.ViTConfig(num_classes=2, input_size=16, patch_size=8, image_size=32,
                              mlp_dim=32, learning_rate=0.01)
    config = finetune.config_for_source(preset, base, {"mlp_dim", "image_size",
                                                       "learning_rate"})
    assert config == STANDARD.replace(num_classes=2, image_size=32, learning_rate=0.01,
                                      batch_size=256)
    # train.py's form: the fields given on the command line, with their values.
    assert finetune.source_fields(preset, {"mlp_dim": 0, "patch_size": 8, "epochs": 2}) == dict(
        architecture="standard", projection_dim=8, num_heads=2, transformer_layers=2,
        layer_norm_epsilon=1e-6, head="cls", mlp_head_units=(5,), image_size=16)
    with pytest.raises(vit_flax.ConfigError, match="projection_dim=16 was given, the source"):
        finetune.source_fields(preset, {"projection_dim": 16})
    # A named model's field, not the user's: train.py says which flag set it.
    assert cli.main(["--model", "vit-ti16", "--init-from", str(preset), "--dataset", "folder",
                     "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: --init-from {preset}: --model vit-ti16 sets --patch-size 16, the source has "
        f"8; leave --model vit-ti16 out to take the source's\n")


def test_a_backbone_leaves_the_head_to_the_run(tmp_path):
    backbone = PRESET.replace(num_classes=None, intermediate_dim=None)
    preset = write_preset(ViTHub(backbone, rngs=nnx.Rngs(4)), tmp_path / "preset")
    base = vit_flax.ViTConfig(num_classes=2, input_size=16)
    assert finetune.config_for_source(preset, base).head == "cls"
    chosen = finetune.config_for_source(preset, base.replace(head="gap"), {"head"})
    assert (chosen.head, chosen.mlp_head_units, chosen.architecture) == ("gap", (), "standard")


def test_a_preset_vit_flax_cannot_build_is_one_line(tmp_path):
    no_token = PRESET.replace(use_class_token=False, use_mlp_bias=False)
    preset = write_preset(ViTHub(no_token, rngs=nnx.Rngs(4)), tmp_path / "preset")
    with pytest.raises(vit_flax.ConfigError, match=(
            rf"^init_from={preset}: the preset has 3 channels and use_mlp_bias=False, "
            rf"use_class_token=False; vit_flax's standard ViT takes 3 channels")):
        finetune.config_for_source(preset, vit_flax.ViTConfig())


def test_a_runs_architecture_is_taken(tmp_path):
    source = vit_flax.ViTConfig(**TINY).replace(head="gap", mlp_dim=24)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(source.to_json())
    config = finetune.config_for_source(tmp_path / "run", vit_flax.ViTConfig(epochs=3))
    assert config == source.replace(num_classes=100, input_size=32, batch_size=256, epochs=3)
    with pytest.raises(vit_flax.ConfigError, match="neither a vit_flax run"):
        finetune.config_for_source(tmp_path, vit_flax.ViTConfig())
