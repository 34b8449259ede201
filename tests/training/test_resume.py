"""Checkpoint and resume: a run stopped at any point, started again, ends as the run never
interrupted. Each stop is made deterministic: train.py runs in a subprocess with one stop
point patched in (`stopped_main`), which creates a marker file when the process gets there
and waits to be killed (or sends itself SIGTERM, or finds the disk full)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, TINY_FLAGS, random_images, write_image_folder

import vit_flax
from vit_flax.data import sources as data
from vit_flax.infra import checkpoints
from vit_flax.training import loop as trainer
from vit_flax.training import steps

pytestmark = pytest.mark.slow  # Trains end to end, or starts processes.

REPO = Path(__file__).resolve().parents[2]
METRICS = ("epoch", "loss", "accuracy", "top-5-accuracy", "val_loss", "val_accuracy",
           "val_top-5-accuracy")
EPOCHS = 5
STOP, MARKER = "VIT_FLAX_TEST_STOP", "VIT_FLAX_TEST_MARKER"


# --- In the subprocess: train.py's main with one stop point.

def reached() -> None:
    """Tell the test that this process is where it is to be killed, and wait for that."""
    Path(os.environ[MARKER]).touch()
    time.sleep(600)


def while_compiling(_epoch: int) -> None:
    def make_train_step(*_args, **_kwargs):
        reached()

    steps.make_train_step = make_train_step


def before_orbax_commits(epoch: int) -> None:
    """orbax has written the step into its temporary directory, not yet renamed it."""
    from orbax.checkpoint.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held(self):
        if self.get_final().parent.name == "run_state" and self.get_final().name == str(epoch):
            reached()
        await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = held


def before_the_manifest(epoch: int) -> None:
    """orbax has committed the step; its manifest is not written yet."""
    write_manifest = checkpoints._write_manifest

    def held(directory: Path) -> None:
        if directory.name == str(epoch):
            reached()
        write_manifest(directory)

    checkpoints._write_manifest = held


def between_the_best_model_renames(_epoch: int) -> None:
    """The old best model is renamed aside; the new one is not yet renamed into place."""
    replace = os.replace

    def held(source, target, *args, **kwargs):
        replace(source, target, *args, **kwargs)
        if str(target).endswith(checkpoints.ASIDE_SUFFIX):
            reached()

    os.replace = held


def with_the_disk_full_at(epoch: int) -> None:
    """orbax's writes into the temporary directory of the step `epoch` fail: disk full."""
    from etils import epath

    write_text = epath.gpath.PosixGPath.write_text

    def full(self, *args, **kwargs):
        if f"/run_state/{epoch}." in str(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, *args, **kwargs)

    epath.gpath.PosixGPath.write_text = full


def at_batch_2_of(epoch: int, action) -> None:
    train_epoch = trainer.train_epoch

    def patched(fit, state, current, *args):
        if current == epoch:
            batches = fit.train_feed.batches

            def acting(order, batch_size, start=0):
                for i, batch in enumerate(batches(order, batch_size, start), start):
                    if i == 2:
                        action()
                    yield batch

            fit.train_feed.batches = acting
        return train_epoch(fit, state, current, *args)

    trainer.train_epoch = patched


STOPS = {
    "compiling": while_compiling, "orbax-commit": before_orbax_commits,
    "manifest": before_the_manifest, "best-swap": between_the_best_model_renames,
    "disk-full": with_the_disk_full_at,
    "in-epoch": lambda epoch: at_batch_2_of(epoch, reached),
    "sigterm": lambda epoch: at_batch_2_of(epoch, lambda: os.kill(os.getpid(), signal.SIGTERM)),
}


def stopped_main() -> int:
    """train.py's main, with the stop point $VIT_FLAX_TEST_STOP ("kind epoch") patched in."""
    kind, epoch = os.environ[STOP].split()
    STOPS[kind](int(epoch))
    sys.path.insert(0, str(REPO))
    import train

    return train.main(sys.argv[1:])


# --- In the tests.

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), train_per_class=40,
                              test_per_class=4)


