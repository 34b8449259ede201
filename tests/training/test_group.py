"""vit_flax.training.group: runs trained together under vmap are their solo runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from conftest import TINY, random_images, xla_flags

import vit_flax
from vit_flax.data import sources as data
from vit_flax.infra import workdir as layout
from vit_flax.training import feeds, group, loop, optim
from vit_flax.training.loop import train_group
from vit_flax.training.setup import create_train_state

CONFIG = vit_flax.ViTConfig(**TINY, epochs=2)
# Two seeds of the seed's recipe and a learning rate that diverges in its first step.
RUNS = [CONFIG.replace(seed=0), CONFIG.replace(seed=1), CONFIG.replace(learning_rate=1e30)]
NAMES = [group.run_name(config) for config in RUNS]
METRICS = ("loss", "accuracy", "top-5-accuracy", "val_loss", "val_accuracy",
           "val_top-5-accuracy")
quiet = lambda _: None  # noqa: E731


def small_problem() -> data.Splits:
    labels = np.arange(48) % 3
    return data.from_arrays(random_images(48, 8), labels, random_images(9, 8, 1), labels[:9])


def history(run_dir: Path) -> list[list[float]]:
    rows = json.loads((run_dir / "history.json").read_text())
    return [[row[name] for name in METRICS] for row in rows]  # Timings left out.


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("group")
    lines: list[str] = []
    summary = train_group(RUNS, small_problem(), workdir, log=lines.append)
    return workdir, summary, lines


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """The solo `vit_flax.train` runs of the two seeds."""
    workdir = tmp_path_factory.mktemp("solo")
    for config in RUNS[:2]:
        vit_flax.train(config, small_problem(), workdir / str(config.seed), log=quiet)
    return [history(workdir / str(config.seed)) for config in RUNS[:2]]


@pytest.mark.slow
def test_configs_that_differ_in_more_than_seed_and_rates_are_refused(tmp_path):
    with pytest.raises(vit_flax.ConfigError, match=r"differ only in seed, learning_rate, "
                       r"weight_decay: config 1 has batch_size=16, config 0 batch_size=8"):
        train_group([CONFIG, CONFIG.replace(seed=1, batch_size=16)], small_problem(),
                          tmp_path)
    with pytest.raises(vit_flax.ConfigError, match="seed0_lr0.001_wd0.0001 more than once"):
        train_group([CONFIG, CONFIG], small_problem(), tmp_path)
    assert not any(tmp_path.iterdir())


def optimizer_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("schedule", [{}, {"schedule": "cosine", "warmup_epochs": 1.0}])
def test_the_group_optimizer_is_the_solo_optimizer_of_each_run(schedule):
    # Two runs' learning rates and weight decays as state, vmapped, against optim.for_config
    # of each run's config, jitted alone: 6 steps (2 epochs of 3) on random float32 gradients.
    configs = [CONFIG.replace(**schedule), CONFIG.replace(learning_rate=3e-2, weight_decay=0.5,
                                                          **schedule)]
    rng = np.random.default_rng(0)
    params = rng.uniform(-1, 1, (2, 4, 3)).astype(np.float32)
    grads = rng.normal(size=(6, 2, 4, 3)).astype(np.float32)
    state = group.stack([group.group_optimizer(config, 3).init(params[i])
                         for i, config in enumerate(configs)])
    # One optimizer serves every run: it reads the numbers from each run's state.
    step = jax.jit(jax.vmap(optimizer_step(group.group_optimizer(configs[0], 3))))
    grouped = params
    for g in grads:
        grouped, state = step(grouped, state, g)
    for i, config in enumerate(configs):
        solo_tx = optim.for_config(config, 3)
        solo, solo_state, solo_step = params[i], solo_tx.init(params[i]), jax.jit(
            optimizer_step(solo_tx))
        for g in grads:
            solo, solo_state = solo_step(solo, solo_state, g[i])
        # Measured: bit-identical on this CPU, constant and scheduled rates (1 ulp apart
        # when the solo update and its application are jitted separately: another fusion).
        np.testing.assert_array_equal(grouped[i], solo)


@pytest.mark.slow
def test_each_run_is_its_solo_run(grouped, solo):
    workdir = grouped[0]
    together = [history(workdir / "runs" / name) for name in NAMES[:2]]
    # Measured on this CPU: identical, every metric of every epoch (the vmapped program
    # computes each run's arithmetic in the same order). The stated tolerance for the first
    # epoch's loss is float32 round-off of a differently fused program, 1e-5 relative.
    for mine, alone in zip(together, solo, strict=True):
        assert mine[0][0] == pytest.approx(alone[0][0], rel=1e-5)
    # The whole history within seed-to-seed noise: closer to its solo run than the two
    # seeds' solo runs are to each other, metric by metric.
    noise = np.abs(np.subtract(*solo)).max(axis=0)
    for mine, alone in zip(together, solo, strict=True):
        assert (np.abs(np.subtract(mine, alone)).max(axis=0) <= noise).all()


@pytest.mark.slow
def test_each_run_directory_is_a_run_and_the_summary_averages_over_seeds(grouped):
    workdir, summary, lines = grouped
    splits = small_problem()
    for name, config in zip(NAMES[:2], RUNS[:2], strict=True):
        model, loaded_config = vit_flax.load(workdir / "runs" / name)
        assert loaded_config == config
        results = json.loads((workdir / "runs" / name / "results.json").read_text())
        # The best checkpoint is this run's weights: its test accuracy is the results'.
        predicted = np.argmax(vit_flax.predict(model, splits.test.images), -1)
        assert (predicted == splits.test.labels).mean() == pytest.approx(
            results["test_accuracy"])
        assert summary["runs"][name]["test_accuracy"] == results["test_accuracy"]
    assert json.loads((workdir / "summary.json").read_text()) == summary
    seeds = summary["over_seeds"][0]
    accuracies = [summary["runs"][name]["test_accuracy"] for name in NAMES[:2]]
    assert (seeds["learning_rate"], seeds["seeds"]) == (1e-3, [0, 1])
    assert seeds["test_accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert seeds["test_accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert summary["step_memory_bytes"] > 0
    assert "learning_rate=0.001 weight_decay=0.0001, seeds [0, 1]: test accuracy" in lines[-1]


@pytest.mark.slow
def test_a_non_finite_run_stops_alone(grouped):
    workdir, summary, lines = grouped
    stopped = workdir / "runs" / NAMES[2]
    results = json.loads((stopped / "results.json").read_text())
    assert results["stopped"] == summary["runs"][NAMES[2]]["stopped"]
    assert results["stopped"].startswith("the training loss became non-finite at step")
    assert "(epoch 1); the run keeps epoch 0, the last finite one" in results["stopped"]
    assert (results["best_epoch"], results["test_accuracy"]) == (0, None)
    assert json.loads((stopped / "history.json").read_text()) == []
    assert any(line.endswith("the other runs go on") for line in lines)
    assert [len(history(workdir / "runs" / name)) for name in NAMES[:2]] == [2, 2]


@pytest.mark.slow
def test_sigterm_stops_the_group_and_it_resumes_bit_exactly(grouped, tmp_path):
    def log(line):  # SIGTERM once epoch 1 is recorded: it lands before epoch 2's first step.
        if line.startswith(f"{NAMES[1]}: Epoch 1/2"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(vit_flax.Interrupted, match="SIGTERM: stopped in epoch 2; .* holds "
                       "epoch 1: run the same command to resume"):
        train_group(RUNS, small_problem(), tmp_path, log=log)
    lines: list[str] = []
    summary = train_group(RUNS, small_problem(), tmp_path, log=lines.append)
    assert any(line.startswith("Resuming") for line in lines)
    for name in NAMES:
        assert history(tmp_path / "runs" / name) == history(grouped[0] / "runs" / name)
    assert summary["runs"] == grouped[1]["runs"]  # The stopped run stays stopped, too.


@pytest.mark.slow
def test_another_group_in_the_workdir_is_refused(grouped):
    with pytest.raises(vit_flax.ConfigError, match="holds another group .*overwrite=True"):
        train_group([CONFIG.replace(seed=5)], small_problem(), grouped[0])


@pytest.mark.slow
def test_when_every_run_stops_the_group_stops(tmp_path):
    with pytest.raises(FloatingPointError, match=r"every run of the group stopped: seed0_lr1e"
                       r"\+30_wd0.0001: the training loss became non-finite"):
        train_group(RUNS[2:], small_problem(), tmp_path, log=quiet)


def test_a_group_that_does_not_fit_says_how_many_runs_would(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(group, "device_memory_limit", lambda mesh: 10 * gib)
    group.check_fits(10 * gib, 8, gib, mesh=None)
    # 1 GiB of data and 2 GiB per run: 17 GiB for 8 runs; 4 fit in 10 GiB.
    with pytest.raises(vit_flax.ConfigError, match=r"^a group of 8 runs needs about 17.00 GiB "
                       r"per device .* 10.00 GiB a device has; about 4 runs fit in one group"):
        group.check_fits(17 * gib, 8, gib, mesh=None)


TWO_DEVICES = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]
    from test_group import RUNS, NAMES, history, small_problem
    import jax
    from vit_flax.training.loop import train_group
    summary = train_group(RUNS[:2], small_problem(), sys.argv[2], log=lambda _: None)
    print(json.dumps({"devices": summary["devices"], "count": jax.device_count(),
                      "histories": [history(Path(sys.argv[2]) / "runs" / name)
                                    for name in NAMES[:2]]}))
""")


