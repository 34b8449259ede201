"""keras.optimizers.AdamW as an optax GradientTransformation.

optax.adamw is not the same optimizer: it adds epsilon to the bias-corrected sqrt(v_hat),
Keras adds it to the raw sqrt(v) and folds the bias corrections into the step size. Epsilon
matters where gradients are small: at gradient scale 1e-5, optax.adamw(eps=1e-7) ends 1.1e-3
away from Keras' weights after five steps (tests/training/test_optim.py). This module reproduces
Keras' rule:

    var -= var * wd * lr                               # decay first, on the old value
    m += (g - m) * (1 - b1);  v += (g^2 - v) * (1 - b2)
    var -= m * lr * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)

applied to every trainable variable (Keras excludes none by default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-7) -> optax.GradientTransformation:
    """Adam's direction with Keras' placement of epsilon and of the bias corrections."""

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update(updates, state, params=None):
        del params
        # Keras' `m += (g - m) * (1 - b1)` form, not `b1 * m + (1 - b1) * g`: same value,
        # different rounding.
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (jnp.square(g) - v) * (1 - b2), state.nu, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        correction = jnp.sqrt(1 - jnp.power(b2, t)) / (1 - jnp.power(b1, t))
        direction = jax.tree.map(lambda m, v: m * correction / (jnp.sqrt(v) + eps), mu, nu)
        return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def keras_adamw(learning_rate: float | optax.Schedule, weight_decay: float, b1: float = 0.9,
                b2: float = 0.999, eps: float = 1e-7) -> optax.GradientTransformation:
    """keras.optimizers.AdamW(learning_rate, weight_decay) with Keras' defaults. A schedule
    (step -> rate) scales the decay too, as Keras applies its current rate to both."""
    if callable(learning_rate):
        step_size = optax.scale_by_schedule(lambda count: -learning_rate(count))
    else:
        step_size = optax.scale(-learning_rate)
    return optax.chain(scale_by_keras_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay),
                       step_size)


def learning_rate_schedule(config, steps_per_epoch: int) -> float | optax.Schedule:
    """The config's learning rate: the constant (the seed's), or a linear warmup over
    warmup_epochs followed by a cosine decay to 0 at the end of the last epoch."""
    if config.schedule == "constant" and not config.warmup_epochs:
        return config.learning_rate
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = max(config.epochs * steps_per_epoch, warmup + 1)
    if config.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup),
                                     optax.constant_schedule(config.learning_rate)], [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total, 0.0)


def for_config(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer a ViTConfig trains with: Keras' AdamW at the config's schedule."""
    return keras_adamw(learning_rate_schedule(config, steps_per_epoch), config.weight_decay)
