"""`.weights.h5` files as Keras writes them: loaded with h5py alone, mapped by structure.

Weights compare bit for bit (a file stores float32 exactly); logits within 1e-5 absolute
(test_model.py explains the figure: the same weights through two float32 implementations).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import parity
from parity import keras_reference
from parity.convert import flax_structure, keras_structure, match
from parity.harness import SMALL, random_images
from vit_flax import ViTConfig, predict

REPO = Path(__file__).resolve().parents[1]
LOGITS_TOLERANCE = 1e-5
# Another config than any model this process builds: 3 blocks, one head Dense, 7 classes.
OTHER = SMALL.replace(transformer_layers=3, mlp_head_units=(48,), num_classes=7)

# Run in a fresh interpreter: two throwaway models shift every auto-generated layer name,
# then the seed's model is adapted, compiled (its optimizer built, so the file also holds
# AdamW's variables, as after fit) and saved by ModelCheckpoint(save_weights_only=True)'s
# own code, called as fit calls it at an epoch's end (a real fit costs ~40 s eagerly here).
WRITER = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from parity import keras_reference
    from vit_flax import ViTConfig

    out = sys.argv[1]
    config = ViTConfig.from_json(sys.argv[2])
    keras.utils.set_random_seed(4)
    for _ in range(2):
        keras_reference.build_keras_vit(config)
    x = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    model = keras_reference.build_keras_vit(config, adapt_images=x)
    keras_reference.compile_like_seed(model, config)
    model.optimizer.build(model.trainable_variables)
    # mode="max": "auto" reads the direction off the compiled metrics, built only by fit.
    checkpoint = keras.callbacks.ModelCheckpoint(
        out + "/checkpoint.weights.h5", monitor="val_accuracy", save_best_only=True,
        save_weights_only=True, mode="max")
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, logs={"val_accuracy": 0.5})
    np.save(out + "/logits.npy", model.predict(x[:4], verbose=0))
    np.save(out + "/images.npy", x[:4])
    names = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    json.dump(names, open(out + "/dense_names.json", "w"))
""")


@pytest.fixture(scope="module")
def foreign_file(tmp_path_factory) -> Path:
    """A checkpoint written by another Python process, and what that process predicted."""
    out = tmp_path_factory.mktemp("foreign")
    env = dict(os.environ, PYTHONPATH=str(REPO), KERAS_BACKEND="jax")
    subprocess.run([sys.executable, "-c", WRITER, str(out), OTHER.to_json()], check=True,
                   env=env, cwd=REPO, timeout=300)
    return out


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    keras_model = keras_reference.build_keras_vit(SMALL, adapt_images=random_images(32, seed=1))
    path = tmp_path_factory.mktemp("small") / "small.weights.h5"
    keras_model.save_weights(path)
    return keras_model, path


def check_logits(record, what: str, ours: np.ndarray, expected: np.ndarray) -> None:
    difference = float(np.abs(ours - expected).max())
    record(what, difference, LOGITS_TOLERANCE)
    assert difference <= LOGITS_TOLERANCE, f"{what}: max |difference| {difference:.3g}"


def test_seed_model_file_loads_and_predicts(seed_models, tmp_path, record):
    keras_model, _ = seed_models
    path = tmp_path / "seed.weights.h5"
    keras_model.save_weights(path)
    loaded = parity.load_keras_weights(path, ViTConfig())
    for keras_weight, flax_weight in match(keras_structure(keras_model), flax_structure(loaded)):
        np.testing.assert_array_equal(flax_weight.read(), keras_weight.read())
    images = random_images(4, seed=31)
    check_logits(record, "logits of a seed model loaded from .weights.h5",
                 predict(loaded, images, batch_size=4), keras_model.predict(images, verbose=0))


def test_checkpoint_from_another_process(foreign_file, record):
    path = foreign_file / "checkpoint.weights.h5"
    names = json.loads((foreign_file / "dense_names.json").read_text())
    with h5py.File(path, "r") as h5file:
        file_groups = sorted(k for k in h5file["layers"] if k.startswith("dense"))
        assert "optimizer" in h5file  # AdamW's variables: ignored by the loader.
    assert not set(names) & set(file_groups)  # No name in common: only structure can map.

    loaded = parity.load_keras_weights(path, OTHER)
    images = np.load(foreign_file / "images.npy")
    check_logits(record, "logits of a checkpoint written by another process",
                 predict(loaded, images, batch_size=4), np.load(foreign_file / "logits.npy"))
    # Keras' own loader into a model built here agrees with the h5py reader, bit for bit.
    keras_model = keras_reference.build_keras_vit(OTHER)
    keras_model.load_weights(path)
    for keras_weight, flax_weight in match(keras_structure(keras_model), flax_structure(loaded)):
        np.testing.assert_array_equal(flax_weight.read(), keras_weight.read())


