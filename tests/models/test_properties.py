"""Property tests (hypothesis) of vit_flax.models.augment's transforms and vit_flax.data.sources's
splitting, shuffling and batching.

Shapes are drawn from a few fixed ones and every transform is jitted once, so each function
compiles at most once per shape and the file stays fast.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vit_flax.data.sources import DataError, Dataset, batch_indices, epoch_order, validation_split
from vit_flax.models import augment

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one float32 rounding is at most EPS32 / 2.

# (batch, height, width, channels): height != width and odd/even sizes, so a transposed or
# off-by-one centre shows; (1, 2, 2, 1) is the smallest image the reflect border allows.
SHAPES = [(1, 2, 2, 1), (2, 5, 7, 3), (3, 9, 4, 2)]
SQUARE_SHAPES = [(1, 2, 2, 1), (2, 5, 5, 3), (1, 8, 8, 2)]

flip_jit = jax.jit(augment.horizontal_flip)
rotate_jit = jax.jit(augment.rotate)
zoom_jit = jax.jit(augment.zoom)
affine_jit = jax.jit(augment.affine_transform)
normalize_jit = jax.jit(augment.normalize)
resize_jit = jax.jit(augment.resize, static_argnums=1)


def pixel_values(low: float, high: float, subnormal: bool = False):
    # XLA on CPU flushes subnormals to zero in arithmetic (1.0 * 1e-40 -> 0), which is a
    # property of the platform, not of the transforms: the interpolating tests leave them out.
    return st.floats(low, high, width=32, allow_nan=False, allow_infinity=False,
                     allow_subnormal=subnormal)


@st.composite
def images(draw, shapes=SHAPES, subnormal=False):
    shape = draw(st.sampled_from(shapes))
    low, high = draw(st.sampled_from([(-10.0, 10.0), (0.0, 255.0)]))
    return draw(hnp.arrays(np.float32, shape, elements=pixel_values(low, high, subnormal)))


def per_image(values, batch):
    return hnp.arrays(np.float32, (batch,), elements=values)


angles = st.floats(-180.0, 180.0, width=32)
zooms = st.floats(0.5, 1.5, width=32)


def assert_within_input_range(out, x):
    """Bilinear interpolation with reflect borders reads only input pixels and weights them
    by w >= 0 with sum(w) == 1 up to float32 rounding (a handful of roundings, each <= EPS32
    relative to max|x|), so every output lies in [min(x), max(x)]. 1e-5 * max(1, max|x|) is
    ~80 EPS32: far above that rounding, far below a wrong result (constant/zero fill, a
    cubic overshoot, unnormalised weights, which all miss by O(max|x|))."""
    out = np.asarray(out)
    slack = 1e-5 * max(1.0, float(np.abs(x).max()))
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= x.min() - slack, (out.min(), x.min())
    assert out.max() <= x.max() + slack, (out.max(), x.max())


# --------------------------------------------------------------------------------------------
# 1. horizontal_flip
# --------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.data())
def test_horizontal_flip_twice_is_bitwise_identity_and_once_mirrors_the_flagged(data):
    # Subnormals, -0.0 included: a flip only moves values, so it must keep every bit.
    x = data.draw(images(subnormal=True))
    flags = data.draw(hnp.arrays(np.bool_, (x.shape[0],)))
    once = np.asarray(flip_jit(x, flags))
    twice = np.asarray(flip_jit(once, flags))
    # Exact (bit patterns compared): moving values twice along the same axis restores them.
    np.testing.assert_array_equal(twice.view(np.uint32), x.view(np.uint32))
    # Twice-is-identity also holds for a flip of the wrong axis or of no image at all, so also
    # check one flip against numpy: width (axis 2) mirrored exactly where the flag is True.
    expected = np.where(flags[:, None, None, None], x[:, :, ::-1, :], x)
    np.testing.assert_array_equal(once.view(np.uint32), expected.view(np.uint32))


# --------------------------------------------------------------------------------------------
# 2. Exact identities
# --------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(images())
def test_rotate_by_zero_and_zoom_by_one_are_exact_identities(x):
    # Exact: at angle 0 and zoom 1 every sampling point is an integer pixel centre
    # (cos 0 = 1, sin 0 = 0 and the centre offsets cancel exactly), so bilinear weights are
    # exactly 1 and 0, and v * 1 + w * 0 == v in float32. Compared by value (==), not by bit
    # pattern: the weighted sum turns -0.0 into +0.0 (IEEE: -0.0 + +0.0 = +0.0), and XLA on
    # CPU flushes subnormals, which images() leaves out. horizontal_flip above is bitwise.
    batch = x.shape[0]
    rotated = np.asarray(rotate_jit(x, np.zeros(batch, np.float32)))
    zoomed = np.asarray(zoom_jit(x, np.ones(batch, np.float32), np.ones(batch, np.float32)))
    np.testing.assert_array_equal(rotated, x)
    np.testing.assert_array_equal(zoomed, x)


# --------------------------------------------------------------------------------------------
# 3. Interpolation stays within the input's range
# --------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.data())
def test_rotate_output_is_finite_and_within_the_input_range(data):
    x = data.draw(images())
    theta = data.draw(per_image(angles, x.shape[0]))
    assert_within_input_range(rotate_jit(x, theta), x)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_zoom_output_is_finite_and_within_the_input_range(data):
    x = data.draw(images())
    height_zoom = data.draw(per_image(zooms, x.shape[0]))
    width_zoom = data.draw(per_image(zooms, x.shape[0]))
    assert_within_input_range(zoom_jit(x, height_zoom, width_zoom), x)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_affine_transform_of_rotation_then_zoom_and_general_matrices_stays_in_range(data):
    x = data.draw(images())
    batch, height, width, _ = x.shape
    theta = data.draw(per_image(angles, batch))
    height_zoom = data.draw(per_image(zooms, batch))
    width_zoom = data.draw(per_image(zooms, batch))
    # The composition a random_augment step performs (rotation, then zoom), as one matrix.
    rot = np.asarray(augment.rotation_transforms(jnp.asarray(theta), height, width), np.float64)
    zm = np.asarray(augment.zoom_transforms(jnp.asarray(height_zoom), jnp.asarray(width_zoom),
                                            height, width), np.float64)

    def matrix(t):  # [a0, a1, a2, b0, b1, b2] -> 3x3 homogeneous (x, y, 1)
        return np.stack([t[:, 0:3], t[:, 3:6], np.tile([0.0, 0.0, 1.0], (len(t), 1))], axis=1)

    # Output reads zoom's input at Z p, which reads rotate's input at R (Z p).
    composed = (matrix(rot) @ matrix(zm))[:, :2, :].reshape(batch, 6).astype(np.float32)
    assert_within_input_range(affine_jit(x, composed), x)
    # Any matrix: sampling points far outside the image (the offsets reach ~3 image sizes) are
    # folded back by the reflect border and still read only input pixels.
    general = data.draw(hnp.arrays(np.float32, (batch, 6), elements=st.floats(
        -2.0, 2.0, width=32))) * np.array([1, 1, 10, 1, 1, 10], np.float32)
    assert_within_input_range(affine_jit(x, general), x)


@settings(max_examples=25, deadline=None)
@given(images(shapes=SQUARE_SHAPES))
def test_rotate_by_90_and_180_degrees_moves_pixels_like_numpy(x):
    # The range and identity tests above also pass for a transform that ignores its angle;
    # this one pins the angle down. float32(90 deg in rad) is not exactly pi/2, so sin/cos are
    # off by ~1e-7 and the sampling points by ~1e-7 * size: the neighbours leak in with a
    # weight ~1e-6, i.e. an error <= ~1e-6 * (max - min). 1e-5 * max(1, max|x|) covers it.
    batch = x.shape[0]
    slack = 1e-5 * max(1.0, float(np.abs(x).max()))
    plus_90 = np.asarray(rotate_jit(x, np.full(batch, 90.0, np.float32)))
    # Keras: positive angles turn the content counter-clockwise, as np.rot90 does.
    np.testing.assert_allclose(plus_90, np.rot90(x, 1, axes=(1, 2)), rtol=0, atol=slack)
    half_turn = np.asarray(rotate_jit(x, np.full(batch, 180.0, np.float32)))
    np.testing.assert_allclose(half_turn, x[:, ::-1, ::-1, :], rtol=0, atol=slack)


# --------------------------------------------------------------------------------------------
# 4. normalize and resize
# --------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.data())
def test_normalize_is_undone_by_scaling_back(data):
    x = data.draw(images())
    channels = x.shape[-1]
    mean = data.draw(hnp.arrays(np.float32, (channels,), elements=pixel_values(-300.0, 300.0)))
    # var > 1e-6: the smallest float32 above 1e-6 up to 1e4 (std from ~1e-3 to 100).
    var_min = float(np.nextafter(np.float32(1e-6), np.float32(1.0)))
    variance = data.draw(hnp.arrays(np.float32, (channels,),
                                    elements=st.floats(var_min, 1e4, width=32)))
    y = np.asarray(normalize_jit(x, mean, variance))
    assert y.dtype == np.float32 and np.isfinite(y).all()
    std = np.sqrt(variance)  # > 1e-3, so the 1e-7 floor is not involved.
    back = y * std + mean
    # float32 roundings: x - mean, / std, the sqrt (XLA's and numpy's may differ by an ulp),
    # * std, + mean; each <= EPS32 relative to |x| + |mean| (the largest magnitude on the
    # way), so 8 EPS32 * (|x| + |mean|) bounds it. Dividing by var instead of std, or
    # forgetting the mean, misses by O(|x|) for most draws. + 1e-30: (x - mean) / std can
    # fall below 2**-126, which XLA on CPU flushes to zero.
    tolerance = 8 * EPS32 * (np.abs(x) + np.abs(mean)) + 1e-30
    assert (np.abs(back - x) <= tolerance).all(), np.abs(back - x - tolerance).max()


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(SHAPES), st.sampled_from([1, 3, 12]), pixel_values(-255.0, 255.0))
def test_resize_of_a_constant_image_is_that_constant(shape, size, value):
    x = np.full(shape, value, np.float32)
    out = np.asarray(resize_jit(x, size))
    assert out.shape == (shape[0], size, size, shape[3])
    # Bilinear weights are normalised to sum 1, up to a few float32 roundings per axis (two
    # axes): |out - c| <= ~8 EPS32 |c|. A weight sum off by one pixel's share, or a zero
    # border, would miss by >= |c| / 18. atol 1e-30: XLA on CPU flushes a weighted value
    # below 2**-126 to zero (c = 2**-126 times a weight 1/2 gives 0.0, found by hypothesis).
    np.testing.assert_allclose(out, value, rtol=8 * EPS32, atol=1e-30)


# --------------------------------------------------------------------------------------------
# 5. validation_split, epoch_order, batch_indices
# --------------------------------------------------------------------------------------------

def numbered_dataset(n: int) -> Dataset:
    """Example i has label i and the image bytes (i // 256, i % 256): every example unique."""
    index = np.arange(n)
    pixels = np.stack([index // 256, index % 256], axis=1).astype(np.uint8)
    return Dataset(pixels.reshape(n, 1, 2, 1), index)


fractions = st.one_of(st.just(0.0), st.floats(0.0, 0.9), st.sampled_from([0.1, 0.2, 0.5]))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), fractions)
def test_validation_split_keeps_every_example_in_order_or_raises(n, fraction):
    data = numbered_dataset(n)
    # Keras' own formula (fit's validation_split): int(floor(n * (1 - f))) in float64.
    split_at = math.floor(n * (1.0 - fraction))
    empty_side = split_at == 0 or split_at == n
    try:
        train, validation = validation_split(data, fraction)
    except DataError:
        # Only when a side would be empty, and never for fraction 0 (no validation asked for).
        assert fraction > 0 and empty_side, (n, fraction)
        return
    assert not (fraction > 0 and empty_side), "an empty side should have been a DataError"
    assert len(train) == split_at
    # The validation set is the *last* examples, untouched: the concatenation is the input.
    np.testing.assert_array_equal(np.concatenate([train.images, validation.images]),
                                  data.images)
    np.testing.assert_array_equal(np.concatenate([train.labels, validation.labels]),
                                  data.labels)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 2**32 - 1), st.integers(0, 1000))
