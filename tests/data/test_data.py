"""Data sources (TFDS, the CIFAR python archive, image folders, arrays), Keras' validation
split, the epoch order and the batches. Archives and images are generated in the real on-disk
formats; no test reaches the network or reads ~/.keras."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import random_images, write_image_folder
from PIL import Image

from vit_flax.data import sources as data
from vit_flax.data.sources import DataError
from vit_flax.models import augment

# float64 results cast to float32 may land on either side of a float32 rounding boundary when
# the float64 values differ in their last bits (another summation order): one float32 ulp.
FLOAT32_ULP = 2.0**-23


@pytest.fixture(autouse=True)
def no_keras_cache(tmp_path, monkeypatch):
    """Nothing in ~/.keras is read, and any download attempt fails loudly."""
    monkeypatch.setattr(data, "KERAS_CACHE", tmp_path / "keras-cache")

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test tried to download {args}")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)


def numbered(count: int) -> data.Dataset:
    """count 1x1 images whose pixel and label are the example's index (mod 256)."""
    index = np.arange(count)
    return data.Dataset((index % 256).astype(np.uint8).reshape(count, 1, 1, 1), index)


# --- validation split, epoch order, batches --------------------------------------------------

@pytest.mark.parametrize("count, fraction, train_count", [
    (50_000, 0.1, 45_000),  # CIFAR's 45,000 / 5,000.
    (1_000, 0.1, 900),
    (99, 0.1, 89),  # floor(89.1): the validation part gets the rounding (not 99 - int(9.9)).
    (100, 0.9, 9),  # 100 * (1 - 0.9) is 9.999999999999998 in floats: Keras' floor gives 9.
    (10, 0.0, 10),  # No split: all of it trains, nothing validates.
])
def test_validation_split_takes_the_last_fraction(count, fraction, train_count):
    train, validation = data.validation_split(numbered(count), fraction)
    np.testing.assert_array_equal(train.labels, np.arange(train_count))
    np.testing.assert_array_equal(validation.labels, np.arange(train_count, count))
    np.testing.assert_array_equal(validation.images.reshape(-1), np.arange(train_count, count)
                                  % 256)


@pytest.mark.parametrize("count, fraction", [
    (1, 0.1),  # floor(0.9) = 0: nothing left to train on.
    (10, 0.9),  # 10 * 0.09999999999999998 floors to 0 as in Keras.
    (10, 1e-17),  # 1 - 1e-17 == 1.0: nothing left to validate on.
])
def test_validation_split_that_leaves_an_empty_part_is_an_error(count, fraction):
    with pytest.raises(DataError, match="empty"):
        data.validation_split(numbered(count), fraction)


def test_epoch_order_is_a_seeded_permutation():
    order = data.epoch_order(1000, seed=3, epoch=1)
    assert order.dtype == np.int32
    np.testing.assert_array_equal(np.sort(order), np.arange(1000))
    np.testing.assert_array_equal(order, data.epoch_order(1000, seed=3, epoch=1))
    assert not np.array_equal(order, data.epoch_order(1000, seed=3, epoch=2))
    assert not np.array_equal(order, data.epoch_order(1000, seed=4, epoch=1))
    assert not np.array_equal(order, np.arange(1000))


def test_batches_keep_the_partial_last_batch():
    order = data.epoch_order(900, seed=0, epoch=1)
    rows = data.batch_indices(order, 256)
    assert rows.shape == (4, 256)
    assert [int((row >= 0).sum()) for row in rows] == [256, 256, 256, 132]
    np.testing.assert_array_equal(rows[-1, 132:], -1)  # The padding is at the end only.
    np.testing.assert_array_equal(rows.reshape(-1)[:900], order)  # Every index once, in order.


def test_batches_of_an_exact_multiple_have_no_padding():
    rows = data.batch_indices(np.arange(512, dtype=np.int32), 256)
    np.testing.assert_array_equal(rows, np.arange(512).reshape(2, 256))


# --- Normalization.adapt ---------------------------------------------------------------------

