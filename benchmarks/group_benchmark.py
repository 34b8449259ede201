"""Many runs in one program (vit_flax.training.group) against the same runs one after another
(vit_flax.train): wall time, compile included, and the step's memory per number of runs.

    python benchmarks/group_benchmark.py                      # 4 and 8 seeds, 2 epochs
    python benchmarks/group_benchmark.py --runs 4 8 --images 384 --epochs 2
    python benchmarks/group_benchmark.py --agreement          # group vs solo, 1 and 2 devices
    python benchmarks/group_benchmark.py --steps --runs 4     # the train step alone

A small config in the spirit of the README's small-model recipe (32x32 inputs, 4x4 patches,
4 blocks of width 64, head 512->256; batch 128) on random uint8 images. Each measurement
runs in its own process, so none profits from another's compiled programs or imports:
  solo    seeds 0..N-1 one after another with vit_flax.train; the time after 4 and after 8
  group   the same seeds with vit_flax.training.group.train_group, for each N
  memory  the compiled group step's memory_analysis() for 1, 2, 4, 8 runs, and the solo
          step's (steps.make_train_step) beside it
  agreement  (--agreement) tests/conftest.py's TINY config, 2 seeds, 2 epochs, the data of
          tests/training/test_group.py: each run of the group against its solo run, on 1 and on 2
          (simulated CPU) devices: the largest difference of each metric, and the
          seed-to-seed difference of the solo runs beside it
  steps   (--steps) the train step alone, seconds per step after a warm-up one, on 2,048
          images: the solo step (trainer.prepare_fit's), the group's step of N runs on one
          device (group.prepare_group's), and, as an experiment, the same vmapped step with
          the runs axis split over 2 (simulated CPU) devices instead of the batch, each run
          whole on one device: a layout vit_flax.training.group does not use (yet)
Every time is that of the library calls (model creation, compile, training, validation,
checkpoints, test evaluation, files), not of the process start: wall time, and CPU time
(all threads of the process), which other work on a shared machine inflates far less;
each part also reports the load average before and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = dict(num_classes=10, input_size=32, image_size=32, patch_size=4, projection_dim=64,
             num_heads=4, transformer_layers=4, mlp_head_units=(512, 256), batch_size=128,
             microbatch_size=128)


def problem(images: int):
    import numpy as np

    from vit_flax.data import sources as data

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, images + 128)
    pixels = rng.integers(0, 256, (images + 128, 32, 32, 3), dtype=np.uint8)
    return data.from_arrays(pixels[:images], labels[:images], pixels[images:], labels[images:])


def configs(runs: int, epochs: int):
    import vit_flax

    return [vit_flax.ViTConfig(**SMALL, epochs=epochs, seed=seed) for seed in range(runs)]


def solo(runs: int, images: int, epochs: int) -> dict:
    import vit_flax

    splits, elapsed = problem(images), []
    started, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as root:
        for config in configs(runs, epochs):
            vit_flax.train(config, splits, Path(root) / str(config.seed), log=lambda _: None)
            elapsed.append((time.perf_counter() - started, time.process_time() - cpu))
    return {"cumulative": elapsed}


def group(runs: int, images: int, epochs: int) -> dict:
    from vit_flax.training.group import train_group

    splits = problem(images)
    started, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as root:
        summary = train_group(configs(runs, epochs), splits, root, log=lambda _: None)
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
            "compile_seconds": summary["compile_seconds"]}


def memory(runs_list: list[int], images: int) -> dict:
    """memory_analysis() of the group step per number of runs, and of the solo step."""
    import jax
    import numpy as np

    from vit_flax.data import sources as data
    from vit_flax.infra import parallel
    from vit_flax.training import feeds, steps
    from vit_flax.training.setup import create_train_state

    splits, mesh = problem(images), parallel.data_mesh()
    train_set, validation_set = data.validation_split(splits.train, 0.1)
    sizes = {}
    for runs in runs_list:
        fit, _ = prepare_group(configs(runs, 2), train_set, validation_set, mesh)
        sizes[runs] = analysis(fit.train_step)
    config = configs(1, 2)[0]
    setup = create_train_state(config, train_set.images, mesh=mesh,
                               steps_per_epoch=-(-len(train_set) // config.batch_size))
    row = jax.device_put(np.zeros(config.batch_size, np.int32), parallel.batch_sharded(mesh))
    compiled = setup.train_step.lower(
        setup.state, setup.statistics, steps.Totals.zero(),
        *feeds.DeviceFeed(train_set, mesh).arrays, row).compile()
    return {"group": sizes, "solo": analysis(compiled)}


def agreement() -> dict:
    import jax
    import numpy as np

    import vit_flax

    tests = Path(__file__).resolve().parents[1] / "tests"
    sys.path[:0] = [str(tests / "training"), str(tests)]
    from test_group import METRICS, NAMES, RUNS, history, small_problem

    with tempfile.TemporaryDirectory() as root:
        vit_flax.train_group(RUNS[:2], small_problem(), root, log=lambda _: None)
        together = [history(Path(root) / "runs" / name) for name in NAMES[:2]]
        for config in RUNS[:2]:
            vit_flax.train(config, small_problem(), Path(root) / str(config.seed),
                           log=lambda _: None)
        alone = [history(Path(root) / str(config.seed)) for config in RUNS[:2]]
    difference = np.abs(np.subtract(together, alone)).max(axis=(0, 1))
    return {"devices": jax.device_count(),
            "first_epoch_loss": float(np.abs(np.subtract(together, alone))[:, 0, 0].max()),
            "group_vs_solo": dict(zip(METRICS, difference.tolist(), strict=True)),
            "seed_to_seed": dict(zip(METRICS, np.abs(np.subtract(*alone)).max(axis=0).tolist(),
                                     strict=True))}


def step_seconds(layout: str, runs: int, timed: int = 12) -> dict:
    """Seconds per train step of `layout` (see the module docstring), after one warm-up."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from vit_flax.data import sources as data
    from vit_flax.infra import parallel
    from vit_flax.models import create_model
    from vit_flax.training import group, steps
    from vit_flax.training import loop as trainer

    train_set = problem(2048).train
    mesh = parallel.data_mesh(jax.devices()[:1])
    if layout == "solo":
        config = configs(1, 2)[0]
        fit, state = trainer.prepare_fit(
            [trainer.Member(config, Path("unused"))], [create_model(config, train_set.images)],
            train_set, data.Dataset(train_set.images[:0], train_set.labels[:0]), mesh)
        batches = list(fit.train_feed.batches(np.arange(2048), config.batch_size))
        step = lambda state, totals, i: fit.train_step(  # noqa: E731
            state, fit.statistics, totals, *batches[i % len(batches)])
        totals = steps.Totals.zero()
    else:
        empty = data.Dataset(train_set.images[:0], train_set.labels[:0])
        fit, state = prepare_group(configs(runs, 2), train_set, empty, mesh)
        members = fit.members
        rows = parallel.put_global(
            [np.tile(np.arange(128 * i, 128 * (i + 1), dtype=np.int32), (runs, 1))
             for i in range(16)], parallel.batch_sharded(mesh, 1))
        arrays, statistics, totals, run = (fit.train_feed.arrays, fit.statistics,
                                           group.zero_totals(runs), fit.train_step)
        if layout == "sharded":
            mesh = parallel.data_mesh()
            by_run = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
            state, totals, rows = jax.device_put((state, totals, rows), by_run)
            arrays, statistics = parallel.put_replicated((arrays, statistics), mesh)
            solo = steps.train_step_function(
                fit.graphdef, group.group_optimizer(members[0].config, 16), None,
                members[0].config.microbatch_size, loss=steps.LossOptions.of(members[0].config))
            run = jax.jit(jax.vmap(solo, in_axes=(0, None, 0, None, None, 0)),
                          donate_argnums=0, out_shardings=(by_run, by_run),
                          compiler_options=steps.compiler_options(mesh))
        step = lambda state, totals, i: run(  # noqa: E731
            state, statistics, totals, *arrays, rows[i % len(rows)])
    state, totals = step(state, totals, 0)
    jax.block_until_ready(totals)
    started = time.perf_counter()
    for i in range(1, timed + 1):
        state, totals = step(state, totals, i)
    jax.block_until_ready(totals)
    seconds = (time.perf_counter() - started) / timed
    return {"layout": layout, "runs": 1 if layout == "solo" else runs,
            "devices": jax.device_count(), "seconds_per_step": seconds,
            "loss_sums": np.asarray(totals.sums["loss"]).ravel()[:2].tolist()}


