"""Training throughput of the Keras reference and of vit_flax, side by side, on this machine.

    python benchmarks/benchmark.py                 # seed model, batch 256, 3 timed steps
    python benchmarks/benchmark.py --steps 5 --batch-size 128

Each implementation runs in its own process (so each peak memory is its own), on the same
random uint8 CIFAR-shaped batch. Reported: images/s and ms/step over the timed steps (after
the first), the first step (compilation or tracing included), peak resident memory, and
the ratio to Keras. vit_flax runs twice: as train.py does (ViTConfig's default micro-batch
size) and with the whole batch in one pass. The model's FLOPs per training image are 3x
XLA's cost analysis of the inference forward pass (forward + backward, the usual estimate;
recomputation and random bits not counted); "GFLOP/s" is that over the measured step time,
next to the float32 matmul peak of this machine measured in the same run. Keras must be
importable (pip install -e ".[dev]").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

IMPLEMENTATIONS = ("keras", "vit_flax", "vit_flax-one-pass")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def random_batch(batch_size: int, num_classes: int = 100):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, num_classes, batch_size).astype(np.int32)


def time_steps(step, steps: int) -> tuple[float, list[float]]:
    """Seconds of the first call, then of each of `steps` more calls (each waited for)."""
    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        timings.append(time.perf_counter() - started)
    return first, timings


def run_keras(batch_size: int, steps: int) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    from parity.keras_reference import build_keras_vit, compile_like_seed
    from vit_flax import ViTConfig

    images, labels = random_batch(batch_size)
    config = ViTConfig(batch_size=batch_size)
    model = compile_like_seed(build_keras_vit(config, adapt_images=images), config)
    first, timings = time_steps(lambda: model.train_on_batch(images, labels), steps)
    return {"implementation": f"keras {keras.__version__}", "first": first,
            "timings": timings}


def run_vit_flax(batch_size: int, steps: int, one_pass: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import vit_flax
    from vit_flax import runtime
    from vit_flax import steps as steps_lib
    from vit_flax.model import create_model
    from vit_flax.optim import keras_adamw

    images, labels = random_batch(batch_size)
    config = vit_flax.ViTConfig(batch_size=batch_size)
    if one_pass:
        config = config.replace(microbatch_size=batch_size)
    graphdef, params, statistics = steps_lib.split_model(create_model(config, images))
    tx = keras_adamw(config.learning_rate, config.weight_decay)
    state = steps_lib.TrainState.create(params, tx, config)
    data = jax.device_put((images, labels))
    row = jnp.arange(batch_size, dtype=jnp.int32)
    runtime.unroll_threefry_on_cpu()  # As train.py does (vit_flax.run).
    train_step = steps_lib.make_train_step(graphdef, tx, microbatch_size=config.microbatch_size)
    holder = {"state": state, "totals": steps_lib.Totals.zero()}

    def step():
        holder["state"], holder["totals"] = train_step(
            holder["state"], statistics, holder["totals"], *data, row)
        jax.block_until_ready(holder["totals"])

    first, timings = time_steps(step, steps)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p, statistics)(x))
    cost = forward.lower(holder["state"].params, data[0]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"implementation": f"vit_flax {vit_flax.__version__}, micro-batch "
                              f"{config.pass_size}", "first": first,
            "timings": timings, "flops_per_image": 3 * cost["flops"] / batch_size,
            "device": str(jax.devices()[0].device_kind)}


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    started = time.perf_counter()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def worker(name: str, batch_size: int, steps: int) -> None:
    if name == "keras":
        result = run_keras(batch_size, steps)
    else:
        result = run_vit_flax(batch_size, steps, one_pass=name == "vit_flax-one-pass")
    result["peak_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(name: str, batch_size: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--batch-size", str(batch_size),
               "--steps", str(steps)]
    completed = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode or not lines:
        sys.exit(f"{name} failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.batch_size, args.steps)

    results = {name: run_worker(name, args.batch_size, args.steps) for name in IMPLEMENTATIONS}
    peak = matmul_peak_gflops()
    flops = results["vit_flax"]["flops_per_image"]
    device = results["vit_flax"]["device"]
    keras_rate = None
    print(f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPU cores, "
          f"device {device}; float32 matmul peak {peak:.1f} GFLOP/s; "
          f"{flops / 1e9:.2f} GFLOP per training image (3x the forward pass)")
    print("| implementation | device | batch | images/s | ms/step | first step s | "
          "peak memory GB | GFLOP/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in IMPLEMENTATIONS:
        result = results[name]
        step = sum(result["timings"]) / len(result["timings"])
        rate = args.batch_size / step
        keras_rate = keras_rate or rate
        print(f"| {result['implementation']} | {device} | {args.batch_size} | {rate:.2f} | "
              f"{1000 * step:.0f} | {result['first']:.1f} | {result['peak_gb']:.2f} | "
              f"{rate * flops / 1e9:.1f} | {rate / keras_rate:.2f}x |")


if __name__ == "__main__":
    main()
