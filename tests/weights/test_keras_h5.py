"""The seed's `.weights.h5` read by vit_flax alone (vit_flax.weights.keras_h5): no parity, no
Keras, and a hostile file refused in one line before it costs memory or time.

The files here are written by `write_keras_weights` in the layout Keras' saver gives the
seed's model (groups named by class, numbered in graph order, `vars/0`, `vars/1`, ...); that
Keras' own files load is parity/test_weights_file.py's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY, random_images

import vit_flax
from vit_flax.weights import keras_h5
from vit_flax.weights.keras_h5 import WeightMismatchError, flax_structure, load_keras_weights

REPO = Path(__file__).resolve().parents[2]
CONFIG = vit_flax.ViTConfig(**TINY)


def group_names(blocks: int, head_denses: int) -> list[str]:
    """The saver's group of each layer of flax_structure's order: by class, numbered."""
    counters: dict[str, int] = {}

    def named(kind: str) -> str:
        count = counters[kind] = counters.get(kind, -1) + 1
        return kind + (f"_{count}" if count else "")

    names = ["normalization", "patch_encoder/projection", "patch_encoder/position_embedding"]
    for _ in range(blocks):
        norm, attention = named("layer_normalization"), named("multi_head_attention")
        names += [norm, *(f"{attention}/{part}" for part in ("query_dense", "key_dense",
                                                              "value_dense", "output_dense")),
                  named("layer_normalization"), named("dense"), named("dense")]
    return names + [named("layer_normalization")] + [named("dense") for _ in range(head_denses)]


def write_keras_weights(model: vit_flax.ViT, path: Path) -> Path:
    structure = flax_structure(model)
    names = group_names(len(structure.blocks), len(structure.head) - 1)
    with h5py.File(path, "w") as file:
        for name, layer in zip(names, structure.layers(), strict=True):
            for index, weight in enumerate(layer.weights):
                file.create_dataset(f"layers/{name}/vars/{index}", data=weight.read())
    return path


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory) -> tuple[vit_flax.ViT, Path]:
    model = vit_flax.create_model(CONFIG, random_images(8, 8))
    return model, write_keras_weights(model, tmp_path_factory.mktemp("h5") / "seed.weights.h5")


def arrays(model) -> list[np.ndarray]:
    return [w.read() for layer in flax_structure(model).layers() for w in layer.weights]


def test_a_weights_file_loads_bit_identically(seed_file):
    model, path = seed_file
    loaded, config = vit_flax.load_pretrained(path, config=CONFIG)
    assert config == CONFIG
    for ours, theirs in zip(arrays(loaded), arrays(model), strict=True):
        np.testing.assert_array_equal(ours, theirs)


CHILD = textwrap.dedent("""
    import sys
    sys.modules["parity"] = None  # From here on, `import parity` raises ImportError.
    import numpy as np
    import vit_flax

    config = vit_flax.ViTConfig.from_json(sys.argv[2])
    model, _ = vit_flax.load_pretrained(sys.argv[1], config=config)
    np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[4]))))
    assert not {"keras", "parity"} & {name.split(".")[0] for name in sys.modules
                                      if sys.modules[name] is not None}
""")


@pytest.mark.slow
def test_vit_flax_reads_it_with_parity_unimportable(seed_file, tmp_path):
    model, path = seed_file
    images = random_images(2, 8, seed=5)
    np.save(tmp_path / "images.npy", images)
    subprocess.run([sys.executable, "-c", CHILD, str(path), CONFIG.to_json(),
                    str(tmp_path / "logits.npy"), str(tmp_path / "images.npy")],
                   check=True, cwd=REPO, timeout=300)
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), model(images))


def edited(path: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited.weights.h5"
    copy.write_bytes(path.read_bytes())
    with h5py.File(copy, "r+") as file:
        edit(file)
    return copy


def replace_dataset(name: str, **dataset):
    def edit(file):
        del file[name]
        file.create_dataset(name, **dataset)

    return edit


KERNEL = "layers/dense/vars/0"  # The first block's first MLP Dense: (8, 16).


@pytest.mark.parametrize("edit, expected", [
    (replace_dataset(KERNEL, data=np.ones((8, 16), np.complex64)),
     r"layers/dense/vars/0 holds complex64 values; weights are real numbers"),
    (replace_dataset(KERNEL, data=np.full((8, 16), np.nan, np.float32)),
     r"layers/dense/vars/0 holds 128 NaN or infinite values"),
    (replace_dataset(KERNEL, data=np.full((8, 16), -np.inf, np.float32)),
     r"layers/dense/vars/0 holds 128 NaN or infinite values"),
    # The right shape, declared but never written: a few bytes on disk.
    (replace_dataset(KERNEL, shape=(8, 16), dtype=np.float32, chunks=(2, 2)),
     r"layers/dense/vars/0 declares shape \(8, 16\) \(512 bytes\) but stores 0 bytes"),
    # Declared huge: refused by its shape, before a byte is read.
    (replace_dataset(KERNEL, shape=(10**6, 10**6), dtype=np.float32, chunks=(64, 64)),
     r"vars/0 has shape \(1000000, 1000000\), vit_flax blocks\[0\]\.mlp\.dense\[0\] kernel "
     r"has shape \(8, 16\)"),
], ids=["complex", "nan", "inf", "declared-not-stored", "declared-huge"])
def test_a_hostile_weights_file_is_refused_in_one_line(seed_file, tmp_path, edit, expected):
    _, path = seed_file
    with pytest.raises(WeightMismatchError, match=expected) as error:
        load_keras_weights(edited(path, tmp_path, edit), CONFIG)
    assert "\n" not in str(error.value)


def test_a_block_count_the_file_does_not_hold_is_refused_before_building(seed_file,
                                                                        monkeypatch):
    _, path = seed_file

    def no_model(config):
        raise AssertionError("the model was built before the block count was checked")

    monkeypatch.setattr(keras_h5, "abstract_model", no_model)
    with pytest.raises(WeightMismatchError, match=r"seed.weights.h5 has 1 transformer blocks, "
                                                  r"config.transformer_layers is 10000$"):
        load_keras_weights(path, CONFIG.replace(transformer_layers=10_000))


def test_a_standard_config_is_refused(seed_file):
    _, path = seed_file
    standard = CONFIG.replace(architecture="standard", head="cls", mlp_head_units=())
    with pytest.raises(WeightMismatchError, match="architecture='standard': a .weights.h5 "
                                                  "holds the seed's Keras model"):
        load_keras_weights(path, standard)


def test_the_library_imports_nothing_from_parity():
    offending = [str(path.relative_to(REPO)) for path in (REPO / "vit_flax").rglob("*.py")
                 if any(line.lstrip().startswith(("import parity", "from parity"))
                        for line in path.read_text().splitlines())]
    assert offending == []