def prepare_group(group_configs, train_set, validation_set, mesh):
    """The loop's fit of a group (compiled step, feeds, stacked state), nothing written."""
    from vit_flax.models import create_model
    from vit_flax.training import group, loop

    members = [loop.Member(c, Path("unused"), group.run_name(c)) for c in group_configs]
    models = [create_model(c, train_set.images) for c in group_configs]
    return loop.prepare_fit(members, models, train_set, validation_set, mesh, stacked=True)


def analysis(compiled) -> dict[str, int]:
    memory = compiled.memory_analysis()
    return {name: int(getattr(memory, f"{name}_size_in_bytes"))
            for name in ("argument", "output", "alias", "temp")}


def in_subprocess(part: str, args, devices: int = 1) -> dict:
    command = [sys.executable, __file__, "--part", part, "--images", str(args.images),
               "--epochs", str(args.epochs), "--runs", *map(str, args.runs)]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    before = os.getloadavg()[0]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if completed.returncode:
        sys.exit(f"{part} failed:\n{completed.stderr[-3000:]}")
    print(f"[{part}: load average {before:.1f} before, {os.getloadavg()[0]:.1f} after]")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def report(args) -> None:
    solo_times = in_subprocess("solo", args)["cumulative"]
    groups = {runs: in_subprocess(f"group{runs}", args) for runs in args.runs}
    print(f"{'runs':>4} {'solo wall':>10} {'group wall':>11} {'ratio':>6} {'solo CPU':>9} "
          f"{'group CPU':>10} {'ratio':>6} {'group compile':>14}")
    for runs, together in groups.items():
        wall, cpu = solo_times[runs - 1]
        print(f"{runs:>4} {wall:>9.1f}s {together['seconds']:>10.1f}s "
              f"{together['seconds'] / wall:>6.2f} {cpu:>8.1f}s {together['cpu']:>9.1f}s "
              f"{together['cpu'] / cpu:>6.2f} {together['compile_seconds']:>13.1f}s")
    sizes = in_subprocess("memory", args)
    print(f"\nstep memory (memory_analysis, MiB): solo step temp "
          f"{sizes['solo']['temp'] / 2**20:.1f}, arguments {sizes['solo']['argument'] / 2**20:.1f}")
    print(f"{'runs':>4} {'temp':>8} {'temp/run':>9} {'arguments':>10} {'outputs':>8} "
          f"{'aliased':>8}")
    for runs, size in sizes["group"].items():
        print(f"{runs:>4} {size['temp'] / 2**20:>8.1f} {size['temp'] / 2**20 / int(runs):>9.1f}"
              f" {size['argument'] / 2**20:>10.1f} {size['output'] / 2**20:>8.1f}"
              f" {size['alias'] / 2**20:>8.1f}")