@pytest.mark.slow
def test_two_devices_train_the_group_like_one(grouped, tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags(2),
               JAX_PLATFORMS="cpu")
    completed = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES, str(Path(__file__).parent), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["devices"] == report["count"] == 2
    # Each run's batch split over the 2 devices, its gradient summed across them in another
    # order: float32 round-off, far inside 1e-3 relative (as tests/infra/test_parallel.py).
    for name, two in zip(NAMES[:2], report["histories"], strict=True):
        one = history(grouped[0] / "runs" / name)
        np.testing.assert_allclose(two, one, rtol=1e-3)


def test_each_run_of_each_epoch_gathers_its_own_seeds_order():
    # The group's index rows, epoch by epoch: run i's are its solo run's (epoch_order of its
    # seed and that epoch), a stopped run's all padding. A fixed epoch or one run's order for
    # all would stay inside test_each_run_is_its_solo_run's seed-to-seed noise.
    from types import SimpleNamespace

    members = [loop.Member(config, Path("unused"), name) for name, config in zip(
        NAMES, RUNS, strict=True)]
    members[2].stopped = "non-finite loss"
    fit = SimpleNamespace(members=members, stacked=True, train_feed=SimpleNamespace(size=20))
    seen = []
    for epoch in (1, 2):
        rows = feeds.index_rows(loop.epoch_orders(fit, epoch), CONFIG.batch_size)
        for run in (0, 1):
            expected = data.batch_indices(data.epoch_order(20, RUNS[run].seed, epoch),
                                          CONFIG.batch_size)
            np.testing.assert_array_equal(rows[:, run], expected)
            seen.append(rows[:, run])
        assert (rows[:, 2] == -1).all()
    # Two seeds, two epochs: four different orders.
    assert len({order.tobytes() for order in seen}) == 4


