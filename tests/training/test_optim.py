"""vit_flax.training.optim.keras_adamw against an independent float64 numpy version of
Keras 3's AdamW.

Keras' rule (keras/src/optimizers/adamw.py, adam.py, base_optimizer._apply_weight_decay), per
step t = 1, 2, ... and for every trainable variable:

    var -= var * wd * lr
    m += (g - m) * (1 - b1);  v += (g^2 - v) * (1 - b2)
    alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)
    var -= m * alpha / (sqrt(v) + eps)          # eps = 1e-7, not bias-corrected
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from vit_flax.training.optim import keras_adamw

LR, WD = 1e-3, 1e-4


def numpy_keras_adamw(params, gradients, lr, wd, b1=0.9, b2=0.999, eps=1e-7):
    """The parameters after applying each gradient pytree (dicts of arrays) in turn, float64."""
    params = {k: np.asarray(p, np.float64).copy() for k, p in params.items()}
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, grads in enumerate(gradients, start=1):
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        for k in params:
            g = np.asarray(grads[k], np.float64)
            params[k] -= params[k] * wd * lr
            m[k] += (g - m[k]) * (1 - b1)
            v[k] += (g * g - v[k]) * (1 - b2)
            params[k] -= m[k] * alpha / (np.sqrt(v[k]) + eps)
    return params


def run_optax(tx, params, gradients):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for grads in gradients:
        params, state = step(params, state, grads)
    return {k: np.asarray(p) for k, p in params.items()}


def problem(steps, scale, seed=0):
    """A kernel and a bias in U(-1, 1), float32, and `steps` random float32 gradients."""
    rng = np.random.default_rng(seed)
    params = {"kernel": rng.uniform(-1, 1, (4, 3)).astype(np.float32),
              "bias": rng.uniform(-1, 1, (3,)).astype(np.float32)}
    gradients = [{k: (scale * rng.normal(size=p.shape)).astype(np.float32)
                  for k, p in params.items()} for _ in range(steps)]
    return params, gradients


def max_difference(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def tolerance(steps):
    """float32 vs float64: |params| stay below ~1.1, so writing each step's result back to
    float32 rounds by at most half an ulp, 6e-8, for the decay and for the Adam update each;
    the update itself (~1e-3) carries a relative float32 error of ~1e-5 at worst (1 - b2^t with
    b2 = 0.999 rounded to float32), ~1e-8 absolute. Bounded per step by 1.5e-7, summed over
    the steps (a worst case: the errors actually partly cancel)."""
    return 1.5e-7 * steps


@pytest.mark.parametrize("steps, scale, lr, wd", [
    (5, 1.0, LR, WD), (5, 1e-5, LR, WD), (100, 1.0, LR, WD), (100, 1e-5, LR, WD),
    # The recipe's decay moves a weight by only 1e-7 per step, below what 100 steps can
    # resolve against float32 noise; lr * wd = 1e-3 makes it count for the kernel and the bias
    # (|params| stay below 1.05 in 5 steps, so the tolerance still holds).
    (5, 1.0, 1e-2, 1e-1),
])
def test_keras_adamw_matches_the_keras_rule(steps, scale, lr, wd):
    params, gradients = problem(steps, scale)
    got = run_optax(keras_adamw(lr, wd), params, gradients)
    expected = numpy_keras_adamw(params, gradients, lr, wd)
    assert got["kernel"].dtype == np.float32
    assert max_difference(got, expected) < tolerance(steps)
    # The parameters did move: by ~lr per step, far above the tolerance.
    assert max_difference(expected, params) > 100 * tolerance(steps)


def test_optax_adamw_is_a_different_optimizer():
    # optax adds eps to the bias-corrected sqrt(v_hat); at gradient scale 1e-5, sqrt(v) is
    # ~1e-5 so eps = 1e-7 weighs 1% in Keras and ~0.3% in optax: ~1e-3 apart after 5 steps.
    params, gradients = problem(5, 1e-5)
    expected = numpy_keras_adamw(params, gradients, LR, WD)
    optax_result = run_optax(optax.adamw(LR, eps=1e-7, weight_decay=WD), params, gradients)
    assert max_difference(optax_result, expected) > 100 * tolerance(5)


def test_weight_decay_reaches_a_bias_without_gradient():
    # A larger lr * wd (1e-3 per step) than the recipe's (1e-7, about one float32 ulp) so that
    # the decay is resolved in float32.
    lr, wd, steps = 1e-2, 1e-1, 50
    rng = np.random.default_rng(1)
    params = {"kernel": rng.uniform(-1, 1, (4, 3)).astype(np.float32),
              "bias": rng.uniform(0.5, 1, (3,)).astype(np.float32)}
    tx = keras_adamw(lr, wd)
    state = tx.init(params)
    biases = [params["bias"].astype(np.float64)]
    for _ in range(steps):
        grads = {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                 "bias": np.zeros(3, np.float32)}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        biases.append(np.asarray(params["bias"], np.float64))
    # Zero gradient: m = v = 0, the Adam step is 0 / (0 + eps) = 0, only the decay acts. Each
    # step multiplies by 1 - lr*wd = 0.999 up to one float32 rounding (half an ulp, <= 6e-8
    # relative) of the new value, 2.4e-7 leaves room for the multiply's rounding too.
    ratios = np.array(biases[1:]) / np.array(biases[:-1])
    np.testing.assert_allclose(ratios, 1 - lr * wd, rtol=2.4e-7, atol=0)
    # Cumulated: relative errors add up to at most steps * 1.2e-7.
    np.testing.assert_allclose(biases[-1], biases[0] * (1 - lr * wd) ** steps,
                               rtol=steps * 1.2e-7, atol=0)