@pytest.fixture(scope="module")
def environment() -> dict:
    # $VIT_FLAX_CACHE is the session's compilation cache (conftest): these runs load the
    # programs the first compiled, as do other files' runs of the same programs.
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def arguments(folder: Path, workdir: Path) -> list[str]:
    return [*TINY_FLAGS, "--dataset", "folder", "--data-dir", str(folder), "--epochs",
            str(EPOCHS), "--workdir", str(workdir)]


def train_py(folder: Path, workdir: Path, environment: dict,
             *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *arguments(folder, workdir),
                           *extra],
                          env=environment, capture_output=True, text=True, timeout=600)


def stopped(folder: Path, workdir: Path, environment: dict, stop: str, *extra: str):
    """Run train.py with the stop point `stop`; SIGKILL it once it gets there (unless it
    ends by itself first). Returns (exit status, stdout, stderr)."""
    marker = workdir.with_name(workdir.name + ".marker")
    marker.unlink(missing_ok=True)
    paths = [str(REPO / "tests" / "training"), str(REPO / "tests")]
    code = (f"import sys; sys.path[:0] = {paths!r}; import test_resume; "
            f"sys.exit(test_resume.stopped_main())")
    process = subprocess.Popen([sys.executable, "-c", code, *arguments(folder, workdir), *extra],
                               env=dict(environment, **{STOP: stop, MARKER: str(marker)}),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not marker.exists() and process.poll() is None:
        assert time.monotonic() < deadline, f"train.py never reached {stop}"
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


def metrics(workdir: Path) -> list[list[float]]:
    history = json.loads((workdir / "history.json").read_text())
    return [[row[name] for name in METRICS] for row in history]  # Timings left out.


def first_best_epoch(workdir: Path) -> int:
    """ModelCheckpoint(save_best_only): the first epoch of the highest val_accuracy."""
    accuracies = [row["val_accuracy"] for row in json.loads(
        (workdir / "history.json").read_text())]
    return accuracies.index(max(accuracies)) + 1


def outcome(workdir: Path) -> dict:
    """What a finished run reports: its test metrics and best epoch."""
    results = json.loads((workdir / "results.json").read_text())
    return {name: results[name] for name in ("best_epoch", "test_loss", "test_accuracy")}


def debris(workdir: Path) -> list[str]:
    return sorted(p.name for p in workdir.rglob("*")
                  if re.search(r"orbax-checkpoint-tmp|vit_flax-(new|old)|\.partial$", p.name))


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory, environment):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    completed = train_py(folder, workdir, environment)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert outcome(workdir)["best_epoch"] == first_best_epoch(workdir)
    return metrics(workdir), outcome(workdir)


def resumed_after(stdout: str) -> int | None:
    found = re.search(r"^Resuming .* after epoch (\d+)$", stdout, re.MULTILINE)
    return found and int(found.group(1))


def warnings(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("warning:")]


# Stopped again and again, in this order; each run resumes from what the one before left:
# (stop point, the epoch the run resumes after, the warnings it prints).
CHAIN = [
    ("compiling 0", None, []),  # Nothing is saved yet.
    ("orbax-commit 1", None, []),  # orbax's temporary directory of epoch 1 is left.
    ("manifest 2", None, []),  # Epoch 2 is committed by orbax, without its manifest.
    ("best-swap 0", 1, [r"epoch 2 .*: it has no vit_flax-manifest\.json"]),  # In epoch 3.
    ("disk-full 4", 2, []),  # Epoch 3 finishes the interrupted swap; epoch 4 is not saved.
    ("in-epoch 5", 3, []),  # Killed while training epoch 5.
]


def stopped_where_meant(workdir: Path, stop: str) -> bool:
    """What the kill left shows it came at the stop point (for the stops inside a write)."""
    run_state, best = workdir / "run_state", workdir / "best_checkpoint"
    if stop == "orbax-commit 1":  # Written into orbax's temporary directory, not renamed.
        return any(run_state.glob("1.orbax-checkpoint-tmp*")) and not (run_state / "1").exists()
    if stop == "manifest 2":
        step = run_state / "2"
        return (step / "state").is_dir() and not (step / checkpoints.MANIFEST).exists()
    if stop == "best-swap 0":
        return not best.exists() and best.with_name(best.name + checkpoints.ASIDE_SUFFIX).is_dir()
    return True


