"""Inference for research code: `predict(model, images)` and `load(workdir)`."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.infra.checkpoints import restore_model
from vit_flax.infra.workdir import (
    BEST_CHECKPOINT,
    BEST_CHECKPOINT_SWAP,
    CONFIG_FILE,
    GROUP_MARKER,
    GROUP_RUNS,
)
from vit_flax.models import Model


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, images):
    """The model's inference pass as a pure function of (graphdef, state, images).

    The state goes in as an argument, not a closure: the blocks' nnx.remat refuses to update
    Variables created outside the trace (flax TraceContextError), which also bars tracing a
    plain `lambda x: model(x)` for export."""
    return nnx.merge(graphdef, state)(images, train=False)


def _check_inputs(model: Model, images: np.ndarray, batch_size) -> None:
    """ValueErrors for inputs that would give wrong logits rather than an error."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or (
            batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_images(model, images, "predict")


def check_images(model: Model, images, caller: str) -> None:
    """ValueErrors, in `caller`'s name, for images that would give wrong outputs rather than
    an error: another shape than the model's, a dtype but uint8 or float, and (when their
    values are known: not inside a jit) NaN or inf, or floats in [0, 1] for a model whose
    Normalization was adapted on 0..255 pixels."""
    expected = model.config.input_shape
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"{caller} expects images of shape (N, {', '.join(map(str, expected))}),"
                         f" got {images.shape}")
    if not (images.dtype == np.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
        raise ValueError(f"{caller} expects uint8 or float images, got {images.dtype}")
    if images.dtype == np.uint8 or not images.size or isinstance(images, jax.core.Tracer):
        return
    images = np.asarray(images)
    if not np.isfinite(images).all():
        raise ValueError(f"{caller} got {int((~np.isfinite(images)).sum())} non-finite pixel "
                         f"values (NaN or inf); pass finite pixels")
    # Normalization subtracts the mean of the images it was adapted on: pixels in [0, 1] for
    # a model adapted on 0..255 pixels are all "black" to it, and the logits are garbage.
    # (A model without the seed's Normalization, e.g. vit_flax.models.hub_vit.ViTHub, scales its
    # input by its preset's converter: no adapted statistics to check against.) All-black
    # images (all 0) are the same on either scale.
    if not hasattr(model, "data_augmentation"):
        return
    mean = model.data_augmentation.normalization.mean[...]
    if isinstance(mean, jax.core.Tracer):  # The model's arrays traced (a jit over them).
        return
    mean = np.asarray(mean)
    if 0 < images.max() <= 1.0 and mean.max() > 1.0:
        raise ValueError(
            f"{caller} got float images in [{images.min():g}, {images.max():g}], but this model "
            f"was adapted on pixels in 0..255 (channel means {np.round(mean, 1).tolist()}); "
            f"pass raw pixels: uint8, or floats in 0..255 (e.g. images * 255)")


DEFAULT_BATCH_SIZE = 256


def predict(model: Model, images, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Logits (N, num_classes) for raw images (N, H, W, C), uint8 or float, in inference mode.

    Pixels are on the scale the model's Normalization was adapted on (0..255 for train.py's
    models): float images in [0, 1] for a model adapted on 0..255 are a ValueError, as are
    NaN or infinite pixels and a batch_size that is not a positive integer.
    Runs in batches of `batch_size` (the last one padded, so one compiled shape serves all);
    a batch_size above both the number of images and the default 256 is cut to the larger
    of the two (nothing is allocated for more; the default's program, and so its float32
    results to the last bit, stay what they were).
    """
    images = np.asarray(images)
    _check_inputs(model, images, batch_size)
    batch_size = min(int(batch_size), max(len(images), DEFAULT_BATCH_SIZE))
    config = model.config
    graphdef, state = nnx.split(model)
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded = np.zeros((batch_size, *config.input_shape), chunk.dtype)
        padded[:len(chunk)] = chunk
        outputs.append(np.asarray(forward(graphdef, state, jnp.asarray(padded)))[:len(chunk)])
    if not outputs:
        return np.zeros((0, config.num_classes), np.float32)
    return np.concatenate(outputs)


def load(workdir: str | os.PathLike) -> tuple[Model, ViTConfig]:
    """The best model of a `train.py --workdir` run, and its configuration."""
    workdir = Path(workdir)
    config_path = workdir / CONFIG_FILE
    # A kill between the two renames of checkpoints.save_model leaves only a swap copy.
    copies = (BEST_CHECKPOINT, *BEST_CHECKPOINT_SWAP)
    if (workdir / GROUP_MARKER).is_file():
        runs = sorted(path.name for path in (workdir / GROUP_RUNS).glob("*") if path.is_dir())
        raise FileNotFoundError(f"{workdir} is a group of runs (train.py --seeds or a grid), "
                                f"not one run: give one of its runs, e.g. "
                                f"{workdir / GROUP_RUNS / (runs[0] if runs else 'NAME')}")
    if not config_path.is_file() or not any((workdir / name).is_dir() for name in copies):
        raise FileNotFoundError(f"{workdir} holds no finished train.py checkpoint (expected "
                                f"{CONFIG_FILE} and {BEST_CHECKPOINT}/)")
    try:
        config = ViTConfig.from_json(config_path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{config_path}: not a vit_flax config.json (not UTF-8 text)") from None
    except ConfigError as error:
        raise ConfigError(f"{config_path}: {error}") from None
    return restore_model(workdir / BEST_CHECKPOINT, config), config
