"""Inference for research code: `predict(model, images)` and `load(workdir)`."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vit_flax.config import ViTConfig
from vit_flax.model import ViT

BEST_CHECKPOINT = "best_checkpoint"  # Inside a train.py workdir: the best-by-val_accuracy model.
CONFIG_FILE = "config.json"


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, images):
    return nnx.merge(graphdef, state)(images, train=False)


def predict(model: ViT, images, batch_size: int = 256) -> np.ndarray:
    """Logits (N, num_classes) for raw images (N, H, W, C), uint8 or float, in inference mode.

    Runs in batches of `batch_size` (the last one padded, so one compiled shape serves all).
    """
    images = np.asarray(images)
    config = model.config
    expected = config.input_shape
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"predict expects images of shape (N, {', '.join(map(str, expected))}),"
                         f" got {images.shape}")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise ValueError(f"predict expects uint8 or float images, got {images.dtype}")
    graphdef, state = nnx.split(model)
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded = np.zeros((batch_size, *expected), chunk.dtype)
        padded[:len(chunk)] = chunk
        outputs.append(np.asarray(_logits(graphdef, state, jnp.asarray(padded)))[:len(chunk)])
    if not outputs:
        return np.zeros((0, config.num_classes), np.float32)
    return np.concatenate(outputs)


def save_model(directory: str | os.PathLike, model: ViT) -> None:
    """Write the model's weights and normalization statistics (orbax; replaces `directory`)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(directory).absolute(), nnx.state(model), force=True)


def restore_model(directory: str | os.PathLike, config: ViTConfig) -> ViT:
    """A ViT of `config` with the weights saved by `save_model` in `directory`."""
    abstract = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(Path(directory).absolute(), abstract_state)
    return nnx.merge(graphdef, state)


def load(workdir: str | os.PathLike) -> tuple[ViT, ViTConfig]:
    """The best model of a `train.py --workdir` run, and its configuration."""
    workdir = Path(workdir)
    config_path = workdir / CONFIG_FILE
    if not config_path.is_file() or not (workdir / BEST_CHECKPOINT).is_dir():
        raise FileNotFoundError(f"{workdir} holds no finished train.py checkpoint (expected "
                                f"{CONFIG_FILE} and {BEST_CHECKPOINT}/)")
    config = ViTConfig.from_json(config_path.read_text())
    return restore_model(workdir / BEST_CHECKPOINT, config), config