def test_round_trip_through_a_file(small_file, tmp_path):
    _, path = small_file
    flax_model = parity.load_keras_weights(path, SMALL)
    keras_model = keras_reference.build_keras_vit(SMALL)
    parity.flax_to_keras(flax_model, keras_model)
    keras_model.save_weights(tmp_path / "again.weights.h5")
    again = parity.load_keras_weights(tmp_path / "again.weights.h5", SMALL)
    for ours, theirs in zip(flax_structure(again).layers(), flax_structure(flax_model).layers(),
                            strict=True):
        for a, b in zip(ours.weights, theirs.weights, strict=True):
            np.testing.assert_array_equal(a.read(), b.read())
    with h5py.File(path, "r") as first, h5py.File(tmp_path / "again.weights.h5", "r") as second:
        datasets = []
        first.visititems(lambda name, obj: datasets.append(name)
                         if isinstance(obj, h5py.Dataset) else None)
        for name in datasets:
            np.testing.assert_array_equal(second[name][()], first[name][()])


def edited_copy(source: Path, target: Path, edit) -> Path:
    shutil.copy(source, target)
    with h5py.File(target, "r+") as h5file:
        edit(h5file)
    return target


def test_wrong_config_names_group_and_shapes(small_file):
    _, path = small_file
    with pytest.raises(parity.WeightMismatchError,
                       match=r"/layers/dense_\d+ \(layer 'dense_\d+'\) vars/0 has shape "
                             r"\(64, 32\).*head.mlp.dense\[1\] kernel has shape \(64, 48\)"):
        parity.load_keras_weights(path, SMALL.replace(mlp_head_units=(64, 48)))


def test_missing_weight_is_an_error(small_file, tmp_path):
    _, path = small_file
    damaged = edited_copy(path, tmp_path / "missing.weights.h5",
                          lambda f: f.__delitem__("layers/layer_normalization_2/vars/1"))
    with pytest.raises(parity.WeightMismatchError, match=r"/layers/layer_normalization_2 \(layer "
                             r"'layer_normalization_\d+'\) \[vars/0 \(64,\)\] has 1 weights "
                             r"but vit_flax blocks\[1\].layer_norm_1 \[scale \(64,\), "
                             r"bias \(64,\)\] has 2"):
        parity.load_keras_weights(damaged, SMALL)


def test_extra_weight_is_an_error(small_file, tmp_path):
    _, path = small_file
    damaged = edited_copy(path, tmp_path / "extra.weights.h5",
                          lambda f: f["layers/dense_1/vars"].create_dataset("2", data=[1.0]))
    with pytest.raises(parity.WeightMismatchError,
                       match=r"/layers/dense_1 .*\[vars/0 \(128, 64\), vars/1 \(64,\), "
                             r"vars/2 \(1,\)\] has 3 weights but vit_flax "
                             r"blocks\[0\].mlp.dense\[1\] \[kernel \(128, 64\), "
                             r"bias \(64,\)\] has 2"):
        parity.load_keras_weights(damaged, SMALL)


def test_extra_layer_is_an_error(small_file, tmp_path):
    _, path = small_file

    def add_dense(h5file):
        h5file.create_dataset("layers/dense_99/vars/0", data=np.zeros((10, 5), np.float32))
        h5file.create_dataset("layers/dense_99/vars/1", data=np.zeros(5, np.float32))

    damaged = edited_copy(path, tmp_path / "extra_layer.weights.h5", add_dense)
    with pytest.raises(parity.WeightMismatchError,
                       match=r"5 head layers.*has 4 .*/layers/dense_99 \[vars/0 \(10, 5\)"):
        parity.load_keras_weights(damaged, SMALL)


def test_not_a_weights_file(tmp_path):
    with h5py.File(tmp_path / "empty.weights.h5", "w") as h5file:
        h5file.create_dataset("x", data=[1])
    with pytest.raises(parity.WeightMismatchError, match="no 'layers' group"):
        parity.load_keras_weights(tmp_path / "empty.weights.h5", SMALL)
