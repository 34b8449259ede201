"""The trained models the inference tests share (a plugin of test_classify and test_export:
`pytest_plugins`, so each fixture is built once per process):
one tiny trained folder run of the seed's ViT, one created standard ViT saved as a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, write_image_folder

import vit_flax
from vit_flax.data.sources import load_folder
from vit_flax.infra.checkpoints import save_model

CLASSES = ("cat", "dog", "frog")
# The standard ViT's head: a class token and one pre-logits Dense.
STANDARD = dict(TINY, architecture="standard", head="cls", mlp_head_units=(16,))


@pytest.fixture(scope="session")
def held_out_folder(tmp_path_factory) -> Path:
    """12 training and 4 held-out images per class, 8 x 8, class-dependent brightness."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", CLASSES,
                              train_per_class=12, test_per_class=4)


@pytest.fixture(scope="session")
def folder_splits(held_out_folder):
    return load_folder(held_out_folder, TINY["input_size"])


@pytest.fixture(scope="session")
def seed_run(tmp_path_factory, folder_splits) -> Path:
    """A train.py-style run of the seed's ViT. 10 epochs at 3e-3 score 9 of the 12 held-out
    images (measured): an accuracy that neither all-wrong nor all-right names would match."""
    workdir = tmp_path_factory.mktemp("seed_run")
    vit_flax.train(vit_flax.ViTConfig(**TINY, epochs=10, learning_rate=3e-3), folder_splits,
                   workdir, log=lambda _: None)
    return workdir


@pytest.fixture(scope="session")
def standard_run(tmp_path_factory, folder_splits) -> Path:
    """A created (untrained) standard ViT adapted on the training images, saved as a run."""
    workdir = tmp_path_factory.mktemp("standard_run")
    config = vit_flax.ViTConfig(**STANDARD)
    save_model(workdir / "best_checkpoint", vit_flax.create_model(
        config, folder_splits.train.images))
    (workdir / "config.json").write_text(config.to_json())
    (workdir / "data.json").write_text(json.dumps({"class_names": list(CLASSES)}))
    return workdir
