"""Data sources (CIFAR through TFDS or the official archive, image folders, numpy arrays),
Keras' validation split, and the seeded epoch order. No TensorFlow needed.

Everything here is host-side numpy; the training loop moves the arrays to the device once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import math
import os
import pickle
import re
import tarfile
import urllib.request
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

CIFAR = {
    # name: (archive, folder inside it, train members, test member, label key, classes)
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test",
                 b"fine_labels", 100),
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels", 10),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
# Where keras.datasets caches the same archives: a Keras user already has them there.
KERAS_CACHE = Path("~/.keras/datasets").expanduser()
# Folder images are read class by class; one fixed shuffle (as image_dataset_from_directory's
# shuffle=True) keeps the last-10% validation split from being the last classes only.
FOLDER_SHUFFLE_SEED = 1337


class DataError(ValueError):
    """Data that is missing or malformed; the message says what was expected and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images (N, H, W, C) uint8 and integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 of shape (N, H, W, C), got "
                            f"{self.images.dtype} {self.images.shape}")
        labels = np.asarray(self.labels).reshape(-1).astype(np.int32)
        if len(labels) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(labels)} labels")
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.images)

    def take(self, count: int | None) -> Dataset:
        """The first `count` examples (all of them when count is None)."""
        if count is None:
            return self
        return Dataset(self.images[:count], self.labels[:count])


