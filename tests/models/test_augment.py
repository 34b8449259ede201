"""vit_flax.models.augment against independent float64 numpy references of Keras 3's preprocessing.

The references follow /work/shared/keras-reference.md ("Preprocessing") and Keras' source
(random_rotation.py, random_zoom.py, backend/jax/image.py affine_transform): they share no code
with vit_flax. Random parameters are checked as distributions, transforms at fixed parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx
from scipy import stats

from vit_flax import ViTConfig
from vit_flax.models import augment
from vit_flax.models.seed_vit import DataAugmentation

# Every distribution test below uses this many draws and, for a correct sampler, fails with a
# probability of at most ~1e-6 per assertion (seeds are fixed, so a pass stays a pass).
DRAWS = 20_000
KS_ALPHA = 1e-6


# --------------------------------------------------------------------------------------------
# Independent float64 references.
# --------------------------------------------------------------------------------------------

def np_normalize(x, mean, variance):
    return (x.astype(np.float64) - mean) / np.maximum(np.sqrt(variance), 1e-7)


def np_resize_axis(image, axis, size):
    """Bilinear along one axis, half-pixel centres, clamped edges (no antialiasing)."""
    n = image.shape[axis]
    coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0.0, n - 1)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, n - 1)
    frac = coords - low
    shape = [1] * image.ndim
    shape[axis] = size
    frac = frac.reshape(shape)
    return (np.take(image, low, axis) * (1 - frac) + np.take(image, high, axis) * frac)


def np_resize(images, size):
    return np_resize_axis(np_resize_axis(images.astype(np.float64), 1, size), 2, size)


def np_reflect(index, n):
    """Half-sample symmetric: ... d c b a | a b c d | d c b a ..."""
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def np_affine(image, t):
    """Output (y, x) reads the input bilinearly at x_in = a0 x + a1 y + a2,
    y_in = b0 x + b1 y + b2; pixel centres at integers; "reflect" borders. image: (H, W, C)."""
    image = image.astype(np.float64)
    height, width, _ = image.shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    x_in = t[0] * x + t[1] * y + t[2]
    y_in = t[3] * x + t[4] * y + t[5]
    y0, x0 = np.floor(y_in), np.floor(x_in)
    fy, fx = (y_in - y0)[..., None], (x_in - x0)[..., None]
    y0, x0 = y0.astype(int), x0.astype(int)
    out = np.zeros_like(image)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            out += wy * wx * image[np_reflect(y0 + dy, height), np_reflect(x0 + dx, width)]
    return out


def np_rotation(degrees, height, width):
    theta = np.deg2rad(degrees)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    a0, a1, b0, b1 = np.cos(theta), -np.sin(theta), np.sin(theta), np.cos(theta)
    return np.array([a0, a1, cx - cx * a0 - cy * a1, b0, b1, cy - cx * b0 - cy * b1])


def np_zoom(height_zoom, width_zoom, height, width):
    return np.array([width_zoom, 0.0, (width - 1) / 2 * (1 - width_zoom),
                     0.0, height_zoom, (height - 1) / 2 * (1 - height_zoom)])


def float_images(batch, height=9, width=11, seed=0):
    return np.random.default_rng(seed).random((batch, height, width, 3), dtype=np.float32)


# Tolerance of the float32 samplers against the float64 references, for pixel values in [0, 1):
# float32 coordinates (cos/sin and the centre offsets, magnitudes <= ~15) carry absolute errors
# of a few 1e-6; times a pixel-to-pixel difference of at most 1 that is a few 1e-6 in value,
# plus ~1e-7 from the float32 interpolation weights. 2e-5 leaves a margin of a few, while a
# wrong convention (swapped axes, other border mode, other centre) is off by ~1e-1.
SAMPLER_TOL = 2e-5


# --------------------------------------------------------------------------------------------
# Normalization and Resizing.
# --------------------------------------------------------------------------------------------

def test_normalize_matches_numpy_and_accepts_uint8_and_float32():
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mean = np.array([125.3, 122.9, 113.8], np.float32)
    variance = np.array([3960.0, 3870.5, 4380.2], np.float32)
    from_uint8 = np.asarray(augment.normalize(jnp.asarray(images), mean, variance))
    from_float = np.asarray(augment.normalize(jnp.asarray(images, jnp.float32), mean, variance))
    assert from_uint8.dtype == np.float32
    np.testing.assert_array_equal(from_uint8, from_float)  # uint8 -> float32 is exact
    # Outputs are within +-3; a few float32 roundings of that: ~1e-6.
    np.testing.assert_allclose(from_uint8, np_normalize(images, mean, variance), rtol=0,
                               atol=2e-6)


def test_normalize_floors_the_standard_deviation_at_1e_7():
    images = np.random.default_rng(2).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean = np.array([100.0, 0.0, 50.0], np.float32)
    variance = np.array([0.0, 1.0, 4.0], np.float32)
    out = np.asarray(augment.normalize(jnp.asarray(images), mean, variance))
    # Channel 0: (x - 100) / 1e-7, up to ~1.6e9; float32 relative rounding ~1e-7 per op.
    np.testing.assert_allclose(out[..., 0], (images[..., 0] - 100.0) / 1e-7, rtol=1e-6)
    np.testing.assert_allclose(out, np_normalize(images, mean, variance), rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(out))


def test_resize_is_half_pixel_bilinear_without_antialiasing():
    images = np.random.default_rng(3).random((2, 32, 32, 3), dtype=np.float32)
    out = np.asarray(augment.resize(jnp.asarray(images), 72))
    assert out.shape == (2, 72, 72, 3)
    # jax computes the sample positions (o + 0.5) * 32/72 - 0.5 and the weights in float32:
    # position errors of ~32 * 2^-24 * a few, times neighbour differences < 1 for values in
    # [0, 1), give ~1e-6 (measured 1.2e-6); 1e-5 leaves a margin. An align-corners or nearest
    # resize differs by ~1e-1.
    np.testing.assert_allclose(out, np_resize(images, 72), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Flip, rotation, zoom, affine transform at fixed parameters.
# --------------------------------------------------------------------------------------------

def test_horizontal_flip_mirrors_exactly_the_flagged_images():
    images = float_images(4)
    flips = np.array([True, False, False, True])
    out = np.asarray(augment.horizontal_flip(jnp.asarray(images), jnp.asarray(flips)))
    np.testing.assert_array_equal(out[flips], images[flips][:, :, ::-1, :])
    np.testing.assert_array_equal(out[~flips], images[~flips])


def test_affine_transform_convention_with_a_general_matrix():
    # Shear, anisotropic scale and translation: distinguishes a0/a1/b0/b1 and a2/b2 roles.
    images = float_images(2, seed=4)
    transforms = np.array([[0.9, 0.2, 0.7, -0.15, 1.1, -0.4],
                           [1.3, -0.25, -1.5, 0.3, 0.8, 2.2]])
    out = np.asarray(augment.affine_transform(jnp.asarray(images),
                                              jnp.asarray(transforms, jnp.float32)))
    for image, t, got in zip(images, transforms, out, strict=True):
        np.testing.assert_allclose(got, np_affine(image, t), rtol=0, atol=SAMPLER_TOL)


def test_rotate_matches_the_numpy_sampler():
    images = float_images(4, seed=5)
    angles = np.array([-7.2, 3.3, 45.0, -120.0])
    out = np.asarray(augment.rotate(jnp.asarray(images), jnp.asarray(angles, jnp.float32)))
    for image, angle, got in zip(images, angles, out, strict=True):
        expected = np_affine(image, np_rotation(angle, 9, 11))
        np.testing.assert_allclose(got, expected, rtol=0, atol=SAMPLER_TOL)


def test_zoom_matches_the_numpy_sampler():
    images = float_images(3, seed=6)
    height_zooms = np.array([0.8, 1.15, 1.2])
    width_zooms = np.array([1.2, 0.85, 0.8])
    out = np.asarray(augment.zoom(jnp.asarray(images), jnp.asarray(height_zooms, jnp.float32),
                                  jnp.asarray(width_zooms, jnp.float32)))
    for image, zh, zw, got in zip(images, height_zooms, width_zooms, out, strict=True):
        expected = np_affine(image, np_zoom(zh, zw, 9, 11))
        np.testing.assert_allclose(got, expected, rtol=0, atol=SAMPLER_TOL)


def test_plus_90_degrees_follows_the_keras_convention():
    image = jnp.arange(9, dtype=jnp.float32).reshape(1, 3, 3, 1)
    out = np.asarray(augment.rotate(image, jnp.array([90.0])))[0, ..., 0]
    # cos(pi/2) in float32 is -4.4e-8, not 0: the sampled coordinates are off by ~1e-7, which
    # moves values of magnitude <= 8 by ~1e-6.
    np.testing.assert_allclose(out, [[2, 5, 8], [1, 4, 7], [0, 3, 6]], rtol=0, atol=1e-5)


def test_angle_zero_and_zoom_one_are_exact_identities():
    images = jnp.asarray(float_images(2, seed=7))
    np.testing.assert_array_equal(augment.rotate(images, jnp.zeros(2)), images)
    np.testing.assert_array_equal(augment.zoom(images, jnp.ones(2), jnp.ones(2)), images)


# --------------------------------------------------------------------------------------------
# Distributions of the random parameters.
# --------------------------------------------------------------------------------------------

def assert_uniform(draws, low, high):
    draws = np.asarray(draws, np.float64)
    assert draws.shape == (DRAWS,)
    assert draws.min() >= low and draws.max() <= high
    # The extremes reach the ends: a draw within 0.1% of an end is missed by all 20,000 draws
    # with probability (1 - 1e-3)^20000 = 2e-9; this pins the range far tighter than KS.
    width = high - low
    assert draws.min() < low + 1e-3 * width and draws.max() > high - 1e-3 * width
    assert stats.kstest(draws, "uniform", args=(low, width)).pvalue > KS_ALPHA


def test_flips_are_fair_coins():
    flips = np.asarray(augment.sample_flips(jax.random.key(10), DRAWS))
    assert flips.dtype == np.bool_ and flips.shape == (DRAWS,)
    low, high = stats.binom.interval(1 - KS_ALPHA, DRAWS, 0.5)  # ~ 10,000 +- 350
    assert low <= flips.sum() <= high
    # Neighbouring images are flipped independently: P(both) = 1/4.
    both = np.sum(flips[:-1] & flips[1:])
    low, high = stats.binom.interval(1 - KS_ALPHA, DRAWS - 1, 0.25)
    assert low <= both <= high


def test_angles_are_uniform_within_plus_minus_7_2_degrees():
    assert_uniform(augment.sample_angles(jax.random.key(11), DRAWS, 0.02), -7.2, 7.2)


def test_zooms_are_independent_uniforms():
    height, width = augment.sample_zooms(jax.random.key(12), DRAWS, 0.2)
    assert_uniform(height, 0.8, 1.2)
    assert_uniform(width, 0.8, 1.2)
    # For independent draws the sample correlation is ~N(0, 1/20000): sd 0.0071, so |r| < 0.036
    # (5 sd) fails by chance with probability 6e-7. Equal or linked draws give |r| ~ 1.
    r = np.corrcoef(np.asarray(height), np.asarray(width))[0, 1]
    assert abs(r) < 0.036


# --------------------------------------------------------------------------------------------
# Composition and the model's DataAugmentation.
# --------------------------------------------------------------------------------------------

def test_random_augment_is_flip_then_rotate_then_zoom():
    images = float_images(8, seed=8)
    key = jax.random.key(13)
    out = np.asarray(augment.random_augment(key, jnp.asarray(images), 0.02, 0.2))
    # The function's own key splitting, then the parameters it must have drawn.
    flip_key, rotation_key, zoom_key = jax.random.split(key, 3)
    flips = np.asarray(augment.sample_flips(flip_key, 8))
    angles = np.asarray(augment.sample_angles(rotation_key, 8, 0.02), np.float64)
    zh, zw = (np.asarray(z, np.float64) for z in augment.sample_zooms(zoom_key, 8, 0.2))
    assert flips.any() and not flips.all()  # both branches of the flip are exercised

    def reference(image, flip, angle, height_zoom, width_zoom, order):
        steps = {"flip": lambda x: x[:, ::-1] if flip else x,
                 "rotate": lambda x: np_affine(x, np_rotation(angle, 9, 11)),
                 "zoom": lambda x: np_affine(x, np_zoom(height_zoom, width_zoom, 9, 11))}
        for step in order:
            image = steps[step](image)
        return image

    right = ("flip", "rotate", "zoom")
    for i in range(8):
        expected = reference(images[i], flips[i], angles[i], zh[i], zw[i], right)
        # Two float32 resamplings in a row: each within SAMPLER_TOL, errors add.
        np.testing.assert_allclose(out[i], expected, rtol=0, atol=2 * SAMPLER_TOL)
    # Discrimination: any other order is far outside that tolerance for some image.
    for order in (("flip", "zoom", "rotate"), ("rotate", "flip", "zoom")):
        wrong = np.stack([reference(images[i], flips[i], angles[i], zh[i], zw[i], order)
                          for i in range(8)])
        assert np.abs(out - wrong).max() > 100 * SAMPLER_TOL


@pytest.fixture
def data_augmentation():
    layer = DataAugmentation(ViTConfig(**TINY))
    layer.normalization.mean[...] = jnp.array([120.0, 110.0, 100.0])
    layer.normalization.variance[...] = jnp.array([3600.0, 2500.0, 4900.0])
    return layer


def test_data_augmentation_at_inference_is_normalize_then_resize(data_augmentation):
    images = np.random.default_rng(9).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    first = np.asarray(data_augmentation(jnp.asarray(images), train=False, rngs=None))
    second = np.asarray(data_augmentation(jnp.asarray(images), train=False, rngs=None))
    assert first.shape == (4, 12, 12, 3)
    np.testing.assert_array_equal(first, second)
    expected = augment.resize(augment.normalize(jnp.asarray(images),
                                                jnp.array([120.0, 110.0, 100.0]),
                                                jnp.array([3600.0, 2500.0, 4900.0])), 12)
    np.testing.assert_array_equal(first, np.asarray(expected))
    # And the float64 reference of both steps: outputs within ~+-2.2, float32 rounding ~1e-6.
    reference = np_resize(np_normalize(images, np.array([120.0, 110.0, 100.0]),
                                       np.array([3600.0, 2500.0, 4900.0])), 12)
    np.testing.assert_allclose(first, reference, rtol=0, atol=1e-5)


def test_data_augmentation_in_training_is_random(data_augmentation):
    images = jnp.asarray(np.random.default_rng(10).integers(0, 256, (4, 8, 8, 3), np.uint8))
    inference = np.asarray(data_augmentation(images, train=False, rngs=None))
    a = np.asarray(data_augmentation(images, train=True, rngs=nnx.Rngs(augment=0)))
    a_again = np.asarray(data_augmentation(images, train=True, rngs=nnx.Rngs(augment=0)))
    b = np.asarray(data_augmentation(images, train=True, rngs=nnx.Rngs(augment=1)))
    assert a.shape == b.shape == (4, 12, 12, 3)
    np.testing.assert_array_equal(a, a_again)  # same seed, same draws
    # Different keys: different flips/angles/zooms on normalized values of order 1.
    assert np.abs(a - b).max() > 0.1
    assert np.abs(a - inference).max() > 0.1
