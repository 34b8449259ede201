"""The seed's figures: train vs validation curves, and one image cut into its patches.

Figures are drawn on `matplotlib.figure.Figure` with its own canvas, never through pyplot:
nothing here selects a backend or touches pyplot's global state, so importing vit_flax in a
notebook leaves its inline plots as they were. matplotlib is imported when a figure is
drawn, not with vit_flax (~0.4 s of every process's start: a process that draws nothing,
such as a worker or a prediction, never pays it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def new_figure(**options):
    """A matplotlib Figure with its own canvas (matplotlib imported on first use)."""
    from matplotlib.figure import Figure

    return Figure(**options)


def plot_history(history: list[dict], item: str, path: Path) -> None:
    """The seed's plot_history(item): item and val_item over the epochs."""
    epochs = [row["epoch"] for row in history]
    figure = new_figure()
    axes = figure.subplots()
    axes.plot(epochs, [row[item] for row in history], label=item)
    axes.plot(epochs, [row["val_" + item] for row in history], label="val_" + item)
    axes.set_xlabel("Epochs")
    axes.set_ylabel(item)
    axes.set_title(f"Train and Validation {item} Over Epochs", fontsize=14)
    axes.legend()
    axes.grid()
    figure.savefig(path)


def plot_patches(image: np.ndarray, patches: np.ndarray, patch_size: int, path: Path) -> None:
    """One resized image (left) and its patches laid out on the grid they came from (right)."""
    n = int(np.sqrt(len(patches)))
    figure = new_figure(figsize=(8, 4))
    figure.add_subplot(1, 2, 1).imshow(np.clip(image, 0, 255).astype(np.uint8))
    figure.axes[0].axis("off")
    grid = figure.add_gridspec(n, n, left=0.52, right=0.98, wspace=0.1, hspace=0.1)
    for i, patch in enumerate(patches):
        axes = figure.add_subplot(grid[i // n, i % n])
        axes.imshow(np.clip(patch.reshape(patch_size, patch_size, -1), 0, 255).astype(np.uint8))
        axes.axis("off")
    figure.savefig(path)


def plot_attention(images: np.ndarray, heatmaps: np.ndarray, path: Path) -> None:
    """One column per image: the image (top) and its attention heatmap over it (bottom), the
    heatmap stretched from its patch grid to the image's extent."""
    figure = new_figure(figsize=(2 * len(images), 4.2))
    axes = figure.subplots(2, len(images), squeeze=False)
    for column, (image, heatmap) in enumerate(zip(images, heatmaps, strict=True)):
        height, width = image.shape[:2]
        shown = np.clip(image, 0, 255).astype(np.uint8)
        axes[0, column].imshow(shown)
        axes[1, column].imshow(shown)
        axes[1, column].imshow(heatmap, cmap="inferno", alpha=0.6, interpolation="bilinear",
                               extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        for row in (0, 1):
            axes[row, column].axis("off")
    figure.suptitle("Attention rollout (bright: the patches the output drew on)")
    figure.savefig(path)