def report_steps(args) -> None:
    solo = in_subprocess("step-solo", args)
    rows = [solo, in_subprocess("step-group", args), in_subprocess("step-sharded", args, 2)]
    print(f"{'layout':>8} {'runs':>4} {'devices':>7} {'s/step':>7} {'s/run-step':>10} "
          f"{'vs solo':>7}  loss sums of the first runs")
    for row in rows:
        per_run = row["seconds_per_step"] / row["runs"]
        print(f"{row['layout']:>8} {row['runs']:>4} {row['devices']:>7} "
              f"{row['seconds_per_step']:>7.3f} {per_run:>10.3f} "
              f"{per_run / solo['seconds_per_step']:>7.2f}  {row['loss_sums']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--images", type=int, default=384, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--agreement", action="store_true",
                        help="only the group-vs-solo agreement, on 1 and 2 devices")
    parser.add_argument("--steps", action="store_true",
                        help="only the train step's time: solo, group, runs over 2 devices")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agreement:
        for devices in (1, 2):
            print(json.dumps(in_subprocess("agreement", args, devices)))
    elif args.steps:
        report_steps(args)
    elif args.part is None:
        report(args)
    elif args.part == "agreement":
        print(json.dumps(agreement()))
    elif args.part == "solo":
        print(json.dumps(solo(max(args.runs), args.images, args.epochs)))
    elif args.part.startswith("step-"):
        print(json.dumps(step_seconds(args.part[len("step-"):], max(args.runs))))
    elif args.part == "memory":
        print(json.dumps(memory([1, 2, 4, 8], args.images)))
    else:
        print(json.dumps(group(int(args.part[len("group"):]), args.images, args.epochs)))


if __name__ == "__main__":
    main()
