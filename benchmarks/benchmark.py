"""Training throughput of the Keras reference and of vit_flax, side by side, on this machine.

    python benchmarks/benchmark.py                 # seed model, batch 256, 3 timed steps
    python benchmarks/benchmark.py --steps 5 --batch-size 128
    python benchmarks/benchmark.py --cache-check   # first step: empty vs warm JAX cache

Each implementation runs in its own process (so each peak memory is its own), on the same
random uint8 CIFAR-shaped batch. Reported: images/s and ms/step over the timed steps (after
the first), the first step (compilation or tracing included), peak resident memory, and
the ratio to Keras. vit_flax runs twice: as train.py does (ViTConfig's default micro-batch
size) and with the whole batch in one pass. The model's FLOPs per training image are 3x
XLA's cost analysis of the inference forward pass (forward + backward, the usual estimate;
recomputation and random bits not counted); "GFLOP/s" is that over the measured step time,
next to the float32 matmul peak of this machine measured in the same run. Keras must be
importable (pip install -e ".[dev]"). `--dtype bfloat16` runs vit_flax in mixed precision
(Keras stays float32); `--implementations` picks which run; `--config JSON` changes
ViTConfig fields (a smaller model); `--json PATH` also writes the numbers.
`--cache-check` runs vit_flax on a new, empty persistent compilation cache
(runtime.use_compilation_cache, as train.py uses it), then once more on it: the second
run's first step loads the compiled train step instead of compiling it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

IMPLEMENTATIONS = ("keras", "vit_flax", "vit_flax-one-pass")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def random_batch(batch_size: int, num_classes: int = 100, input_size: int = 32):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, input_size, input_size, 3), dtype=np.uint8)
    return images, rng.integers(0, num_classes, batch_size).astype(np.int32)


def model_config(batch_size: int, overrides: str | None = None, **fields):
    """The seed's ViTConfig at `batch_size`, with `overrides` (JSON, e.g. a smaller model)."""
    from vit_flax import ViTConfig

    fields.update(json.loads(overrides or "{}"))
    return ViTConfig(batch_size=batch_size, **fields)


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


def run_keras(batch_size: int, steps: int, overrides: str | None = None) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    from parity.keras_reference import build_keras_vit, compile_like_seed

    config = model_config(batch_size, overrides)
    images, labels = random_batch(batch_size, config.num_classes, config.input_size)
    model = compile_like_seed(build_keras_vit(config, adapt_images=images), config)
    first, timings = time_steps(lambda: model.train_on_batch(images, labels), steps)
    return {"implementation": f"keras {keras.__version__}", "first": first,
            "timings": timings}