def check_stopped_run(workdir: Path, stop: str, after, patterns, run) -> None:
    code, stdout, stderr = run
    assert stopped_where_meant(workdir, stop), (stop, sorted(os.listdir(workdir)))
    assert resumed_after(stdout) == after, (stop, stdout, stderr[-2000:])
    assert len(warnings(stdout)) == len(patterns), (stop, stdout)
    for pattern, line in zip(patterns, warnings(stdout), strict=True):
        assert re.search(pattern, line), (stop, line)
    if stop.startswith("disk-full"):
        assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
        assert stderr.splitlines()[-1] == (
            f"error: cannot save epoch 4 in {workdir / 'run_state'} (No space left on device); "
            f"epoch 3 stays saved: free space (or fix permissions), then run the same command "
            f"to resume")
    else:
        assert code == -signal.SIGKILL, (stop, stderr[-2000:])


def corrupt_the_newest_step(run_state: Path) -> str:
    """Flip one byte of the largest array data file of the newest step; its name."""
    step = run_state / str(max(int(p.name) for p in run_state.iterdir()))
    data_files = [p for p in step.rglob("*") if p.is_file() and p.parent.name == "d"]
    path = max(data_files, key=lambda p: p.stat().st_size)
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))
    return path.relative_to(step).as_posix()


def improving_epochs(rows: list[list[float]]) -> list[int]:
    """The epochs whose val_accuracy beats every one before (the best model is saved)."""
    scores = [row[METRICS.index("val_accuracy")] for row in rows]
    return [i + 1 for i, score in enumerate(scores) if score > max(scores[:i], default=-1)]


def test_stopped_at_each_point_then_resumed_gives_the_uninterrupted_history(
        folder, tmp_path, environment, uninterrupted):
    assert improving_epochs(uninterrupted[0])[:2] == [1, 3], "CHAIN expects a new best at 3"
    for stop, after, patterns in CHAIN:
        check_stopped_run(tmp_path, stop, after, patterns,
                          stopped(folder, tmp_path, environment, stop))
        if stop.startswith("best-swap"):  # Even now, a complete best model is there to load.
            config = vit_flax.ViTConfig.from_json((tmp_path / "config.json").read_text())
            checkpoints.restore_model(tmp_path / "best_checkpoint", config)
    flipped = corrupt_the_newest_step(tmp_path / "run_state")  # Epoch 4.
    completed = train_py(folder, tmp_path, environment)
    assert completed.returncode == 0 and "Traceback" not in completed.stderr, completed.stderr
    assert warnings(completed.stdout) == [
        f"warning: skipping the checkpoint of epoch 4 ({tmp_path / 'run_state' / '4'}): "
        f"checksum mismatch in {flipped}; deleted it"]
    assert resumed_after(completed.stdout) == 3
    assert (metrics(tmp_path), outcome(tmp_path)) == uninterrupted  # Bit for bit, on the CPU.
    assert debris(tmp_path) == [] and sorted(os.listdir(tmp_path / "run_state")) == ["4", "5"]


def test_sigterm_stops_cleanly_and_resumes(folder, tmp_path, environment, uninterrupted):
    code, stdout, stderr = stopped(folder, tmp_path, environment, "sigterm 2")
    assert code == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.splitlines()[-1] == (f"interrupted: SIGTERM: stopped in epoch 2; {tmp_path} "
                                       f"holds epoch 1: run the same command to resume")
    assert len(json.loads((tmp_path / "history.json").read_text())) == 1
    assert os.listdir(tmp_path / "run_state") == ["1"]
    completed = train_py(folder, tmp_path, environment)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert resumed_after(completed.stdout) == 1
    assert (metrics(tmp_path), outcome(tmp_path)) == uninterrupted