@dataclasses.dataclass(frozen=True)
class Splits:
    train: Dataset  # What adapt() sees and what fit() splits into training and validation.
    test: Dataset | None  # None when the source has no test split (an image folder without test/).
    class_names: tuple[str, ...]
    # A source's own validation split (a TFDS data set's "validation" beside its "test");
    # None: validate on the last fraction of train, as Keras' validation_split.
    validation: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def validation_split(data: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    """keras fit(validation_split=f): the *last* fraction of the arrays, before any shuffle."""
    split_at = int(math.floor(len(data) * (1.0 - fraction)))
    if fraction > 0 and (split_at == 0 or split_at == len(data)):
        raise DataError(f"validation_split={fraction} of {len(data)} examples leaves an empty "
                        f"training or validation set; use more examples or another split")
    return (Dataset(data.images[:split_at], data.labels[:split_at]),
            Dataset(data.images[split_at:], data.labels[split_at:]))


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


def batch_indices(order: np.ndarray, batch_size: int) -> np.ndarray:
    """(steps, batch_size) rows of `order`; the last partial batch is padded with -1.

    Keras keeps the last partial batch; padding keeps one compiled step shape, and the step
    masks the -1 entries out of the loss and the metrics.
    """
    steps = max(1, -(-len(order) // batch_size))
    padded = np.full(steps * batch_size, -1, np.int32)
    padded[:len(order)] = order
    return padded.reshape(steps, batch_size)


# --- numpy arrays ---------------------------------------------------------------------------

def from_arrays(x_train, y_train, x_test=None, y_test=None,
                class_names: tuple[str, ...] | None = None) -> Splits:
    """Splits from numpy arrays, as `keras.datasets.*.load_data()` returns them."""
    train = Dataset(np.asarray(x_train), np.asarray(y_train))
    test = None if x_test is None else Dataset(np.asarray(x_test), np.asarray(y_test))
    if class_names is None:
        top = max(int(train.labels.max()), -1 if test is None else int(test.labels.max()))
        class_names = tuple(str(i) for i in range(top + 1))
    for name, part in (("train", train), ("test", test)):
        if part is not None:
            check_labels(part, len(class_names), name)
    return Splits(train, test, tuple(class_names))


def check_labels(part: Dataset, num_classes: int, name: str) -> None:
    if len(part) and (part.labels.min() < 0 or part.labels.max() >= num_classes):
        raise DataError(f"{name} labels must be in [0, {num_classes}), got "
                        f"[{part.labels.min()}, {part.labels.max()}]")


# --- CIFAR -----------------------------------------------------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR python archive holds (numpy arrays, lists, dicts, bytes):
    the archive is a pickle, and a plain pickle.load of a crafted one would run its code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR archive")
        return super().find_class(module, name)


def _read_cifar_member(tar: tarfile.TarFile, member: str, label_key: bytes):
    try:
        handle = tar.extractfile(member)
        batch = _CifarUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[label_key], np.int32).reshape(-1)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(f"data {data.shape} and {len(labels)} labels, expected "
                             f"(N, 3072) and N labels")
    except (KeyError, IndexError, TypeError, EOFError, pickle.UnpicklingError, ValueError,
            tarfile.TarError, AttributeError, OSError) as error:
        raise DataError(f"{tar.name}: member {member!r} is not a CIFAR batch ({error}); "
                        f"delete the archive and download it again") from None
    # Rows are channel-major (R plane, G plane, B plane), as keras.datasets reshapes them.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar_archive(path: Path, name: str) -> Splits:
    """CIFAR-10/100 from the official python archive (what keras.datasets downloads)."""
    _, folder, train_members, test_member, label_key, num_classes = CIFAR[name]
    try:
        with tarfile.open(path, "r:gz") as tar:
            parts = [_read_cifar_member(tar, f"{folder}/{m}", label_key) for m in train_members]
            x_test, y_test = _read_cifar_member(tar, f"{folder}/{test_member}", label_key)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"{path} is not a readable {name} archive ({error}); delete it and "
                        f"download it again") from None
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    return from_arrays(x_train, y_train, x_test, y_test,
                       tuple(str(i) for i in range(num_classes)))


def _read_tfds(name: str, data_dir: Path | None) -> Splits | None:
    """CIFAR from a prepared TFDS copy (ArrayRecord), or None when there is none."""
    import logging

    import tensorflow_datasets as tfds  # Imported here: it is slow to import and optional.

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # "no dataset_info.json" is expected when absent.
    try:
        sources = {split: tfds.data_source(name, split=split, download=False,
                                           data_dir=None if data_dir is None else str(data_dir))
                   for split in ("train", "test")}
    except Exception:  # noqa: BLE001 - TFDS raises many kinds for "not prepared here".
        return None
    finally:
        absl_logger.setLevel(level)

    def to_arrays(source):
        records = [source[i] for i in range(len(source))]
        return (np.stack([r["image"] for r in records]).astype(np.uint8),
                np.array([r["label"] for r in records], np.int32))

    label = sources["train"].dataset_info.features["label"]
    return from_arrays(*to_arrays(sources["train"]), *to_arrays(sources["test"]),
                       tuple(label.names))


def download_cifar(name: str, directory: Path) -> Path:
    archive = CIFAR[name][0]
    target = directory / archive
    partial = target.with_suffix(".part")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        urllib.request.urlretrieve(CIFAR_URL + archive, partial)
        partial.rename(target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"{name} is not on this machine and could not be downloaded ({error}). Download "
            f"{CIFAR_URL}{archive} and put it in {directory} (or pass data_dir=DIR holding "
            f"it, or a prepared TFDS copy of {name})") from None
    return target


def load_cifar(name: str, data_dir: str | os.PathLike | None = None,
               download: bool = True) -> Splits:
    """CIFAR-10/100 from, in order: a prepared TFDS copy, the python archive in `data_dir`
    (or in Keras' cache ~/.keras/datasets when no data_dir is given), a download."""
    if name not in CIFAR:
        raise DataError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(CIFAR)}")
    directory = Path(data_dir).expanduser() if data_dir is not None else None
    if directory is not None and not directory.is_dir():
        raise DataError(f"data_dir={directory} is not a directory")
    tfds_splits = _read_tfds(name, directory)
    if tfds_splits is not None:
        return tfds_splits
    archive = (directory or KERAS_CACHE) / CIFAR[name][0]
    if not archive.is_file():
        if not download:
            raise DataError(f"{name} not found: expected {archive} or a prepared TFDS copy "
                            f"in {directory or '~/tensorflow_datasets'}")
        archive = download_cifar(name, directory or KERAS_CACHE)
    return read_cifar_archive(archive, name)


# --- image folders ---------------------------------------------------------------------------

# Tool folders that archivers and Python leave next to data; hidden (".*") ones are skipped too.
TOOL_FOLDERS = frozenset({"__MACOSX", "__pycache__"})
# Modes of one 16-bit channel; "I" (32-bit) holds 16-bit data too, e.g. a 16-bit PGM's.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


@functools.cache
def image_suffixes() -> frozenset[str]:
    """Every file name suffix of a format Pillow reads pixels from (.png, .jpg, .webp, .tif, ...).

    Stub formats (BUFR, GRIB, HDF5, WMF) are left out: Pillow only identifies those files and
    needs a decoder from outside to read them, so a stray data.h5 is not taken for an image.
    """
    Image.init()  # Registers every plugin's suffixes, not just those of the common formats.
    return frozenset(
        suffix for suffix, image_format in Image.registered_extensions().items()
        if image_format in Image.OPEN and not _is_stub(Image.OPEN[image_format][0]))


def _is_stub(factory) -> bool:
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


