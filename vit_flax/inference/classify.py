"""Classify images with a trained model: files, folders or globs in, top-k class names with
probabilities out (`classify`), and the class names a run saved (`class_names_of`).

Files are decoded and resized by `vit_flax.data.sources.read_image`, the function that read
the training images, so a photo reaches the model as its training data did. A file that
cannot be read gives a Prediction with `error` set (one line naming it) and the others go on.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import glob
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from vit_flax.data.sources import DataError, is_image_file, is_skipped_folder, read_image
from vit_flax.inference.predict import load, predict
from vit_flax.infra.workdir import RESULTS_FILE

DATA_FILE = "data.json"  # What a run was trained on, class names included (training loop).
FORMATS = ("table", "json", "csv")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's classes, most probable first; `error` (one line) when it was not read."""

    source: str  # The file's path, or "images[i]" for arrays.
    top: tuple[tuple[str, float], ...] = ()  # (class name, probability), at most top_k.
    error: str | None = None


# --- inputs ------------------------------------------------------------------------------------

def find_images(patterns) -> list[tuple[str, str | None]]:
    """(source, error) per image file that files, folders (searched recursively) and globs
    name, in the order given, folders and globs sorted. A name that finds no image is kept
    with its error, so it is reported, not skipped."""
    found = []
    for pattern in [patterns] if isinstance(patterns, str | os.PathLike) else patterns:
        if not isinstance(pattern, str | os.PathLike):
            raise ValueError(f"expected image files, folders or globs (str or path), or "
                             f"images in one array (N, H, W, C); got a {type(pattern).__name__} "
                             f"among the paths (np.stack arrays into one)")
        pattern = os.fspath(pattern)
        path = Path(pattern).expanduser()
        if path.is_dir():
            files = _folder_images(path)
            found += [(f, None) for f in files] or [
                (pattern, f"{pattern}: a folder with no image files (expected .png, .jpg, ... "
                          f"any format Pillow reads)")]
        elif glob.has_magic(pattern) and not path.exists():
            matches = glob.glob(os.path.expanduser(pattern), recursive=True)
            files = _once_each(sorted(f for f in matches if is_image_file(Path(f))))
            found += [(f, None) for f in files] or [(pattern, f"{pattern}: matches no image file")]
        else:
            found.append((pattern, None))  # A file: read_image says why if it cannot be read.
    return found