def test_a_run_killed_mid_epoch_resumes_at_its_last_step_checkpoint(folder, tmp_path,
                                                                   environment, uninterrupted):
    # 108 training images, batches of 8: 14 steps an epoch, a checkpoint every 2 of them.
    # Killed while batch 2 of epoch 2 is fetched: steps 0 and 1 are done and saved.
    code, _, stderr = stopped(folder, tmp_path, environment, "in-epoch 2",
                              "--checkpoint-every", "2")
    assert code == -signal.SIGKILL, stderr[-2000:]
    completed = train_py(folder, tmp_path, environment)  # The flag is not needed to resume.
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert re.search(r"^Resuming .* after epoch 1, at step 2 of epoch 2$", completed.stdout,
                     re.MULTILINE), completed.stdout
    # The remaining batches, keys and the epoch's running sums as the uninterrupted run had
    # them: the same history and results, bit for bit on the CPU.
    assert (metrics(tmp_path), outcome(tmp_path)) == uninterrupted


def small_problem():
    labels = np.arange(48) % 3
    return data.from_arrays(random_images(48, 8), labels, random_images(9, 8, 1), labels[:9])


def test_a_workdir_of_another_config_is_refused_unless_overwrite(tmp_path):
    config = vit_flax.ViTConfig(**TINY, epochs=1)
    quiet = lambda _: None  # noqa: E731
    vit_flax.train(config, small_problem(), tmp_path, log=quiet)
    # Another seed: another run, trained by the same program (one compile for the test).
    other = config.replace(seed=7)
    with pytest.raises(vit_flax.ConfigError, match=r"differs in seed\);.*overwrite=True"):
        vit_flax.train(other, small_problem(), tmp_path, log=quiet)
    vit_flax.train(other, small_problem(), tmp_path, log=quiet, overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 7
    # More epochs is not another run: it continues this one.
    results = vit_flax.train(other.replace(epochs=3), small_problem(), tmp_path, log=quiet,
                             keep_checkpoints=1)
    assert len(json.loads((tmp_path / "history.json").read_text())) == 3
    assert results["best_epoch"] == first_best_epoch(tmp_path)
    assert sorted(p.name for p in (tmp_path / "run_state").iterdir()) == ["3"]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_epoch(tmp_path):
    config = vit_flax.ViTConfig(**TINY, epochs=3, learning_rate=1e30)
    with pytest.raises(FloatingPointError,
                       match=r"non-finite at step \d+ \(epoch 1\).*keeps epoch 0"):
        vit_flax.train(config, small_problem(), tmp_path, log=lambda _: None)
    assert not (tmp_path / "run_state").exists() or \
        not any((tmp_path / "run_state").iterdir())


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `directory` (TFRecord framing:
    length, its CRC, an Event protobuf, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.iterdir()):
        payload = path.read_bytes()
        offset = 0
        while offset < len(payload):
            length = int.from_bytes(payload[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(payload[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_events_per_epoch_and_per_step(tmp_path):
    config = vit_flax.ViTConfig(**TINY, epochs=2)
    vit_flax.train(config, small_problem(), tmp_path, log=lambda _: None, log_every=2)
    scalars = read_scalars(tmp_path / "tensorboard")
    history = json.loads((tmp_path / "history.json").read_text())
    for split, prefix in (("train", ""), ("validation", "val_")):
        for metric in ("loss", "accuracy", "top-5-accuracy"):
            logged = scalars[f"{split}/{metric}"]
            assert [step for step, _ in logged] == [1, 2]
            np.testing.assert_allclose([value for _, value in logged],
                                       [row[prefix + metric] for row in history], rtol=1e-6)
    assert [value for _, value in scalars["train/learning_rate"]] == pytest.approx([1e-3] * 2)
    assert len(scalars["train/epoch_seconds"]) == 2
    # 43 training examples at batch 8: 6 steps an epoch, logged at steps 2 and 4 of each.
    assert [step for step, _ in scalars["step/loss"]] == [2, 4, 8, 10]