def _some(names) -> str:
    """A short list for a one-line message: the first five names, then how many more."""
    names = list(names)
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def _check_pixel_count(image: Image.Image) -> None:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that (and raises above): refuse
    the whole range, so a decompression bomb is not decoded into memory."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = image.width * image.height
    if limit is not None and pixels > limit:
        raise Image.DecompressionBombError(
            f"Image size ({pixels} pixels) exceeds limit of {limit} pixels, could be "
            f"decompression bomb DOS attack.")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits a channel. convert("RGB") clips 16-bit values to 255 (a white image);
    here they keep their high byte (value >> 8), as Pillow itself reads 16-bit RGB PNGs, so a
    16-bit gray image matches its RGB copy, and 8-bit values stored as v * 257 come back as v."""
    if image.mode not in (*SIXTEEN_BIT_MODES, "I"):
        return image.convert("RGB")
    pixels = np.asarray(image, np.int64)
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise ValueError(f"its 32-bit pixels span [{low}, {high}], outside 16 bits (0..65535); "
                         f"save it with 8 or 16 bits a channel")
    # "I" pixels that all fit 8 bits are 8-bit data (what convert("RGB") keeps as they are).
    if image.mode != "I" or high > 255:
        pixels = pixels >> 8
    return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """An opened image as the model's input: (size, size, 3) uint8 (load_folder's rules)."""
    _check_pixel_count(image)
    # A JPEG much larger than `size` is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, still
    # at least size x size): 4x faster from 224 to 32 px, and the resize below then averages
    # fewer pixels. Both loaders decode through here, so their pixels agree.
    image.draft(image.mode, (size, size))
    image = _to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, np.uint8)


def read_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """One image file as (size, size, 3) uint8, the way load_folder reads each of its files;
    a DataError naming the file when it cannot be read (or is a decompression bomb)."""
    return decode_image(path, size, name=path)


def decode_image(source, size: int, name) -> np.ndarray:
    """`source` (a path or a binary file object) decoded as read_image does; errors name
    `name`."""
    try:
        with Image.open(source) as image:
            return prepare_image(image, size)
    except Image.DecompressionBombError as error:
        # Pillow's own words name its limit (twice MAX_IMAGE_PIXELS) beside ours: one limit.
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise DataError(f"refusing image {name}: {pixels.group(1) if pixels else 'its'} "
                        f"pixels, more than PIL.Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})"
                        f" (a decompression bomb?); shrink it, or raise that limit in Python if "
                        f"you trust it") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot read image {name}: {error}") from None


def read_images(files, size: int) -> np.ndarray:
    """Every file decoded into one (N, size, size, 3) array, on a thread per core."""
    # Pillow's DecompressionBombWarning would repeat read_image's refusal of the same image.
    # The filters are global: set once here, not per (thread-unsafe) call of read_image.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            images = list(pool.map(lambda p: read_image(p, size), files))
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


def is_skipped_folder(name: str) -> bool:
    """Hidden (.ipynb_checkpoints) and tool (__MACOSX) folders hold no data set's images."""
    return name.startswith(".") or name in TOOL_FOLDERS


def is_image_file(path: Path) -> bool:
    """An image file by its name: hidden files are none (macOS' ._name.jpg resource forks
    are AppleDouble data)."""
    return (not path.name.startswith(".") and path.suffix.lower() in image_suffixes()
            and path.is_file())


def _class_folders(split_root: Path) -> dict[str, Path]:
    """train/'s or test/'s class folders by name, sorted; hidden and tool folders are none."""
    folders, seen = {}, {}
    for path in sorted(split_root.iterdir()):
        if is_skipped_folder(path.name) or not path.is_dir():
            continue
        target = path.resolve()  # A symlink to a folder elsewhere is a class like any other.
        if split_root.resolve().is_relative_to(target):
            raise DataError(f"{path} links to {target}, which contains it: a class folder "
                            f"cannot hold the data set itself; remove the link")
        if target in seen:
            raise DataError(f"{path} and {seen[target]} are the same folder ({target}): its "
                            f"images would have two labels; remove one of them")
        folders[path.name] = seen[target] = path
    return folders


def _list_images(folders: list[Path]) -> tuple[list[Path], list[int]]:
    """The image files of each class folder and their labels (the folder's index)."""
    files, labels = [], []
    for label, folder in enumerate(folders):
        entries = sorted(folder.iterdir())
        found = [p for p in entries if is_image_file(p)]
        if not found:
            held = f"it holds only {_some(p.name for p in entries)}" if entries else "it is empty"
            raise DataError(f"{folder} has no images ({held}); expected image files (.png, .jpg, "
                            f".webp, ... any format Pillow reads): add some or remove the folder")
        files += found
        labels += [label] * len(found)
    return files, labels