def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch(n, seed, epoch):
    order = epoch_order(n, seed, epoch)
    assert order.shape == (n,) and order.dtype == np.int32
    # Sorted, it is exactly 0..n-1: nothing lost, nothing repeated.
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    np.testing.assert_array_equal(epoch_order(n, seed, epoch), order)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 500), st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_batch_indices_cover_the_order_once_and_pad_only_at_the_end(n, batch_size, seed):
    order = np.random.default_rng(seed).permutation(n).astype(np.int32)
    rows = batch_indices(order, batch_size)
    steps = max(1, math.ceil(n / batch_size))
    assert rows.shape == (steps, batch_size)
    flat = rows.reshape(-1)
    # Row-major reading gives `order` itself, then only -1 (fewer than one batch of it, or
    # exactly one batch when the order is empty); -1 is never a real index.
    np.testing.assert_array_equal(flat[:n], order)
    assert (flat[n:] == -1).all()
    assert len(flat) - n < batch_size or n == 0
    kept = flat[flat != -1]
    assert len(kept) == n and len(np.unique(kept)) == n


@pytest.mark.parametrize("n", [0, 1, 7])
def test_dataset_take_is_a_prefix(n):
    data = numbered_dataset(n)
    for count in (None, 0, 1, 3, 10):
        part = data.take(count)
        expected = n if count is None else min(count, n)
        assert len(part) == expected
        np.testing.assert_array_equal(part.labels, data.labels[:expected])
        np.testing.assert_array_equal(part.images, data.images[:expected])