@pytest.mark.parametrize("images", [
    random_images(7, 5, seed=1),
    # Bright and nearly constant: E[x^2] - E[x]^2 cancels badly in any low precision.
    np.random.default_rng(2).integers(250, 256, (9, 4, 4, 3), dtype=np.uint8),
    np.random.default_rng(3).uniform(0, 255, (6, 5, 5, 3)).astype(np.float32),
], ids=["uint8", "uint8-bright", "float32"])
def test_channel_statistics_are_numpys_float64_ones(images):
    mean, variance = augment.channel_statistics(images)
    assert mean.dtype == variance.dtype == np.float32
    assert mean.shape == variance.shape == (3,)
    expected_mean = np.mean(images, axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    expected_variance = np.var(images, axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    np.testing.assert_allclose(mean, expected_mean, rtol=FLOAT32_ULP, atol=0)
    np.testing.assert_allclose(variance, expected_variance, rtol=FLOAT32_ULP, atol=0)


# --- TFDS ------------------------------------------------------------------------------------

def test_cifar100_from_a_prepared_tfds_copy(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        splits = data.load_cifar("cifar100", data_dir=tmp_path)
    for part in (splits.train, splits.test):
        assert part.images.shape == (6, 32, 32, 3)
        assert part.images.dtype == np.uint8
        assert part.labels.dtype == np.int32
        assert 0 <= part.labels.min() and part.labels.max() < 100
    assert len(splits.class_names) == splits.num_classes == 100


# --- the CIFAR python archive ----------------------------------------------------------------

def python2_pickle(value) -> bytes:
    """Protocol 2, as the archives were written (Python 2, numpy 1: `numpy.core`)."""
    return pickle.dumps(value, protocol=2).replace(b"numpy._core.multiarray",
                                                   b"numpy.core.multiarray")


def write_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def cifar_rows(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3072), dtype=np.uint8)


def write_cifar10(directory: Path, per_batch: int = 4, test_count: int = 3):
    """cifar-10-python.tar.gz; returns (train rows, train labels, test rows, test labels)."""
    rows = [cifar_rows(per_batch, seed) for seed in range(1, 6)]
    labels = [[(seed + i) % 10 for i in range(per_batch)] for seed in range(1, 6)]
    test_rows, test_labels = cifar_rows(test_count, 6), [9, 0, 5][:test_count]
    members = {"cifar-10-batches-py/batches.meta": python2_pickle(
        {b"label_names": [b"airplane"] * 10, b"num_vis": 3072})}
    for i, (x, y) in enumerate(zip(rows, labels, strict=True), start=1):
        members[f"cifar-10-batches-py/data_batch_{i}"] = python2_pickle(
            {b"batch_label": b"training batch", b"labels": y, b"data": x,
             b"filenames": [b"x.png"] * len(y)})
    members["cifar-10-batches-py/test_batch"] = python2_pickle(
        {b"batch_label": b"testing batch", b"labels": test_labels, b"data": test_rows,
         b"filenames": [b"x.png"] * test_count})
    write_tar_gz(directory / "cifar-10-python.tar.gz", members)
    return np.concatenate(rows), np.concatenate(labels), test_rows, np.array(test_labels)


def cifar100_members(train_rows, fine, test_rows, test_fine) -> dict[str, bytes]:
    def batch(rows, labels):
        return python2_pickle({b"filenames": [b"x.png"] * len(labels), b"batch_label": b"b",
                               b"fine_labels": list(labels),
                               b"coarse_labels": [label // 5 for label in labels],
                               b"data": rows})

    return {"cifar-100-python/train": batch(train_rows, fine),
            "cifar-100-python/test": batch(test_rows, test_fine),
            "cifar-100-python/meta": python2_pickle({b"fine_label_names": [b"apple"] * 100})}


def as_hwc(rows: np.ndarray) -> np.ndarray:
    """Rows of R plane, G plane, B plane (each 32 rows of 32) as (N, 32, 32, 3)."""
    planes = [rows[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32) for c in range(3)]
    return np.stack(planes, axis=-1)


def test_cifar10_archive_is_read_as_keras_reads_it(tmp_path):
    train_rows, train_labels, test_rows, test_labels = write_cifar10(tmp_path)
    splits = data.read_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar10")
    assert splits.train.images.shape == (20, 32, 32, 3) and splits.test.images.shape[0] == 3
    np.testing.assert_array_equal(splits.train.images, as_hwc(train_rows))
    np.testing.assert_array_equal(splits.train.labels, train_labels)
    np.testing.assert_array_equal(splits.test.images, as_hwc(test_rows))
    np.testing.assert_array_equal(splits.test.labels, test_labels)
    assert splits.class_names == tuple(str(i) for i in range(10))


def test_cifar100_archive_pixel_layout_and_fine_labels(tmp_path):
    train_rows, test_rows = cifar_rows(5, 1), cifar_rows(2, 2)
    # Plant R=11, G=22, B=33 at row 3, column 7 of test image 1.
    test_rows[1, 3 * 32 + 7], test_rows[1, 1024 + 3 * 32 + 7] = 11, 22
    test_rows[1, 2048 + 3 * 32 + 7] = 33
    fine = [99, 0, 42, 7, 63]
    write_tar_gz(tmp_path / "cifar-100-python.tar.gz",
                 cifar100_members(train_rows, fine, test_rows, [5, 98]))

    splits = data.load_cifar("cifar100", data_dir=tmp_path)  # No TFDS copy there: the archive.
    np.testing.assert_array_equal(splits.test.images[1, 3, 7], [11, 22, 33])
    np.testing.assert_array_equal(splits.train.images, as_hwc(train_rows))
    np.testing.assert_array_equal(splits.test.images, as_hwc(test_rows))
    np.testing.assert_array_equal(splits.train.labels, fine)  # Fine labels, not coarse.
    np.testing.assert_array_equal(splits.test.labels, [5, 98])
    assert splits.train.images.dtype == np.uint8 and splits.train.labels.dtype == np.int32
    assert splits.num_classes == 100


def test_truncated_archive_is_a_data_error_naming_the_file(tmp_path):
    write_cifar10(tmp_path)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:archive.stat().st_size // 2])
    with pytest.raises(DataError) as error:
        data.load_cifar("cifar10", data_dir=tmp_path)
    assert str(archive) in str(error.value)


class WritesAFile:
    """Unpickling this opens `path` for writing, which creates it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class RunsAShellCommand:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("payload", [WritesAFile, RunsAShellCommand])
def test_crafted_archive_cannot_run_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    members = cifar100_members(cifar_rows(2, 0), [1, 2], cifar_rows(1, 1), [3])
    members["cifar-100-python/train"] = pickle.dumps(
        {b"data": cifar_rows(2, 0), b"fine_labels": payload(marker)}, protocol=2)
    write_tar_gz(tmp_path / "cifar-100-python.tar.gz", members)
    with pytest.raises(DataError, match="refusing"):
        data.load_cifar("cifar100", data_dir=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("batch", [
    [1, 2, 3],  # A pickle, but not a dict.
    {b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]},  # Rows of 100, not 3072.
], ids=["not-a-dict", "wrong-row-length"])
def test_archive_member_that_is_no_cifar_batch_is_a_data_error(tmp_path, batch):
    members = cifar100_members(cifar_rows(2, 0), [1, 2], cifar_rows(1, 1), [3])
    members["cifar-100-python/train"] = pickle.dumps(batch, protocol=2)
    archive = write_tar_gz(tmp_path / "cifar-100-python.tar.gz", members)
    with pytest.raises(DataError) as error:
        data.load_cifar("cifar100", data_dir=tmp_path)
    assert str(archive) in str(error.value)


# --- download ----------------------------------------------------------------------------------

def test_missing_data_without_network_says_what_to_download_and_where(tmp_path, monkeypatch):
    calls = []

    def offline(url, filename):
        calls.append(url)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as error:
        data.load_cifar("cifar100", data_dir=empty)
    message = str(error.value)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message
    assert f"put it in {empty}" in message
    assert not (empty / "cifar-100-python.tar.gz").exists()


def test_without_data_dir_the_archive_goes_to_keras_cache(tmp_path, monkeypatch):
    # Only the archive path is under test: TFDS would look in ~/tensorflow_datasets.
    monkeypatch.setattr(data, "_read_tfds", lambda name, directory: None)
    source = tmp_path / "source"
    write_cifar10(source)

    def download(url, filename):
        Path(filename).write_bytes((source / "cifar-10-python.tar.gz").read_bytes())

    monkeypatch.setattr(urllib.request, "urlretrieve", download)
    splits = data.load_cifar("cifar10")
    assert len(splits.train) == 20 and len(splits.test) == 3
    assert sorted(p.name for p in data.KERAS_CACHE.iterdir()) == ["cifar-10-python.tar.gz"]
    # The second call reads the cached archive (urlretrieve would now fail).
    monkeypatch.setattr(urllib.request, "urlretrieve", None)
    assert len(data.load_cifar("cifar10").train) == 20


# --- image folders ---------------------------------------------------------------------------

# write_image_folder's class k (in the order given) has every pixel in [40 + 80k - 30, + 30).
BRIGHTNESS = {0: (10, 70), 1: (90, 150), 2: (170, 230)}


def test_folder_classes_labels_and_test_split(tmp_path):
    written = ("zebra", "ant", "moth")
    root = write_image_folder(tmp_path, classes=written, train_per_class=5, test_per_class=2)
    splits = data.load_folder(root, input_size=8)
    assert splits.class_names == ("ant", "moth", "zebra")
    for part, count in ((splits.train, 15), (splits.test, 6)):
        assert part.images.shape == (count, 8, 8, 3) and part.images.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(part.labels), [count // 3] * 3)
        for image, label in zip(part.images, part.labels, strict=True):
            low, high = BRIGHTNESS[written.index(splits.class_names[label])]
            assert low <= image.min() and image.max() < high


def test_folder_without_test_has_no_test_split(tmp_path):
    splits = data.load_folder(write_image_folder(tmp_path, train_per_class=2), input_size=8)
    assert splits.test is None and len(splits.train) == 6


def test_folder_images_are_resized_and_made_rgb(tmp_path):
    root = tmp_path / "images"
    for name in ("gray", "rgba", "wide"):
        (root / "train" / name).mkdir(parents=True)
    Image.new("L", (8, 8), 77).save(root / "train" / "gray" / "a.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(root / "train" / "rgba" / "a.PNG")
    Image.new("RGB", (20, 13), (200, 100, 50)).save(root / "train" / "wide" / "a.jpg")
    splits = data.load_folder(root, input_size=8)
    assert splits.train.images.shape == (3, 8, 8, 3)
    by_class = dict(zip(splits.train.labels, splits.train.images, strict=True))
    np.testing.assert_array_equal(by_class[0], np.full((8, 8, 3), 77))
    np.testing.assert_array_equal(by_class[1], np.broadcast_to([10, 20, 30], (8, 8, 3)))
    # A flat colour survives bilinear resizing; JPEG's quantization and 4:2:0 chroma
    # subsampling move a flat colour by a few levels: 4 allows for that, not for a wrong image.
    np.testing.assert_allclose(by_class[2], np.broadcast_to([200, 100, 50], (8, 8, 3)), atol=4)


def test_folder_order_is_one_fixed_shuffle(tmp_path):
    root = write_image_folder(tmp_path, train_per_class=12)
    labels = data.load_folder(root, input_size=8).train.labels
    np.testing.assert_array_equal(labels, data.load_folder(root, input_size=8).train.labels)
    _, validation = data.validation_split(data.load_folder(root, input_size=8).train, 0.1)
    assert len(validation) == 4 and len(set(validation.labels.tolist())) > 1


def test_folder_with_a_corrupt_image_names_it(tmp_path):
    root = write_image_folder(tmp_path, train_per_class=2)
    bad = root / "train" / "dog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError) as error:
        data.load_folder(root, input_size=8)
    assert str(bad) in str(error.value)


def solid(path: Path, colour, size: int = 8, **save) -> Path:
    """A one-colour RGB image at `path` (its folders created), in the format of its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, **save)
    return path


def folder_error(root: Path) -> str:
    with pytest.raises(DataError) as error:
        data.load_folder(root, input_size=8)
    return str(error.value)


def test_folder_reads_every_format_pillow_reads(tmp_path):
    colours = {"bmp": (1, 2, 3), "gif": (40, 50, 60), "png": (70, 80, 90),
               "tif": (100, 110, 120), "webp": (130, 140, 150)}
    for name, colour in colours.items():
        for i in range(3 if name == "webp" else 2):
            # Upper-case suffixes count too; lossless WebP keeps the colour exact.
            suffix = name.upper() if name == "png" else name
            solid(tmp_path / "train" / name / f"{i}.{suffix}", colour, lossless=True)
    (tmp_path / "train" / "webp" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "webp" / "scan.pdf").write_text("Pillow writes PDF, never reads it")
    splits = data.load_folder(tmp_path, input_size=8)
    assert splits.class_names == ("bmp", "gif", "png", "tif", "webp")
    np.testing.assert_array_equal(np.bincount(splits.train.labels), [2, 2, 2, 2, 3])
    for image, label in zip(splits.train.images, splits.train.labels, strict=True):
        colour = colours[splits.class_names[label]]
        np.testing.assert_array_equal(image, np.broadcast_to(colour, (8, 8, 3)))
    suffixes = data.image_suffixes()
    assert {".webp", ".avif", ".tiff", ".jpeg", ".pgm"} <= suffixes
    assert not {".pdf", ".txt", ".h5"} & suffixes  # Save-only, no image, a stub: none read.


def test_folder_skips_hidden_and_tool_folders_and_hidden_files(tmp_path):
    root = write_image_folder(tmp_path, classes=("cat", "dog"), train_per_class=2,
                              test_per_class=1)
    for split in ("train", "test"):
        solid(root / split / ".ipynb_checkpoints" / "0000-checkpoint.png", (9, 9, 9))
        solid(root / split / "__MACOSX" / "cat" / "0000.png", (9, 9, 9))
        (root / split / "__pycache__").mkdir()
        (root / split / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / ".hidden").mkdir()
    # A macOS resource fork: AppleDouble bytes under an image's name, no image.
    (root / "train" / "cat" / "._0000.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00")
    splits = data.load_folder(root, input_size=8)
    assert splits.class_names == ("cat", "dog")
    assert len(splits.train) == 4 and len(splits.test) == 2


@pytest.mark.parametrize("split, target", [("train", "train"), ("train", "."),
                                           ("test", "."), ("test", "test")])
def test_folder_symlink_to_an_enclosing_folder_is_refused(tmp_path, split, target):
    root = write_image_folder(tmp_path, classes=("cat", "dog"), train_per_class=1,
                              test_per_class=1)
    link = root / split / "loop"
    link.symlink_to((root / target).resolve(), target_is_directory=True)
    assert folder_error(root) == (f"{link} links to {(root / target).resolve()}, which contains "
                                  f"it: a class folder cannot hold the data set itself; remove "
                                  f"the link")


def test_folder_class_may_be_a_symlink_to_a_folder_elsewhere(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=("cat", "dog"), train_per_class=2)
    for i in range(3):
        solid(tmp_path / "elsewhere" / "birds" / f"{i}.png", (5, 6, 7))
    (root / "train" / "bird").symlink_to(tmp_path / "elsewhere" / "birds")
    splits = data.load_folder(root, input_size=8)
    assert splits.class_names == ("bird", "cat", "dog")
    np.testing.assert_array_equal(np.bincount(splits.train.labels), [3, 2, 2])


def test_folder_two_classes_in_one_folder_are_refused(tmp_path):
    root = write_image_folder(tmp_path, classes=("cat", "dog"), train_per_class=2)
    (root / "train" / "kitty").symlink_to(root / "train" / "cat")
    assert folder_error(root) == (
        f"{root / 'train' / 'kitty'} and {root / 'train' / 'cat'} are the same folder "
        f"({(root / 'train' / 'cat').resolve()}): its images would have two labels; remove one "
        f"of them")


@pytest.mark.parametrize("split, files, held", [
    ("train", ("notes.txt", "scan.pdf"), "it holds only notes.txt, scan.pdf"),
    ("train", (), "it is empty"),
    ("train", ("._0.png",), "it holds only ._0.png"),  # Resource forks are no images.
    ("test", ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "f.txt", "g.txt"),
     "it holds only a.txt, b.txt, c.txt, d.txt, e.txt and 2 more"),
])
def test_folder_class_without_images_names_it_and_its_files(tmp_path, split, files, held):
    root = write_image_folder(tmp_path, classes=("cat", "dog"), train_per_class=2,
                              test_per_class=1)
    folder = root / split / "frog"
    folder.mkdir()
    other = "test" if split == "train" else "train"
    solid(root / other / "frog" / "0.png", (1, 1, 1))  # So that only `folder` lacks images.
    for name in files:
        (folder / name).write_text("not an image")
    assert folder_error(root) == (f"{folder} has no images ({held}); expected image files "
                                  f"(.png, .jpg, .webp, ... any format Pillow reads): add some "
                                  f"or remove the folder")


@pytest.mark.parametrize("classes, found", [((), "0 class folder(s)"),
                                            (("cat",), "1 class folder(s) (cat)")])
def test_folder_with_fewer_than_two_classes_is_refused(tmp_path, classes, found):
    # One class trains, and its test accuracy is 100% whatever the model does.
    (tmp_path / "train").mkdir()
    write_image_folder(tmp_path, classes=classes, train_per_class=3, test_per_class=1)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # Not a class.
    assert folder_error(tmp_path) == (f"{tmp_path / 'train'} has {found}, expected at least two "
                                      f"(train/<class>/<images>): one class has nothing to tell "
                                      f"apart")


@pytest.mark.parametrize("test_classes, problem", [
    (("cat", "dog", "emu"), "has emu, which train/ lacks"),
    (("cat",), "lacks dog"),
    (("cat", "emu"), "has emu, which train/ lacks and lacks dog"),
    ((), "lacks cat, dog"),
])
def test_folder_test_classes_must_be_train_classes(tmp_path, test_classes, problem):
    root = write_image_folder(tmp_path, classes=("cat", "dog"), train_per_class=1)
    (root / "test").mkdir()
    write_image_folder(tmp_path, classes=test_classes, train_per_class=0, test_per_class=1)
    assert folder_error(root) == (f"{root / 'test'} {problem}: test/ must hold the class "
                                  f"folders of train/ (cat, dog); add or remove folders")


def write_with_pillow(path: Path, pixels: np.ndarray) -> Path:
    """`pixels` as Pillow stores their dtype: uint16 is mode I;16, >u2 I;16B, int32 I."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# 16-bit levels at the edges of 8-bit ones: v * 257 (8-bit v scaled up), v * 256, v * 256 - 1.
LEVELS = np.array([0, 255, 256, 257, 511, 512, 32767, 32768, 32896, 65279, 65280, 65535]
                  + list(range(1000, 65535, 1248)), np.uint16)[:64].reshape(8, 8)


@pytest.mark.parametrize("suffix, dtype, mode", [(".png", "<u2", "I;16"),
                                                 (".tif", ">u2", "I;16B"),
                                                 (".pgm", "<u2", "I")])
def test_folder_16_bit_images_keep_their_high_byte(tmp_path, suffix, dtype, mode):
    path = write_with_pillow(tmp_path / "train" / "deep" / f"a{suffix}", LEVELS.astype(dtype))
    with Image.open(path) as image:
        assert image.mode == mode  # Each 16-bit mode Pillow reads these files in.
    solid(tmp_path / "train" / "plain" / "a.png", (0, 0, 0))
    splits = data.load_folder(tmp_path, input_size=8)
    deep = splits.train.images[list(splits.train.labels).index(0)]
    np.testing.assert_array_equal(deep, np.repeat((LEVELS >> 8)[..., None], 3, axis=-1))
    assert deep[..., 0].reshape(-1)[:12].tolist() == [0, 0, 1, 1, 1, 2, 127, 128, 128, 254,
                                                      255, 255]


def test_folder_32_bit_images_in_8_bits_are_kept_and_beyond_16_bits_refused(tmp_path):
    levels = np.arange(0, 256, 4, dtype=np.int32).reshape(8, 8)
    write_with_pillow(tmp_path / "train" / "eight" / "a.tif", levels)
    solid(tmp_path / "train" / "plain" / "a.png", (0, 0, 0))
    splits = data.load_folder(tmp_path, input_size=8)
    eight = splits.train.images[list(splits.train.labels).index(0)]
    np.testing.assert_array_equal(eight, np.repeat(levels[..., None], 3, axis=-1))
    bad = write_with_pillow(tmp_path / "train" / "eight" / "b.tif", levels - 5)
    assert folder_error(tmp_path) == (f"cannot read image {bad}: its 32-bit pixels span "
                                      f"[-5, 247], outside 16 bits (0..65535); save it with 8 or "
                                      f"16 bits a channel")


@pytest.mark.parametrize("limit", [200, 100], ids=["pillow-warns", "pillow-raises"])
def test_folder_decompression_bomb_is_refused(tmp_path, monkeypatch, recwarn, limit):
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: 16x16 = 256 pixels
    # is in the first range for a limit of 200 and in the second for 100; 8x8 is in neither.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    root = write_image_folder(tmp_path, classes=("cat", "dog"), train_per_class=3)
    bomb = solid(root / "train" / "dog" / "bomb.png", (1, 2, 3), size=16)
    # One limit named, however Pillow refused (its own words name twice the limit).
    assert folder_error(root) == (
        f"refusing image {bomb}: 256 pixels, more than PIL.Image.MAX_IMAGE_PIXELS ({limit}) (a "
        f"decompression bomb?); shrink it, or raise that limit in Python if you trust it")
    assert not [w for w in recwarn if w.category is Image.DecompressionBombWarning]


# --- numpy arrays ----------------------------------------------------------------------------

def test_from_arrays_accepts_keras_label_shape():
    images = random_images(4, 8)
    splits = data.from_arrays(images, np.array([[0], [2], [1], [2]]), images[:2],
                              np.array([[1], [0]]))
    np.testing.assert_array_equal(splits.train.labels, [0, 2, 1, 2])
    np.testing.assert_array_equal(splits.test.labels, [1, 0])
    assert splits.class_names == ("0", "1", "2")


@pytest.mark.parametrize("y_train, y_test", [
    ([0, 1, 3], [0]),  # 3 classes named, label 3.
    ([0, -1, 2], [0]),
    ([0, 1, 2], [5]),
])
def test_from_arrays_rejects_labels_out_of_range(y_train, y_test):
    images = random_images(3, 8)
    with pytest.raises(DataError, match=r"labels must be in \[0, 3\)"):
        data.from_arrays(images, np.array(y_train), images[:1], np.array(y_test),
                         class_names=("a", "b", "c"))


def test_folder_jpegs_of_twice_the_input_size_are_decoded_in_draft_mode(tmp_path):
    # 64 px JPEGs read at 8 px: decoded at 1/8 scale by the JPEG decoder (DCT scaling), not
    # decoded whole and resized; random pixels tell the two apart.
    for label, name in enumerate(("a", "b")):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(random_images(1, 64, seed=label)[0]).save(
            tmp_path / "train" / name / "x.jpg")
    train = data.load_folder(tmp_path, input_size=8).train
    image = train.images[list(train.labels).index(0)]
    with Image.open(tmp_path / "train" / "a" / "x.jpg") as drafted:
        drafted.draft("RGB", (8, 8))
        assert drafted.size == (8, 8)
        want = np.asarray(drafted.convert("RGB"))
    with Image.open(tmp_path / "train" / "a" / "x.jpg") as whole:
        resized = np.asarray(whole.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(image, want)
    assert not np.array_equal(image, resized)
