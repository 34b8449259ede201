"""Where a training step's time goes, for vit_flax and for Keras (seed model, this machine).

    python benchmarks/breakdown.py [--batch-size 256] [--skip-keras]

vit_flax: the augmentation alone (normalize, resize, flip, rotate, zoom), the inference
forward pass, and the full train step, each jitted and timed over a few calls. Keras:
`train_on_batch` of the seed model with and without its three random layers, which is how
much of Keras' step the eager (unjitted) augmentation costs.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")


def timed(function, repeats: int = 3) -> float:
    """Mean seconds of `repeats` calls after one warm-up (compilation) call."""
    import jax

    jax.block_until_ready(function())
    started = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(function())
    return (time.perf_counter() - started) / repeats


def vit_flax_parts(batch_size: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from benchmark import random_batch
    from flax import nnx

    import vit_flax
    from vit_flax.infra import runtime
    from vit_flax.models import augment, create_model
    from vit_flax.training import steps as steps_lib
    from vit_flax.training.optim import keras_adamw

    images, labels = random_batch(batch_size)
    config = vit_flax.ViTConfig(batch_size=batch_size)
    model = create_model(config, images)
    graphdef, params, statistics = steps_lib.split_model(model)
    data = jax.device_put((images, labels))
    key = jax.random.key(0)

    @jax.jit
    def augmentation(x):
        x = augment.resize(augment.normalize(x, 0.0, 1.0), config.image_size)
        return augment.random_augment(key, x, config.rotation_factor, config.zoom_factor)

    @jax.jit
    def forward(params, x):
        return nnx.merge(graphdef, params, statistics)(x)

    tx = keras_adamw(config.learning_rate, config.weight_decay)
    state = {"s": steps_lib.TrainState.create(params, tx, config)}
    runtime.unroll_threefry_on_cpu()  # As train.py does (vit_flax.run).
    train_step = steps_lib.make_train_step(graphdef, tx, microbatch_size=config.microbatch_size,
                                           loss=steps_lib.LossOptions.of(config))
    row = jnp.arange(batch_size, dtype=jnp.int32)

    def step():
        state["s"], totals = train_step(state["s"], statistics, steps_lib.Totals.zero(),
                                        *data, row)
        return totals

    return {"augmentation": timed(lambda: augmentation(data[0])),
            "forward (inference)": timed(lambda: forward(params, data[0])),
            "train step": timed(step)}


def keras_parts(batch_size: int) -> dict[str, float]:
    from benchmark import random_batch

    from parity.keras_reference import build_keras_vit, compile_like_seed
    from vit_flax import ViTConfig

    images, labels = random_batch(batch_size)
    config = ViTConfig(batch_size=batch_size)
    result = {}
    for name, random_layers in (("train step", True), ("train step, no random layers", False)):
        model = compile_like_seed(build_keras_vit(config, images, random_layers), config)
        result[name] = timed(lambda m=model: m.train_on_batch(images, labels), repeats=2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--skip-keras", action="store_true")
    args = parser.parse_args()
    parts = {"vit_flax": vit_flax_parts(args.batch_size)}
    if not args.skip_keras:
        parts["keras"] = keras_parts(args.batch_size)
    print(f"batch {args.batch_size}: seconds per call")
    for implementation, timings in parts.items():
        for name, seconds in timings.items():
            print(f"  {implementation:9s} {name:32s} {seconds:8.3f}")


if __name__ == "__main__":
    main()