def _folder_images(folder: Path) -> list[str]:
    """The image files under `folder` at any depth, sorted. With training's rules for what
    is an image and which folders hold none (hidden and tool folders are skipped, symlinked
    folders followed); a folder reached twice (a link to an enclosing folder) is searched
    once, under its first name in sorted order."""
    files, seen = [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        folders[:] = sorted(f for f in folders if not is_skipped_folder(f))
        files += [os.path.join(root, name) for name in names if is_image_file(Path(root, name))]
    return sorted(files)


def _once_each(files: list[str]) -> list[str]:
    """`files` without the repeats of one file under other names (a glob's ** through a
    symlink to an enclosing folder finds it once per level)."""
    seen, kept = set(), []
    for file in files:
        real = os.path.realpath(file)
        if real not in seen:
            seen.add(real)
            kept.append(file)
    return kept


def _image_size(model) -> int:
    height, width, _ = model.config.input_shape
    if height != width:
        raise ValueError(f"classify reads square images; this model takes {height}x{width}: "
                         f"pass arrays of that shape instead of files")
    return height


def _decode(entries: list[tuple[str, str | None]], size: int):
    """(images, errors): the readable files' pixels, and each entry's error or None."""
    def read(entry):
        source, error = entry
        if error is not None:
            return None, error
        try:
            return read_image(source, size), None
        except DataError as failure:
            return None, str(failure)

    # As sources.read_images: Pillow's bomb warning would repeat read_image's refusal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            results = list(pool.map(read, entries))
    images = [image for image, _ in results if image is not None]
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, [error for _, error in results]


# --- classification ------------------------------------------------------------------------------

def _check_options(top_k, batch_size) -> None:
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def probabilities(model, logits: np.ndarray) -> np.ndarray:
    """Class probabilities of the model's outputs: a softmax of logits; a preset head whose
    activation is softmax or sigmoid already gives probabilities."""
    if getattr(model.config, "activation", None) in ("softmax", "sigmoid"):
        return np.asarray(logits, np.float64)
    shifted = np.asarray(logits, np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _top(probs: np.ndarray, names, top_k: int) -> tuple[tuple[str, float], ...]:
    order = np.argsort(-probs, kind="stable")[:top_k]
    return tuple((names[i], float(probs[i])) for i in order)


def classify(model, paths_or_images, class_names=None, top_k: int = 5,
             batch_size: int = 64) -> list[Prediction]:
    """Top-k (class name, probability) per image, most probable first.

    paths_or_images: raw images (N, H, W, C) as `vit_flax.predict` takes them, or image
    files, folders (searched recursively) and globs: a path or a list of them. Files are
    read, batch_size at a time, as the training images were (read_image at the model's
    input size). class_names: one per class (default "0".."N-1"). A file that cannot be read
    is a Prediction with `error` set; the others are classified.
    """
    _check_options(top_k, batch_size)
    num_classes = model.config.num_classes
    if num_classes is None:
        raise ValueError("this model is a backbone without a classifier head (no task.json): "
                         "nothing to classify; use a preset with a head, or fine-tune one")
    names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model of {num_classes} classes; "
                         f"pass one name per class")
    if hasattr(paths_or_images, "__array__"):  # numpy's, JAX's, ...
        probs = probabilities(model, predict(model, paths_or_images, batch_size))
        return [Prediction(f"images[{i}]", _top(p, names, top_k)) for i, p in enumerate(probs)]
    entries, size, predictions = find_images(paths_or_images), _image_size(model), []
    for start in range(0, len(entries), batch_size):
        chunk = entries[start:start + batch_size]
        images, errors = _decode(chunk, size)
        probs = iter(probabilities(model, predict(model, images, batch_size)) if len(images)
                     else ())
        predictions += [Prediction(source, error=error) if error is not None
                        else Prediction(source, _top(next(probs), names, top_k))
                        for (source, _), error in zip(chunk, errors, strict=True)]
    return predictions


# --- class names and models ----------------------------------------------------------------------

def class_names_of(workdir, num_classes: int) -> tuple[list[str], str | None]:
    """(names, note): a run's class names from its data.json, else results.json's
    "class_names"; else "0".."N-1" and a note saying so (runs from before names were kept)."""
    workdir = Path(workdir)
    for name in (DATA_FILE, RESULTS_FILE):
        try:
            names = json.loads((workdir / name).read_text()).get("class_names")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(names, list) and len(names) == num_classes:
            return [str(n) for n in names], None
    return [str(i) for i in range(num_classes)], (
        f"{workdir} records no class names ({DATA_FILE} or {RESULTS_FILE}'s class_names): "
        f"classes are named by their index 0..{num_classes - 1}")


def load_classifier(path) -> tuple[object, list[str], str | None]:
    """(model, class names, note) of a vit_flax workdir or a Keras Hub preset directory.
    A preset records no class names: its classes are named by index (ImageNet's for the
    ImageNet presets), and the note says so; so does it for a run that has not finished."""
    from vit_flax.weights.keras_hub import is_preset, load_preset  # Only presets need it.

    path = Path(path)
    if is_preset(path):
        model, config = load_preset(path)
        if config.num_classes is None:
            return model, [], None
        names = [str(i) for i in range(config.num_classes)]
        return model, names, (f"{path} is a Keras Hub preset, which records no class names: "
                              f"classes are named by index 0..{config.num_classes - 1} "
                              f"(ImageNet's class indices for the ImageNet presets)")
    model, config = load(path)
    names, note = class_names_of(path, config.num_classes)
    if not (path / RESULTS_FILE).is_file():  # Killed, stopped early, or still training.
        unfinished = (f"{path} has no {RESULTS_FILE}: its training did not run to its end "
                      f"(killed, stopped early, or still going); this is its best model so far")
        note = unfinished if note is None else f"{note}; {unfinished}"
    return model, names, note


# --- output ------------------------------------------------------------------------------------

def format_predictions(predictions: list[Prediction], fmt: str = "table") -> str:
    """The predictions as text: "table" (one line per image; errors left out, as the CLI
    prints them on stderr), "json" (a list of objects) or "csv" (one row per class)."""
    if fmt == "json":
        return json.dumps([{"image": p.source, "error": p.error,
                            "top": [{"class": c, "probability": q} for c, q in p.top]}
                           for p in predictions], indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "rank", "class", "probability", "error"])
        for p in predictions:
            rows = [[p.source, "", "", "", p.error]] if p.error else [
                [p.source, rank, c, f"{q:.6f}", ""] for rank, (c, q) in enumerate(p.top, 1)]
            writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    if fmt == "table":
        shown = [p for p in predictions if p.error is None]
        width = max((len(p.source) for p in shown), default=0)
        return "\n".join(f"{p.source:<{width}}  " + "  ".join(f"{c} {q:.3f}" for c, q in p.top)
                         for p in shown)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
