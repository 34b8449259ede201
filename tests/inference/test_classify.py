"""classify and predict.py: held-out images named with results.json's accuracy, files read
as the training images were, one-line errors that do not stop the others, class names."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_preset
from flax import nnx
from PIL import Image

import vit_flax
from vit_flax.data.sources import read_image
from vit_flax.inference import classify
from vit_flax.models.hub_vit import ViTHub, ViTHubConfig

# The module: `from vit_flax.inference import classify` is its function of that name.
classify_lib = importlib.import_module("vit_flax.inference.classify")

ROOT = Path(__file__).resolve().parents[2]
pytest_plugins = ["inference_fixtures"]  # seed_run, held_out_folder: built once, shared.
CLASSES = ("cat", "dog", "frog")  # inference_fixtures' folder's.


def load_cli():
    spec = importlib.util.spec_from_file_location("predict_cli", ROOT / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = load_cli()


@pytest.fixture(scope="module")
def model(seed_run):
    return vit_flax.load(seed_run)[0]


@pytest.mark.slow
def test_held_out_images_are_named_with_the_accuracy_of_results_json(seed_run, held_out_folder):
    """The issue's "done when": the test/ files, classified from disk by name, score what
    training scored on them."""
    model, names, note = classify_lib.load_classifier(seed_run)
    assert names == list(CLASSES) and note is None  # The run's names came back.
    predictions = classify_lib.classify(model, held_out_folder / "test", names, top_k=1)
    assert len(predictions) == 12 and all(p.error is None for p in predictions)
    correct = [p.top[0][0] == Path(p.source).parent.name for p in predictions]
    results = json.loads((seed_run / "results.json").read_text())
    assert np.mean(correct) == pytest.approx(results["test_accuracy"], abs=1e-6)
    assert 0 < sum(correct) < 12  # Some right, some wrong: the match means something.


@pytest.mark.slow
def test_files_are_read_as_the_training_images_were(model, tmp_path):
    """A 20 x 13 RGBA file: classify(path) is classify of read_image's pixels (the loader's
    decode and bilinear resize), probability for probability."""
    pixels = np.random.default_rng(3).integers(0, 256, (13, 20, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "big.png")
    [from_file] = classify_lib.classify(model, tmp_path / "big.png", top_k=3)
    [from_array] = classify_lib.classify(model, read_image(tmp_path / "big.png", 8)[None],
                                         top_k=3)
    assert from_file.top == from_array.top and from_file.source == str(tmp_path / "big.png")
    pixels = jnp.asarray(read_image(tmp_path / "big.png", 8))[None]  # A JAX array: images too.
    [from_jax] = classify_lib.classify(model, pixels, top_k=3)
    assert from_jax.top == from_array.top
    assert sum(q for _, q in from_file.top) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.slow
def test_unreadable_inputs_give_one_line_errors_and_the_others_are_classified(model, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(good)
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    inputs = [tmp_path / "broken.png", good, tmp_path / "missing.jpg", tmp_path / "empty",
              str(tmp_path / "*.webp"), good]
    predictions = classify_lib.classify(model, inputs, CLASSES, top_k=2, batch_size=2)
    errors = [p.error for p in predictions]
    assert errors[0].startswith(f"cannot read image {tmp_path / 'broken.png'}: cannot identify")
    assert errors[2].startswith(f"cannot read image {tmp_path / 'missing.jpg'}: [Errno 2]")
    assert errors[3] == (f"{tmp_path / 'empty'}: a folder with no image files (expected .png, "
                         f".jpg, ... any format Pillow reads)")
    assert errors[4] == f"{tmp_path / '*.webp'}: matches no image file"
    assert errors[1] is errors[5] is None and all("\n" not in e for e in errors if e)
    assert predictions[1].top == predictions[5].top  # Batches of 2 across the failures.
    assert [c for c, _ in predictions[1].top][:1] == [classify_lib.classify(
        model, read_image(good, 8)[None], CLASSES, top_k=1)[0].top[0][0]]


def test_folders_are_searched_as_training_reads_them_and_each_file_found_once(tmp_path):
    for name in ("photos/a.png", "photos/.ipynb_checkpoints/a.png", "photos/__MACOSX/b.png",
                 "photos/trip/c.jpg", "photos/notes.txt", "elsewhere/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "photos/linked").symlink_to(tmp_path / "elsewhere")  # Followed, as training.
    (tmp_path / "photos/trip/up").symlink_to(tmp_path / "photos")  # A loop: nothing new.
    photos = str(tmp_path / "photos")
    assert classify.find_images(photos) == [(f"{photos}/{name}", None)
                                            for name in ("a.png", "linked/d.png", "trip/c.jpg")]
    # A glob's ** follows the loop a few levels: each file is kept once, under its first name.
    assert classify.find_images(f"{photos}/trip/**/*.jpg") == [(f"{photos}/trip/c.jpg", None)]
    for bad, kind in [([np.zeros((8, 8, 3))], "ndarray"), ([b"a.png"], "bytes")]:
        with pytest.raises(ValueError) as error:
            classify.find_images(bad)
        assert str(error.value) == (
            f"expected image files, folders or globs (str or path), or images in one array "
            f"(N, H, W, C); got a {kind} among the paths (np.stack arrays into one)")


def test_class_names_from_data_json_else_results_json_else_indices(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    assert classify_lib.class_names_of(tmp_path, 2) == (["a", "b"], None)
    (tmp_path / "data.json").write_text(json.dumps({"class_names": ["x", "y"]}))
    assert classify_lib.class_names_of(tmp_path, 2) == (["x", "y"], None)
    names, note = classify_lib.class_names_of(tmp_path, 3)  # Neither holds 3 names.
    assert names == ["0", "1", "2"]
    assert note == (f"{tmp_path} records no class names (data.json or results.json's "
                    f"class_names): classes are named by their index 0..2")


@pytest.mark.slow
@pytest.mark.parametrize("options, expected", [
    (dict(top_k=0), "top_k must be a positive integer, got 0"),
    (dict(batch_size=True), "batch_size must be a positive integer, got True"),
    (dict(class_names=["a"]), "1 class names for a model of 3 classes; pass one name per class"),
])
def test_bad_options_are_refused(model, options, expected):
    with pytest.raises(ValueError) as error:
        classify_lib.classify(model, np.zeros((1, 8, 8, 3), np.uint8), **options)
    assert str(error.value) == expected


@pytest.mark.slow
def test_cli_table_json_and_csv(seed_run, held_out_folder, capsys):
    files = sorted(str(p) for p in (held_out_folder / "test" / "dog").iterdir())
    assert cli.main([str(seed_run), *files[:2], "--top-k", "2"]) == 0
    table = capsys.readouterr()
    lines = table.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(files[0] + "  ") and table.err == ""
    assert len(lines[0].split()) == 5  # The path, then two (class, probability) pairs.
    assert cli.main([str(seed_run), files[0], "--format", "json", "--top-k", "3"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["image"] == files[0] and entry["error"] is None
    assert sorted(c["class"] for c in entry["top"]) == sorted(CLASSES)
    assert sum(c["probability"] for c in entry["top"]) == pytest.approx(1.0, abs=1e-9)
    assert cli.main([str(seed_run), files[0], "--format", "csv", "--top-k", "1"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header == "image,rank,class,probability,error"
    assert row.startswith(f"{files[0]},1,{entry['top'][0]['class']},")


@pytest.mark.slow
def test_cli_output_to_a_reader_that_stopped_ends_quietly(seed_run, held_out_folder,
                                                          monkeypatch):
    file = str(next((held_out_folder / "test" / "dog").iterdir()))
    reader, writer = os.pipe()
    os.close(reader)  # The reader stopped (`predict.py ... | head`): writing raises EPIPE.
    with open(writer, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert cli.main([str(seed_run), file]) == 0  # Not BrokenPipeError.
        stdout.write("x" * 100_000)
        stdout.flush()  # What Python does at exit: its stdout now writes to devnull.


@pytest.mark.slow
def test_cli_exit_1_for_an_unreadable_file_and_2_for_no_model(seed_run, held_out_folder,
                                                              tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    good = str(held_out_folder / "test" / "cat" / "0000.png")
    assert cli.main([str(seed_run), str(tmp_path / "bad.jpg"), good]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(good + "  ") and captured.out.count("\n") == 1
    assert captured.err.startswith(f"error: cannot read image {tmp_path / 'bad.jpg'}: ")
    assert captured.err.count("\n") == 1
    assert cli.main([str(tmp_path), "x.png"]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path} holds no finished train.py checkpoint (expected config.json and "
        f"best_checkpoint/)\n")
    unfinished = Path(shutil.copytree(seed_run, tmp_path / "killed"))
    (unfinished / "results.json").unlink()  # As a run killed before its end leaves it.
    assert cli.main([str(unfinished), good]) == 0
    assert capsys.readouterr().err == (
        f"note: {unfinished} has no results.json: its training did not run to its end "
        f"(killed, stopped early, or still going); this is its best model so far\n")


def test_cli_help_names_each_flag_default_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_status.value.code == 0
    for expected in ("--top-k TOP_K", "(default: 5)", "{table,json,csv}", "(default: table)",
                     "--batch-size BATCH_SIZE", "(default: 64)", "Keras Hub preset"):
        assert expected in text
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["run", "a.png", "--top-k", "0"])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == ("error: argument --top-k: expected a positive integer, "
                                       "got '0' (see --help)\n")


@pytest.mark.slow
def test_a_preset_is_classified_with_index_names(tmp_path, capsys):
    config = ViTHubConfig(image_shape=(8, 8, 3), patch_size=4, num_layers=1, num_heads=2,
                          hidden_dim=8, mlp_dim=12, num_classes=4)
    preset = write_preset(ViTHub(config, rngs=nnx.Rngs(0)), tmp_path / "preset")
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "a.png")
    assert cli.main([str(preset), str(tmp_path / "a.png"), "--format", "json"]) == 0
    captured = capsys.readouterr()
    [entry] = json.loads(captured.out)
    assert sorted(c["class"] for c in entry["top"]) == ["0", "1", "2", "3"]
    assert captured.err == (f"note: {preset} is a Keras Hub preset, which records no class "
                            f"names: classes are named by index 0..3 (ImageNet's class indices "
                            f"for the ImageNet presets)\n")