def run_vit_flax(batch_size: int, steps: int, one_pass: bool, dtype: str = "float32",
                 cache: str | None = None, overrides: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import vit_flax
    from vit_flax.infra import runtime
    from vit_flax.training import steps as steps_lib
    from vit_flax.training.setup import create_train_state

    if cache:
        runtime.use_compilation_cache(cache)
    config = model_config(batch_size, overrides, dtype=dtype)
    images, labels = random_batch(batch_size, config.num_classes, config.input_size)
    if one_pass:
        config = config.replace(microbatch_size=batch_size)
    runtime.unroll_threefry_on_cpu()  # As train.py does (vit_flax.run).
    setup = create_train_state(config, images, steps_per_epoch=1)
    state, statistics, train_step = setup.state, setup.statistics, setup.train_step
    data = jax.device_put((images, labels))
    row = jnp.arange(batch_size, dtype=jnp.int32)
    holder = {"state": state, "totals": steps_lib.Totals.zero()}

    def step():
        holder["state"], holder["totals"] = train_step(
            holder["state"], statistics, holder["totals"], *data, row)
        jax.block_until_ready(holder["totals"])

    first, timings = time_steps(step, steps)
    forward = jax.jit(lambda p, x: nnx.merge(setup.graphdef, p, statistics)(x))
    cost = forward.lower(holder["state"].params, data[0]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"implementation": f"vit_flax {vit_flax.__version__}, micro-batch "
                              f"{config.pass_size}, {dtype}", "first": first,
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


def worker(args) -> None:
    if args.worker == "keras":
        result = run_keras(args.batch_size, args.steps, args.config)
    else:
        result = run_vit_flax(args.batch_size, args.steps, args.worker == "vit_flax-one-pass",
                              args.dtype, args.cache, args.config)
    result["peak_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(name: str, args, steps: int | None = None, cache: str | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--batch-size", str(args.batch_size),
               "--steps", str(steps or args.steps), "--dtype", args.dtype]
    command += ["--cache", cache] if cache else []
    completed = subprocess.run(command + (["--config", args.config] if args.config else []),
                               capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode or not lines:
        sys.exit(f"{name} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    step = sum(result["timings"]) / len(result["timings"])
    return {**result, "step_seconds": step, "images_per_second": args.batch_size / step}


def cache_check(args, empty: dict, cache: str) -> dict:
    """`empty`: vit_flax's run on a new, empty persistent cache; then a second process on the
    cache it filled. A first step is a compile (or a cache load) plus one ordinary step."""
    warm = run_worker("vit_flax", args, cache=cache)
    return {"first_step_empty_cache": empty["first"], "first_step_warm_cache": warm["first"],
            "ratio": warm["first"] / empty["first"],
            "step_seconds": [empty["step_seconds"], warm["step_seconds"]]}


def measure(args) -> dict:
    """Each implementation in its own process; with --cache-check, vit_flax's run fills a new
    cache (no earlier run's programs: it compiles as without one) and a second one reads it."""
    with tempfile.TemporaryDirectory() as cache:
        results = {name: run_worker(name, args, cache=cache if args.cache_check and
                                    name == "vit_flax" else None)
                   for name in args.implementations}
        checked = cache_check(args, results["vit_flax"], cache) if args.cache_check else None
    flax_names = [name for name in args.implementations if name != "keras"]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
              "cpu_cores": os.cpu_count(), "batch_size": args.batch_size, "dtype": args.dtype,
              "timed_steps": args.steps, "config": json.loads(args.config or "{}"),
              "matmul_peak_gflops": matmul_peak_gflops(args.matmul_size),
              "results": results}
    if flax_names:
        report["device"] = results[flax_names[0]]["device"]
        report["flops_per_image"] = results[flax_names[0]]["flops_per_image"]
    if checked:
        report["compilation_cache"] = checked
    return report


def markdown(report: dict) -> list[str]:
    """The report as docs/benchmarks.md's lines: a heading line, the table, the cache check."""
    flops, device = report.get("flops_per_image", 0.0), report.get("device", "cpu")
    lines = [f"{report['date']}, {report['machine']}, {report['cpu_cores']} CPU cores, device "
             f"{device}; float32 matmul peak {report['matmul_peak_gflops']:.1f} GFLOP/s; "
             f"{flops / 1e9:.2f} GFLOP per training image (3x the forward pass)", "",
             "| implementation | device | batch | images/s | ms/step | first step s | "
             "peak memory GB | GFLOP/s | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    first_rate = None
    for result in report["results"].values():
        rate = result["images_per_second"]
        first_rate = first_rate or rate
        lines.append(f"| {result['implementation']} | {device} | {report['batch_size']} | "
                     f"{rate:.2f} | {1000 * result['step_seconds']:.0f} | "
                     f"{result['first']:.1f} | {result['peak_gb']:.2f} | "
                     f"{rate * flops / 1e9:.1f} | {rate / first_rate:.2f}x |")
    if "compilation_cache" in report:
        cache = report["compilation_cache"]
        lines += ["", f"Persistent compilation cache, vit_flax's first step: "
                      f"{cache['first_step_empty_cache']:.1f} s on an empty cache, "
                      f"{cache['first_step_warm_cache']:.1f} s in a second process "
                      f"({cache['ratio']:.2f} of it); a step after the first: "
                      f"{cache['step_seconds'][0]:.1f} and {cache['step_seconds'][1]:.1f} s"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="vit_flax's compute dtype (Keras: float32)")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS,
                        default=list(IMPLEMENTATIONS))
    parser.add_argument("--cache-check", action="store_true",
                        help="also: first step on an empty vs a warm compilation cache")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--config", help="ViTConfig fields to change, as JSON (default: the "
                                         "seed model)")
    parser.add_argument("--matmul-size", type=int, default=2048,
                        help="side of the square matmul that measures the peak")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache_check and "vit_flax" not in args.implementations:
        parser.error("--cache-check measures the vit_flax implementation: include it")
    if args.worker:
        return worker(args)
    report = measure(args)
    print("\n".join(markdown(report)))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=1)


if __name__ == "__main__":
    main()
