"""What a run tells people while it trains: log lines, a progress bar, TensorBoard events,
the run's figures and the versions it ran with. Process 0 only, on several hosts."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from vit_flax.config import ViTConfig
from vit_flax.inference import analysis as research
from vit_flax.infra.parallel import is_main_process
from vit_flax.infra.workdir import TENSORBOARD
from vit_flax.models import Model, augment
from vit_flax.models.seed_vit import patches
from vit_flax.training import plots
from vit_flax.training.steps import METRIC_NAMES, Totals

PACKAGES = ("vit_flax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


class EventLog:
    """TensorBoard event files (tensorboardX) in workdir/tensorboard, beside history.json:
    per epoch the train and validation metrics, the learning rate and the epoch time; per
    step (with log_every) the running training loss and accuracy. Process 0 only."""

    def __init__(self, workdir: Path, config: ViTConfig):
        self.config = config
        self.writer = None
        if is_main_process():
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / TENSORBOARD))

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        for name, value in row.items():
            if name != "epoch":
                split, metric = ("validation", name[4:]) if name.startswith("val_") \
                    else ("train", name)
                self.writer.add_scalar(f"{split}/{metric}", value, row["epoch"])
        self.writer.add_scalar("train/learning_rate", self.config.learning_rate, row["epoch"])
        self.writer.flush()

    def step(self, step: int, means: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"step/{name}", value, step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()
        return False


class Progress:
    """A tqdm bar with live loss and accuracy on a terminal; plain lines elsewhere."""

    def __init__(self, epoch: int, epochs: int, total_steps: int):
        self.bar = None
        if sys.stderr.isatty() and is_main_process():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc=f"Epoch {epoch}/{epochs}", leave=False,
                            dynamic_ncols=True)
        self.last_refresh = 0.0

    def update(self, done_steps: int, totals_so_far: Totals) -> None:
        if self.bar is None or not done_steps or time.monotonic() - self.last_refresh < 0.5:
            return
        # totals of an earlier step, already computed or nearly: reading them keeps the
        # device busy with the steps queued behind. A group's: over all its runs.
        means = pooled(totals_so_far).means()
        self.bar.n = done_steps
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", accuracy=f"{means['accuracy']:.4f}")
        self.last_refresh = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pooled(totals: Totals) -> Totals:
    """A group's stacked totals (a leading runs axis) summed over its runs; one run's as
    they are."""
    if not np.ndim(totals.count):
        return totals
    return Totals(sums={name: np.sum(value) for name, value in totals.sums.items()},
                  count=np.sum(totals.count), first_nonfinite_step=np.max(
                      totals.first_nonfinite_step))


def metrics_line(prefix: str, metrics: dict[str, float]) -> str:
    return " - ".join(f"{prefix}{name}: {value:.4f}" for name, value in metrics.items())


def epoch_line(row: dict, epochs: int) -> str:
    """Keras' epoch line: time, training metrics, and the validation metrics if any."""
    line = (f"Epoch {row['epoch']}/{epochs} - {row['epoch_seconds']:.1f}s - "
            + metrics_line("", {k: row[k] for k in METRIC_NAMES}))
    validation = {k: row[k] for k in row if k.startswith("val_")}
    line += " - " + metrics_line("", validation) if validation else ""
    # The share of the epoch spent waiting for batches: the loader, not the model, is slow
    # when it is large.
    return line + (f" - data wait: {row['data_wait']:.1%}" if "data_wait" in row else "")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def plot_history(history: list[dict], workdir: Path) -> None:
    """loss.png and top-5-accuracy.png, as the seed draws them (when there is validation)."""
    for item in ("loss", "top-5-accuracy"):
        if history and f"val_{item}" in history[0]:
            plots.plot_history(history, item, workdir / f"{item}.png")


def plot_patches(model: Model, image: np.ndarray, path: Path) -> None:
    """patches.png: one training image resized to image_size, and its patches."""
    config = model.config
    resized = augment.resize(jnp.asarray(image, jnp.float32)[None], config.image_size)
    plots.plot_patches(np.asarray(resized[0]), np.asarray(patches(resized, config.patch_size)[0]),
                       config.patch_size, path)


def plot_attention(model: Model, images: np.ndarray, path: Path) -> None:
    """attention.png: the attention rollout (research.attention_heatmaps) over `images`."""
    heatmaps = research.attention_heatmaps(model, jnp.asarray(images))
    plots.plot_attention(np.asarray(images), np.asarray(heatmaps), path)
