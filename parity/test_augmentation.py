"""Augmentation against Keras' own layers: transforms at fixed parameters, and the random
parameters as distributions (seeded, so a pass stays a pass).

Transform tolerance: 2e-5 absolute, on images normalized and resized as the random layers
see them (values within +-1.7, neighbouring pixels at most ~1.5 apart after the 32 -> 72
upsampling). Both sides sample with jax.scipy.ndimage.map_coordinates (bilinear, "reflect")
at coordinates computed by the same formulas: eager, the results are bit-identical (measured
0.0). Jitted, as in vit_flax's train step, XLA may contract or reorder the coordinate
arithmetic: one float32 ulp of a coordinate near 71 is 7.6e-6 px, which moves a bilinear
sample by up to 7.6e-6 x 1.5 = 1.1e-5. Measured 2.4e-7 jitted. Flips are exact (an index
reversal).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from scipy import stats

from parity import harness
from vit_flax import ViTConfig
from vit_flax.models import augment

CONFIG = ViTConfig()
TOLERANCE = 2e-5
DRAWS = 20_000
ALPHA = 1e-4  # Seeded: the p-values are fixed numbers; a correct sampler clears this easily.


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Eight 72x72 images as the random layers see them: normalized, resized, smooth-ish."""
    raw = harness.random_images(8, seed=4).astype(np.float32)
    normalized = (raw - 127.5) / 73.9
    return np.asarray(augment.resize(jnp.asarray(normalized), CONFIG.image_size))


@pytest.fixture(scope="module")
def parameters() -> harness.AugmentationParameters:
    # Beyond the seed's ranges too (+-30 degrees, zoom 0.6-1.5): a transform must agree at
    # any parameters, and larger ones make a convention error (sign, centre) obvious.
    return harness.AugmentationParameters(
        flips=np.array([True, False, True, True, False, False, True, False]),
        angles=np.float32([-7.2, 7.2, 0.0, 3.3, -30.0, 30.0, 90.0, -1.1]),
        height_zooms=np.float32([0.8, 1.2, 1.0, 0.93, 0.6, 1.5, 1.1, 0.85]),
        width_zooms=np.float32([1.2, 0.8, 1.0, 1.07, 1.5, 0.6, 0.9, 1.15]))


def keras_random_layers(config: ViTConfig) -> list:
    """The seed's three random layers, as keras_reference builds them."""
    return [keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomRotation(factor=config.rotation_factor),
            keras.layers.RandomZoom(height_factor=config.zoom_factor,
                                    width_factor=config.zoom_factor)]


def keras_apply(layers: list, params, images) -> np.ndarray:
    harness.fix_keras_augmentation(layers, params)
    x = images
    for layer in layers:
        x = layer(x, training=True)
    return np.asarray(x)


def test_flip_is_exact(images, parameters):
    flip, _, _ = keras_random_layers(CONFIG)
    ours = augment.horizontal_flip(jnp.asarray(images), jnp.asarray(parameters.flips))
    np.testing.assert_array_equal(np.asarray(ours), keras_apply([flip], parameters, images))


def test_rotation(images, parameters, record):
    _, rotation, _ = keras_random_layers(CONFIG)
    ours = np.asarray(augment.rotate(jnp.asarray(images), jnp.asarray(parameters.angles)))
    difference = np.abs(ours - keras_apply([rotation], parameters, images)).max()
    record("rotation at fixed angles", difference, TOLERANCE)
    assert difference <= TOLERANCE


def test_zoom(images, parameters, record):
    _, _, zoom = keras_random_layers(CONFIG)
    ours = np.asarray(augment.zoom(jnp.asarray(images), jnp.asarray(parameters.height_zooms),
                                   jnp.asarray(parameters.width_zooms)))
    difference = np.abs(ours - keras_apply([zoom], parameters, images)).max()
    record("zoom at fixed zooms", difference, TOLERANCE)
    assert difference <= TOLERANCE


def test_random_augment_chains_them_in_the_seed_order(images, parameters, monkeypatch, record):
    """vit_flax's own random_augment (its draws replaced) vs the three Keras layers in turn."""
    harness.fix_flax_augmentation(monkeypatch, parameters)
    expected = keras_apply(keras_random_layers(CONFIG), parameters, images)
    chain = jax.jit(augment.random_augment, static_argnums=(2, 3))  # Jitted, as in training.
    for mode, run in (("eager", augment.random_augment), ("jit", chain)):
        ours = np.asarray(run(jax.random.key(0), jnp.asarray(images), CONFIG.rotation_factor,
                              CONFIG.zoom_factor))
        difference = np.abs(ours - expected).max()
        record(f"flip -> rotate -> zoom ({mode})", difference, TOLERANCE)
        assert difference <= TOLERANCE


# --- distributions ----------------------------------------------------------------------------

def keras_draws(layer, seed: int) -> dict:
    """One call of the layer's own sampler for DRAWS images (only the shape is read)."""
    dummy = np.zeros((DRAWS, 2, 2, 3), np.float32)
    transformation = layer.get_random_transformation(
        dummy, training=True, seed=keras.random.SeedGenerator(seed))
    return {k: np.asarray(v).reshape(-1) for k, v in transformation.items()
            if k in ("flips", "angle", "height_zoom", "width_zoom")}


def flax_draws(seed: int) -> dict:
    flip_key, angle_key, zoom_key = jax.random.split(jax.random.key(seed), 3)
    height, width = augment.sample_zooms(zoom_key, DRAWS, CONFIG.zoom_factor)
    return {"flips": np.asarray(augment.sample_flips(flip_key, DRAWS)),
            "angle": np.asarray(augment.sample_angles(angle_key, DRAWS, CONFIG.rotation_factor)),
            "height_zoom": np.asarray(height), "width_zoom": np.asarray(width)}


@pytest.fixture(scope="module")
def draws() -> dict:
    flip, rotation, zoom = keras_random_layers(CONFIG)
    keras_side = {**keras_draws(flip, 1), **keras_draws(rotation, 2), **keras_draws(zoom, 3)}
    return {"keras": keras_side, "vit_flax": flax_draws(4)}


@pytest.mark.parametrize("side", ["keras", "vit_flax"])
def test_flips_are_fair_coins(draws, side):
    flips = draws[side]["flips"]
    assert flips.dtype == bool
    assert stats.binomtest(int(flips.sum()), len(flips), 0.5).pvalue > ALPHA


@pytest.mark.parametrize("name, low, high", [
    ("angle", -360 * CONFIG.rotation_factor, 360 * CONFIG.rotation_factor),  # +-7.2 degrees
    ("height_zoom", 1 - CONFIG.zoom_factor, 1 + CONFIG.zoom_factor),
    ("width_zoom", 1 - CONFIG.zoom_factor, 1 + CONFIG.zoom_factor),
])
def test_parameters_follow_the_same_uniform(draws, name, low, high):
    keras_side, ours = draws["keras"][name], draws["vit_flax"][name]
    for sample in (keras_side, ours):
        assert low <= sample.min() and sample.max() <= high
        assert stats.kstest(sample, stats.uniform(low, high - low).cdf).pvalue > ALPHA
    assert stats.ks_2samp(keras_side, ours).pvalue > ALPHA


@pytest.mark.parametrize("side", ["keras", "vit_flax"])
def test_height_and_width_zooms_are_independent(draws, side):
    """RandomZoom(h, w) draws the two zooms separately: uncorrelated, not equal."""
    height, width = draws[side]["height_zoom"], draws[side]["width_zoom"]
    assert not np.allclose(height, width)
    assert stats.pearsonr(height, width).pvalue > ALPHA
