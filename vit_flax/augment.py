"""Keras' image preprocessing layers as pure JAX functions (run inside the jitted step).

Each random layer is split in two: a ``sample_*`` function that draws the per-image parameters
with the distribution Keras 3 uses, and a deterministic transform of those parameters, so the
transform can be checked at fixed parameters and the draws checked as distributions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Keras' backend.epsilon(): the floor of the standard deviation in Normalization.
NORMALIZATION_EPSILON = 1e-7


def normalize(images: jax.Array, mean: jax.Array, variance: jax.Array) -> jax.Array:
    """keras.layers.Normalization: (x - mean) / max(sqrt(var), 1e-7), in float32."""
    images = images.astype(jnp.float32)
    return (images - mean) / jnp.maximum(jnp.sqrt(variance), NORMALIZATION_EPSILON)


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """keras.layers.Normalization.adapt: per-channel mean and population variance (float32).

    Keras takes np.mean / np.var in float64. Integer images are summed exactly in int64 here
    (chunked, so 50,000 images do not need a float64 copy), which agrees with that to float32
    rounding.
    """
    channels = images.shape[-1]
    flat = images.reshape(-1, channels)
    if not np.issubdtype(flat.dtype, np.integer):
        return (flat.mean(0, dtype=np.float64).astype(np.float32),
                flat.var(0, dtype=np.float64).astype(np.float32))
    total = np.zeros(channels, np.int64)
    total_sq = np.zeros(channels, np.int64)
    for start in range(0, len(flat), 1 << 20):
        chunk = flat[start:start + (1 << 20)].astype(np.int64)
        total += chunk.sum(0)
        total_sq += (chunk * chunk).sum(0)
    count = len(flat)
    mean = total / count
    variance = total_sq / count - mean * mean
    return mean.astype(np.float32), variance.astype(np.float32)


def resize(images: jax.Array, size: int) -> jax.Array:
    """keras.layers.Resizing(size, size): bilinear, half-pixel centres, no antialiasing."""
    batch, _, _, channels = images.shape
    return jax.image.resize(images, (batch, size, size, channels), "bilinear", antialias=False)


def sample_flips(key: jax.Array, batch: int) -> jax.Array:
    """RandomFlip("horizontal"): an image is flipped where u <= 0.5, u ~ U[0, 1)."""
    return jax.random.uniform(key, (batch,)) <= 0.5


def horizontal_flip(images: jax.Array, flips: jax.Array) -> jax.Array:
    """Mirror the width axis of the images whose entry of `flips` is True."""
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)


def sample_angles(key: jax.Array, batch: int, factor: float) -> jax.Array:
    """RandomRotation(factor): angles in degrees ~ U(-360 * factor, 360 * factor)."""
    return jax.random.uniform(key, (batch,), minval=-360.0 * factor, maxval=360.0 * factor)


def sample_zooms(key: jax.Array, batch: int, factor: float) -> tuple[jax.Array, jax.Array]:
    """RandomZoom(factor, factor): height and width zooms, independent, each ~ U(1-f, 1+f)."""
    height_key, width_key = jax.random.split(key)
    height = jax.random.uniform(height_key, (batch,), minval=1.0 - factor, maxval=1.0 + factor)
    width = jax.random.uniform(width_key, (batch,), minval=1.0 - factor, maxval=1.0 + factor)
    return height, width


def affine_transform(images: jax.Array, transforms: jax.Array) -> jax.Array:
    """Inverse-map each image through its transform [a0, a1, a2, b0, b1, b2].

    Output pixel (y, x) is read from the input at x_in = a0*x + a1*y + a2 and
    y_in = b0*x + b1*y + b2, bilinearly, with "reflect" (half-sample symmetric) borders:
    the convention of keras.ops.image.affine_transform, which both RandomRotation and
    RandomZoom call.
    """
    _, height, width, _ = images.shape
    y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")

    def one_image(image, t):
        x_in = t[0] * x + t[1] * y + t[2]
        y_in = t[3] * x + t[4] * y + t[5]
        sample = lambda channel: jax.scipy.ndimage.map_coordinates(  # noqa: E731
            channel, [y_in, x_in], order=1, mode="reflect")
        return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)

    return jax.vmap(one_image)(images, transforms)


def rotation_transforms(angles_degrees: jax.Array, height: int, width: int) -> jax.Array:
    """RandomRotation's matrices: rotate by the angles about the image centre."""
    theta = angles_degrees * (math.pi / 180.0)
    cx, cy = 0.5 * (width - 1), 0.5 * (height - 1)
    a0, a1 = jnp.cos(theta), -jnp.sin(theta)
    b0, b1 = jnp.sin(theta), jnp.cos(theta)
    a2 = cx - cx * a0 - cy * a1
    b2 = cy - cx * b0 - cy * b1
    return jnp.stack([a0, a1, a2, b0, b1, b2], axis=-1)


def zoom_transforms(height_zooms: jax.Array, width_zooms: jax.Array,
                    height: int, width: int) -> jax.Array:
    """RandomZoom's matrices: scale about the centre (zoom > 1 shrinks the content)."""
    zeros = jnp.zeros_like(width_zooms)
    x_offset = (width - 1.0) / 2.0 * (1.0 - width_zooms)
    y_offset = (height - 1.0) / 2.0 * (1.0 - height_zooms)
    return jnp.stack([width_zooms, zeros, x_offset, zeros, height_zooms, y_offset], axis=-1)


def rotate(images: jax.Array, angles_degrees: jax.Array) -> jax.Array:
    _, height, width, _ = images.shape
    return affine_transform(images, rotation_transforms(angles_degrees, height, width))


def zoom(images: jax.Array, height_zooms: jax.Array, width_zooms: jax.Array) -> jax.Array:
    _, height, width, _ = images.shape
    return affine_transform(images, zoom_transforms(height_zooms, width_zooms, height, width))


def random_augment(key: jax.Array, images: jax.Array, rotation_factor: float,
                   zoom_factor: float) -> jax.Array:
    """RandomFlip("horizontal") -> RandomRotation -> RandomZoom, in the seed's order."""
    batch = images.shape[0]
    flip_key, rotation_key, zoom_key = jax.random.split(key, 3)
    images = horizontal_flip(images, sample_flips(flip_key, batch))
    images = rotate(images, sample_angles(rotation_key, batch, rotation_factor))
    return zoom(images, *sample_zooms(zoom_key, batch, zoom_factor))
