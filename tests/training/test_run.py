"""What `vit_flax.run` (train.py) checks before and on a resume: the workdir outside the
data, and a resumed run reading what it was trained on (data set, size, starting weights)."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, write_image_folder

import vit_flax

pytestmark = pytest.mark.slow  # Trains end to end, or starts processes.

CONFIG = vit_flax.ViTConfig(**TINY, epochs=1)
quiet = {"compilation_cache": None, "unroll_threefry": False}  # As TINY_FLAGS.


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), train_per_class=8)


def test_a_workdir_inside_the_data_folder_is_refused_before_anything_is_made(folder):
    inside = folder / "train" / "runs"
    with pytest.raises(vit_flax.ConfigError, match=r"workdir=.*runs is inside data_dir=.*: its "
                       r"files would be read as training images"):
        vit_flax.run(CONFIG, dataset="folder", data_dir=folder, workdir=inside, **quiet)
    assert not inside.exists()  # No empty class folder left behind.


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A run on the first 20 images, and a run fine-tuned from it."""
    root = tmp_path_factory.mktemp("runs")
    vit_flax.run(CONFIG, dataset="folder", data_dir=folder, workdir=root / "source",
                 train_examples=20, **quiet)
    vit_flax.run(CONFIG, dataset="folder", data_dir=folder, workdir=root / "tuned",
                 init_from=root / "source", **quiet)
    return root


def test_each_run_records_what_it_was_trained_on(trained, folder):
    for name, examples, init_from in (("source", 20, None),
                                      ("tuned", 24, str(trained / "source"))):
        recorded = json.loads((trained / name / "data.json").read_text())
        assert recorded == {"dataset": "folder", "data_dir": str(folder),
                            "class_names": ["cat", "dog", "frog"], "examples": examples,
                            "init_from": init_from}
        results = json.loads((trained / name / "results.json").read_text())
        assert {k: results[k] for k in recorded} == recorded


@pytest.mark.parametrize("run, changed, said", [
    ("source", {"train_examples": 24}, "examples=20; this run has examples=24"),
    ("tuned", {}, "init_from='{root}/source'; this run has init_from=None"),
])
def test_a_resume_with_other_data_or_start_is_refused(trained, folder, run, changed, said):
    before = (trained / run / "history.json").read_text()
    with pytest.raises(vit_flax.ConfigError, match="was trained with " + said.format(
            root=trained).replace("(", r"\(")):
        vit_flax.run(CONFIG.replace(epochs=2), dataset="folder", data_dir=folder,
                     workdir=trained / run, **changed, **quiet)
    assert (trained / run / "history.json").read_text() == before


def test_a_validation_part_of_classes_training_never_sees_is_warned_of():
    # 30 examples stored class by class (10 of each of 3): Keras' last 10% holds only class
    # 2 (and, at 40%, classes training lacks); shuffled, it holds what training holds.
    import numpy as np

    from vit_flax.data import sources
    from vit_flax.training.loop import warn_of_unseen_classes

    images, labels = np.zeros((30, 8, 8, 3), np.uint8), np.repeat(np.arange(3), 10)
    said = {}
    for name, order, fraction in (("by class", np.arange(30), 0.1),
                                  ("by class, 40%", np.arange(30), 0.4),
                                  ("shuffled", np.random.default_rng(0).permutation(30), 0.4)):
        data = sources.Dataset(images[order], labels[order])
        lines = []
        warn_of_unseen_classes(*sources.validation_split(data, fraction), fraction, lines.append)
        said[name] = lines
    assert said["by class"] == [
        "warning: the validation part (the last 0.1 of the training examples, as Keras' "
        "validation_split takes it) holds a single class (2): are the examples stored class "
        "by class? Shuffle them once before training (e.g. with np.random.permutation), or "
        "give validation_split=0"]
    assert "holds classes 2 that the training part lacks" in said["by class, 40%"][0]
    assert said["shuffled"] == []


def test_a_resume_names_the_same_folders_however_they_are_spelled(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from vit_flax.training.loop import check_same_data, describe_data

    for name in ("data", "source", "other"):
        (tmp_path / name).mkdir()
    described = {"dataset": "folder", "data_dir": str(tmp_path / "data"), "examples": 3,
                 "init_from": str(tmp_path / "source")}
    (tmp_path / "data.json").write_text(json.dumps(described))
    member = SimpleNamespace(directory=tmp_path)
    monkeypatch.chdir(tmp_path)
    # A trailing slash, a relative path: the same folders (both were refused).
    check_same_data([member], {**described, "data_dir": "data/",
                               "init_from": f"{tmp_path}/source/"})
    with pytest.raises(vit_flax.ConfigError, match=f"was trained with data_dir="
                                                   f"'{tmp_path / 'data'}'; this run has "
                                                   f"data_dir='other'"):
        check_same_data([member], {**described, "data_dir": "other"})
    # New runs record them absolute: a resume from elsewhere may name them so.
    recorded = describe_data({"dataset": "folder", "data_dir": "data"},
                             SimpleNamespace(class_names=("a",), train=[0, 1, 2]), 3,
                             SimpleNamespace(init_from="source/"))
    assert (recorded["data_dir"], recorded["init_from"]) == (str(tmp_path / "data"),
                                                             str(tmp_path / "source"))