def _test_folders(test_root: Path, class_names: tuple[str, ...]) -> list[Path]:
    """test/'s class folders in train/'s class order; both must name the same classes."""
    folders = _class_folders(test_root)
    extra = sorted(set(folders) - set(class_names))
    missing = [name for name in class_names if name not in folders]
    if extra or missing:
        problems = ([f"has {_some(extra)}, which train/ lacks"] if extra else []) + (
            [f"lacks {_some(missing)}"] if missing else [])
        raise DataError(f"{test_root} {' and '.join(problems)}: test/ must hold the class "
                        f"folders of train/ ({_some(class_names)}); add or remove folders")
    return [folders[name] for name in class_names]


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """An image folder's files and labels, listed and checked, nothing decoded: `train` and
    `test` are (files, labels) in the folder's one fixed shuffled order; test is None
    without test/."""

    train: tuple[tuple[Path, ...], np.ndarray]
    test: tuple[tuple[Path, ...], np.ndarray] | None
    class_names: tuple[str, ...]


def _shuffled(files: list[Path], labels: list[int]) -> tuple[tuple[Path, ...], np.ndarray]:
    order = np.random.default_rng(FOLDER_SHUFFLE_SEED).permutation(len(files))
    return tuple(files[i] for i in order), np.array(labels, np.int32)[order]


def list_folder(data_dir: str | os.PathLike) -> FolderListing:
    """The files and labels load_folder reads (its rules, its errors), without reading them."""
    root = Path(data_dir).expanduser()
    train_root = root / "train"
    if not root.is_dir():
        raise DataError(f"data_dir={root} does not exist")
    if not train_root.is_dir():
        raise DataError(f"data_dir={root} must contain train/<class>/ folders of images")
    classes = _class_folders(train_root)
    if len(classes) < 2:
        found = f" ({_some(classes)})" if classes else ""
        raise DataError(f"{train_root} has {len(classes)} class folder(s){found}, expected at "
                        f"least two (train/<class>/<images>): one class has nothing to tell apart")
    class_names = tuple(classes)
    # Every folder is listed and checked before any image is decoded (that may take minutes).
    train = _shuffled(*_list_images(list(classes.values())))
    test_root, test = root / "test", None
    if test_root.is_dir():
        test = _shuffled(*_list_images(_test_folders(test_root, class_names)))
    return FolderListing(train, test, class_names)


def load_folder(data_dir: str | os.PathLike, input_size: int = 32) -> Splits:
    """The user's images: data_dir/train/<class>/<image files>, optionally data_dir/test/.

    - Classes are the sorted folder names of train/, at least two; folders named ".*",
      __MACOSX or __pycache__ are not classes. A class may be a symlink to a folder elsewhere,
      not to a folder that contains it (a loop) nor to another class's folder (a DataError).
    - Images are the files whose suffix is that of a format Pillow reads (image_suffixes(): .png,
      .jpg, .webp, .tif, .bmp, .gif, ...), except hidden ones (".*", e.g. macOS' ._a.jpg).
      Every class folder must hold at least one; other files are skipped.
    - test/, when there, must hold the same class folders as train/, each with images.
    - Images of another size are resized (bilinear) to input_size x input_size (a JPEG of
      twice that or more is first decoded at 1/2, 1/4 or 1/8 scale: Pillow's draft); grayscale,
      RGBA and palette images become RGB; 16-bit images keep their high byte (value >> 8).
      Images of more than PIL.Image.MAX_IMAGE_PIXELS pixels are refused (decompression bombs).
    - The examples come in one fixed shuffled order (FOLDER_SHUFFLE_SEED), not class by class.
    Any breach is a one-line DataError naming the folder or file.
    """
    listing = list_folder(data_dir)
    test = None if listing.test is None else Dataset(read_images(listing.test[0], input_size),
                                                     listing.test[1])
    return Splits(Dataset(read_images(listing.train[0], input_size), listing.train[1]), test,
                  listing.class_names)


def load(dataset: str, data_dir: str | os.PathLike | None = None, input_size: int = 32) -> Splits:
    """The data set named on the command line: "cifar100", "cifar10" or "folder"."""
    if dataset in CIFAR:
        return load_cifar(dataset, data_dir)
    if dataset == "folder":
        if data_dir is None:
            raise DataError("dataset=folder needs data_dir=PATH (PATH/train/<class>/*.jpg)")
        return load_folder(data_dir, input_size)
    raise DataError(f"unknown dataset {dataset!r}; expected one of cifar100, cifar10, folder")