@pytest.mark.slow
def test_group_runs_have_the_solo_runs_figures_logs_and_data_record(grouped):
    workdir, _, lines = grouped
    for name in NAMES[:2]:
        run = workdir / "runs" / name
        for figure in ("patches.png", "attention.png", "loss.png", "top-5-accuracy.png"):
            assert (run / figure).stat().st_size > 0, (name, figure)
        assert any((run / "tensorboard").iterdir())
        assert json.loads((run / "data.json").read_text())["class_names"] == ["0", "1", "2"]
    assert any(line.startswith(f"{NAMES[0]}: Test accuracy: ") for line in lines)


def test_each_run_starts_with_its_own_learning_rate_and_weight_decay():
    # A group state built with the first run's hyperparameters for every run would still
    # train (and its optimizer test pass): the stacked state itself must differ per run.
    configs = [CONFIG, CONFIG.replace(seed=1, learning_rate=3e-2, weight_decay=0.5)]
    setup = create_train_state(configs, random_images(16, 8), steps_per_epoch=2)
    hyperparams = setup.state.opt_state.hyperparams
    np.testing.assert_allclose(hyperparams["learning_rate"], [1e-3, 3e-2], rtol=1e-7)
    np.testing.assert_allclose(hyperparams["weight_decay"], [1e-4, 0.5], rtol=1e-7)


@pytest.mark.slow
def test_a_group_resumed_with_its_lists_in_another_order_keeps_each_run_its_own(grouped,
                                                                              tmp_path):
    # Seeds 0,1 for one epoch, then 1,0 for two: each run's history is still its own.
    pair = [RUNS[0].replace(epochs=1), RUNS[1].replace(epochs=1)]
    train_group(pair, small_problem(), tmp_path, log=quiet)
    swapped = [RUNS[1], RUNS[0]]
    summary = train_group(swapped, small_problem(), tmp_path, log=quiet)
    for name in NAMES[:2]:
        assert history(tmp_path / "runs" / name) == history(grouped[0] / "runs" / name)
    assert list(summary["runs"]) == NAMES[:2]  # The order the group was saved in.


@pytest.mark.slow
def test_a_marker_naming_a_run_outside_the_group_is_refused_and_nothing_is_deleted(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    workdir = tmp_path / "a" / "b"
    workdir.mkdir(parents=True)
    (workdir / layout.GROUP_MARKER).write_text(json.dumps(
        {"vit_flax": "group", "runs": {"../../victim": {}}}))
    with pytest.raises(vit_flax.ConfigError, match=r"names a run '\.\./\.\./victim', which is "
                       r"not a run name"):
        train_group(RUNS[:2], small_problem(), workdir, log=quiet, overwrite=True)
    assert (victim / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_group_marker_of_a_newer_format_is_refused(tmp_path):
    (tmp_path / layout.GROUP_MARKER).write_text(json.dumps(
        {"vit_flax": "group", "format": group.GROUP_FORMAT + 1, "runs": {}}))
    with pytest.raises(vit_flax.ConfigError, match=rf"format {group.GROUP_FORMAT + 1}, written "
                       rf"by another vit_flax; this one reads formats 1-{group.GROUP_FORMAT}"):
        train_group(RUNS[:2], small_problem(), tmp_path, log=quiet)


@pytest.mark.slow
def test_a_refused_group_resume_rewrites_no_config(grouped):
    # The group holds 2 epochs: a run asking for 1 is refused, and its runs' config.json
    # still say 2 (they were once rewritten before the check refused).
    workdir = grouped[0]
    before = {name: (workdir / "runs" / name / "config.json").read_text() for name in NAMES}
    with pytest.raises(vit_flax.ConfigError, match="holds 2 trained epochs, more than epochs=1"):
        train_group([config.replace(epochs=1) for config in RUNS], small_problem(), workdir,
                    log=quiet)
    assert {name: (workdir / "runs" / name / "config.json").read_text()
            for name in NAMES} == before
