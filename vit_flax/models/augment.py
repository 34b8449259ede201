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


# --- the strong recipe's augmentations (ViTConfig fields; all off in the seed's recipe) ----

def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Zero-pad each side by `padding` pixels, then crop a random window of the original
    size from each image (offsets uniform in [0, 2 * padding], each image its own): the
    standard CIFAR crop."""
    batch, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (batch, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                     (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def random_erasing(key: jax.Array, images: jax.Array, probability: float,
                   area: tuple[float, float] = (0.02, 1 / 3),
                   aspect: tuple[float, float] = (0.3, 3.3)) -> jax.Array:
    """Random erasing (Zhong et al. 2020, timm's "pixel" mode): with `probability`, a
    rectangle of each (normalized) image, of area fraction ~ U(area) and aspect ratio
    log-uniform in `aspect`, is replaced by N(0, 1) noise."""
    batch, height, width, _ = images.shape
    apply_key, area_key, aspect_key, place_key, noise_key = jax.random.split(key, 5)
    apply = jax.random.uniform(apply_key, (batch,)) < probability
    fraction = jax.random.uniform(area_key, (batch,), minval=area[0], maxval=area[1])
    ratio = jnp.exp(jax.random.uniform(aspect_key, (batch,), minval=math.log(aspect[0]),
                                       maxval=math.log(aspect[1])))
    h = jnp.clip(jnp.round(jnp.sqrt(fraction * ratio * height * width)), 1, height)
    w = jnp.clip(jnp.round(jnp.sqrt(fraction / ratio * height * width)), 1, width)
    top = jnp.floor(jax.random.uniform(place_key, (batch,)) * (height - h + 1))
    left = jnp.floor(jax.random.uniform(jax.random.fold_in(place_key, 1), (batch,))
                     * (width - w + 1))
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
    erase = (inside & apply[:, None, None])[..., None]
    return jnp.where(erase, jax.random.normal(noise_key, images.shape, images.dtype), images)


def _blend(image, other, factor):
    return jnp.clip(other + factor * (image - other), 0.0, 255.0)


def _grayscale(image):
    return (image @ jnp.array([0.299, 0.587, 0.114], image.dtype))[..., None]


def _smoothed(image):
    """PIL's SMOOTH kernel ([[1,1,1],[1,5,1],[1,1,1]] / 13), borders kept as they are."""
    kernel = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    blurred = jax.vmap(lambda c: jax.scipy.signal.convolve2d(c, kernel, mode="same"),
                       in_axes=-1, out_axes=-1)(image)
    interior = jnp.zeros(image.shape[:2], bool).at[1:-1, 1:-1].set(True)[..., None]
    return jnp.where(interior, blurred, image)


def _affine(image, t):
    return affine_transform(image[None], t[None])[0]


def _rotation(image, degrees):
    height, width, _ = image.shape
    return _affine(image, rotation_transforms(degrees, height, width))


def _shear(image, amount, axis):
    # Inverse map: x_in = x + s * y (shear along x), or y_in = y + s * x (along y).
    zero, one = jnp.zeros_like(amount), jnp.ones_like(amount)
    if axis == "x":
        t = jnp.stack([one, amount, zero, zero, one, zero])
    else:
        t = jnp.stack([one, zero, zero, amount, one, zero])
    return _affine(image, t)


def _translate(image, fraction, axis):
    size = image.shape[1] if axis == "x" else image.shape[0]
    zero, one, shift = jnp.zeros_like(fraction), jnp.ones_like(fraction), fraction * size
    if axis == "x":
        t = jnp.stack([one, zero, shift, zero, one, zero])
    else:
        t = jnp.stack([one, zero, zero, zero, one, shift])
    return _affine(image, t)


def _autocontrast(image, _):
    low = image.min(axis=(0, 1), keepdims=True)
    high = image.max(axis=(0, 1), keepdims=True)
    scale = jnp.where(high > low, 255.0 / jnp.maximum(high - low, 1e-6), 1.0)
    return jnp.where(high > low, (image - low) * scale, image)


# RandAugment's operations on one float image in [0, 255], each given a signed magnitude
# s in [-1, 1] (the magnitude / 10 with a random sign). Ranges as timm's rand-m*-n*.
RAND_AUGMENT_OPS = (
    ("identity", lambda x, s: x),
    ("autocontrast", _autocontrast),
    ("brightness", lambda x, s: _blend(x, jnp.zeros_like(x), 1.0 + 0.9 * s)),
    ("color", lambda x, s: _blend(x, _grayscale(x), 1.0 + 0.9 * s)),
    ("contrast", lambda x, s: _blend(x, jnp.mean(_grayscale(x)), 1.0 + 0.9 * s)),
    ("sharpness", lambda x, s: _blend(x, _smoothed(x), 1.0 + 0.9 * s)),
    ("posterize", lambda x, s: jnp.floor(x / 2.0 ** jnp.round(4 * jnp.abs(s)))
     * 2.0 ** jnp.round(4 * jnp.abs(s))),
    ("solarize", lambda x, s: jnp.where(x >= 256.0 * (1.0 - jnp.abs(s)), 255.0 - x, x)),
    ("rotate", lambda x, s: _rotation(x, 30.0 * s)),
    ("shear_x", lambda x, s: _shear(x, 0.3 * s, "x")),
    ("shear_y", lambda x, s: _shear(x, 0.3 * s, "y")),
    ("translate_x", lambda x, s: _translate(x, 0.45 * s, "x")),
    ("translate_y", lambda x, s: _translate(x, 0.45 * s, "y")),
)


def rand_augment(key: jax.Array, images: jax.Array, num_ops: int,
                 magnitude: float) -> jax.Array:
    """RandAugment (Cubuk et al. 2020): `num_ops` operations drawn uniformly for each
    image, each at `magnitude` (0..10) with a random sign, on float pixels in [0, 255].
    Geometric operations sample with reflected borders (as the seed's rotation)."""
    branches = [op for _, op in RAND_AUGMENT_OPS]

    def one_image(image_key, image):
        for slot in range(num_ops):
            op_key, sign_key = jax.random.split(jax.random.fold_in(image_key, slot))
            op = jax.random.randint(op_key, (), 0, len(branches))
            sign = jnp.where(jax.random.bernoulli(sign_key), 1.0, -1.0)
            image = jnp.clip(jax.lax.switch(op, branches, image, sign * magnitude / 10.0),
                             0.0, 255.0)
        return image

    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(one_image)(keys, images.astype(jnp.float32))


def sample_mixing(key: jax.Array, height: int, width: int, mixup_alpha: float,
                  cutmix_alpha: float) -> tuple[jax.Array, jax.Array]:
    """One mixing of a batch with its reverse (timm's Mixup, mode "batch"): mixup with
    lambda ~ Beta(a, a), or cutmix with a box of area 1 - lambda, each half of the time
    when both are on. Returns (per-pixel weight of the image itself (1, H, W, 1), the
    label weight lambda: the exact kept area for cutmix)."""
    choose_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 4)
    use_cutmix = jnp.asarray(cutmix_alpha > 0 and mixup_alpha == 0)
    if cutmix_alpha > 0 and mixup_alpha > 0:
        use_cutmix = jax.random.bernoulli(choose_key)
    mixup_lambda = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha) \
        if mixup_alpha > 0 else jnp.float32(1.0)
    cut = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 \
        else jnp.float32(1.0)
    cut_h, cut_w = jnp.round(height * jnp.sqrt(1 - cut)), jnp.round(width * jnp.sqrt(1 - cut))
    centre = jax.random.uniform(box_key, (2,)) * jnp.array([height, width])
    top, bottom = jnp.clip(centre[0] - cut_h / 2, 0, height), jnp.clip(centre[0] + cut_h / 2,
                                                                       0, height)
    left, right = jnp.clip(centre[1] - cut_w / 2, 0, width), jnp.clip(centre[1] + cut_w / 2,
                                                                      0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = (rows >= jnp.round(top)) & (rows < jnp.round(bottom)) & \
        (cols >= jnp.round(left)) & (cols < jnp.round(right))
    cutmix_weight = jnp.where(box, 0.0, 1.0)[None, :, :, None]
    kept = cutmix_weight.mean()
    weight = jnp.where(use_cutmix, cutmix_weight, mixup_lambda)
    return jnp.broadcast_to(weight, (1, height, width, 1)), jnp.where(use_cutmix, kept,
                                                                      mixup_lambda)
