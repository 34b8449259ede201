"""Checkpoints are verified before use: each corruption is made here, and what the user then
sees is checked (the one line, the epoch it goes back to, the error)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, random_images
from etils import epath
from flax import nnx

import vit_flax
from vit_flax.data import sources as data
from vit_flax.infra import checkpoints
from vit_flax.infra.checkpoints import MANIFEST, CheckpointError, RunCheckpoints, RunProgress
from vit_flax.models.seed_vit import ViT
from vit_flax.training import optim, steps

FULL = "No space left on device"
NO_MANIFEST = f"it has no {MANIFEST} (its save did not finish, or an older vit_flax wrote it)"


@pytest.fixture(scope="module")
def config():
    return vit_flax.ViTConfig(**TINY)


@pytest.fixture(scope="module")
def template(config):
    _, params, _ = steps.split_model(ViT(config, rngs=nnx.Rngs(0)))
    return steps.TrainState.create(params, optim.for_config(config, steps_per_epoch=6), config)


def state_of(template, epoch: int):
    """A train state that differs in every array from those of the other epochs."""
    def shift(tree):
        return jax.tree.map(lambda x: x + epoch, tree)

    return template.replace(step=template.step + epoch, params=shift(template.params),
                            opt_state=shift(template.opt_state),
                            rng=jax.random.fold_in(template.rng, epoch))


def arrays(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(
        (state.step, state.params, state.opt_state, jax.random.key_data(state.rng)))]


def assert_identical(state, expected) -> None:
    for got, want in zip(arrays(state), arrays(expected), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def save_epochs(directory: Path, states: dict, keep: int = 2) -> None:
    saver = RunCheckpoints(directory, keep, log=pytest.fail)
    for epoch, state in states.items():
        saver.save(state, RunProgress(epoch=epoch, history=[{"epoch": e} for e in
                                                             range(1, epoch + 1)]))
    saver.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, template):
    """run_state with epochs 1 and 2, as the trainer leaves it."""
    directory = tmp_path_factory.mktemp("pristine") / "run_state"
    save_epochs(directory, {1: state_of(template, 1), 2: state_of(template, 2)})
    return directory


@pytest.fixture
def run_state(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "run_state"))


def resume(directory: Path, template, keep: int = 2):
    """What restore_latest returns, and the lines it logged."""
    lines = []
    saver = RunCheckpoints(directory, keep, log=lines.append)
    restored = saver.restore_latest(template)
    saver.close()
    return restored, lines


def skipped_line(directory: Path, epoch: int, reason: str) -> str:
    return f"warning: skipping the checkpoint of epoch {epoch} ({directory / str(epoch)}): " \
           f"{reason}; deleted it"


def files_of(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file())


def flip(path: Path, offset: int) -> None:
    payload = bytearray(path.read_bytes())
    payload[offset] ^= 0xFF
    path.write_bytes(bytes(payload))


def debris(root: Path) -> list[str]:
    """What a failed or killed save may leave: orbax's and vit_flax's temporary names."""
    return sorted(p.name for p in root.rglob("*")
                  if re.search(r"orbax-checkpoint-tmp|vit_flax-(new|old)|\.partial$", p.name))


def test_the_manifest_lists_every_file_with_its_size_and_sha256(run_state, template):
    step = run_state / "2"
    manifest = json.loads((step / MANIFEST).read_text())
    assert manifest["format"] == checkpoints.MANIFEST_FORMAT
    assert sorted(manifest["files"]) == [name for name in files_of(step) if name != MANIFEST]
    assert any(name.startswith("state/") for name in manifest["files"])
    for name, entry in manifest["files"].items():
        payload = (step / name).read_bytes()
        assert entry == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (restored, progress), lines = resume(run_state, template)
    assert lines == [] and progress.epoch == 2
    assert_identical(restored, state_of(template, 2))


def flips(step: Path) -> list[tuple[str, int]]:
    """Every file at its middle byte; the array data (and the manifest) also at both ends."""
    cases = []
    for name in files_of(step):
        size = (step / name).stat().st_size
        ends = name == MANIFEST or "/d/" in f"/{name}"
        offsets = {0, size // 2, size - 1} if ends else {size // 2}
        cases += [(name, offset) for offset in sorted(offsets)]
    return cases


@pytest.mark.slow
def test_every_byte_flip_in_the_newest_step_is_detected(pristine, tmp_path, template):
    # Unverified, 14 of 30 such flips loaded with no error and a changed array.
    for case, (name, offset) in enumerate(flips(pristine / "2")):
        directory = Path(shutil.copytree(pristine, tmp_path / str(case)))
        flip(directory / "2" / name, offset)
        (restored, progress), lines = resume(directory, template)
        head, tail = skipped_line(directory, 2, "|").split("|")
        if name == MANIFEST:  # It no longer parses: not UTF-8, or not JSON.
            assert len(lines) == 1 and lines[0].startswith(
                f"{head}its {MANIFEST} is unreadable (") and lines[0].endswith(tail), lines
        else:
            assert lines == [f"{head}checksum mismatch in {name}{tail}"], (offset, lines)
        assert progress.epoch == 1 and sorted(os.listdir(directory)) == ["1"]
        assert_identical(restored, state_of(template, 1))


def largest_data_file(step: Path) -> str:
    return max((name for name in files_of(step) if "/d/" in f"/{name}"),
               key=lambda name: (step / name).stat().st_size)


def truncate(step: Path) -> str:
    name = largest_data_file(step)
    size = (step / name).stat().st_size
    os.truncate(step / name, size // 2)
    return f"{name} is truncated ({size // 2} of {size} bytes)"


def remove_state(step: Path) -> str:
    shutil.rmtree(step / "state")
    return "state/ is missing"


def empty(step: Path) -> str:
    shutil.rmtree(step)
    step.mkdir()
    return NO_MANIFEST


def unfinished(step: Path) -> str:  # Killed after orbax's commit, before the manifest.
    (step / MANIFEST).unlink()
    return NO_MANIFEST


def garble(path: Path) -> None:
    """The same number of bytes, in an order no JSON reader makes sense of."""
    path.write_bytes(path.read_bytes()[::-1])


def garble_progress(step: Path) -> str:
    garble(step / "progress" / "metadata")
    return "checksum mismatch in progress/metadata"


def garble_array_metadata(step: Path) -> str:
    garble(step / "state" / "_METADATA")
    return "checksum mismatch in state/_METADATA"


def garble_manifest(step: Path) -> str:
    cut = '{"format": "vit_flax checkpoint manifest 1", "files": '  # Cut short.
    (step / MANIFEST).write_text(cut)
    return (f"its {MANIFEST} is unreadable (Expecting value: line 1 column {len(cut) + 1} "
            f"(char {len(cut)}))")


CORRUPTIONS = [truncate, remove_state, empty, unfinished, garble_progress,
               garble_array_metadata, garble_manifest]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_an_unusable_step_is_skipped_with_one_line_and_the_one_before_used(
        run_state, template, corrupt):
    reason = corrupt(run_state / "2")
    (restored, progress), lines = resume(run_state, template)
    assert lines == [skipped_line(run_state, 2, reason)]
    assert progress.epoch == 1 and progress.history == [{"epoch": 1}]
    assert_identical(restored, state_of(template, 1))
    assert sorted(os.listdir(run_state)) == ["1"]
    # The epoch is saved again, and the good step before it is kept.
    save_epochs(run_state, {2: state_of(template, 2)})
    assert sorted(os.listdir(run_state)) == ["1", "2"]
    assert resume(run_state, template)[0][1].epoch == 2


def test_a_non_finite_weight_saved_validly_is_an_unusable_step(tmp_path, template):
    poisoned = state_of(template, 2)
    leaves, tree = jax.tree.flatten(poisoned.params)
    leaves[0] = leaves[0].at[0].set(jnp.nan)
    save_epochs(tmp_path, {1: state_of(template, 1),
                           2: poisoned.replace(params=jax.tree.unflatten(tree, leaves))})
    (restored, progress), lines = resume(tmp_path, template)
    assert lines == [skipped_line(tmp_path, 2, "NaN or inf in "
                                  "params/blocks/0/attention/attention_output/bias/value")]
    assert progress.epoch == 1
    assert_identical(restored, state_of(template, 1))


def test_when_no_step_is_usable_the_run_starts_afresh_with_a_warning(run_state, template):
    reasons = {2: remove_state(run_state / "2"), 1: garble_progress(run_state / "1")}
    restored, lines = resume(run_state, template)
    assert restored is None
    assert lines == [skipped_line(run_state, 2, reasons[2]), skipped_line(run_state, 1, reasons[1]),
                     f"warning: no usable checkpoint in {run_state}; the run starts again "
                     f"from epoch 1"]
    assert os.listdir(run_state) == []


def test_the_old_step_stays_until_the_new_one_has_its_manifest(tmp_path, template, monkeypatch):
    # keep=1: orbax's max_to_keep would delete epoch 1 before epoch 2's manifest exists.
    save_epochs(tmp_path, {1: state_of(template, 1)}, keep=1)

    def killed(directory):
        raise SystemExit("killed")  # Not an error save() handles: the process ends here.

    monkeypatch.setattr(checkpoints, "_write_manifest", killed)
    with pytest.raises(SystemExit):
        save_epochs(tmp_path, {2: state_of(template, 2)}, keep=1)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    (restored, progress), lines = resume(tmp_path, template, keep=1)
    assert lines == [skipped_line(tmp_path, 2, NO_MANIFEST)] and progress.epoch == 1
    assert_identical(restored, state_of(template, 1))


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, FULL)


def no_permission(*_args, **_kwargs):
    raise OSError(errno.EACCES, "Permission denied")


def cannot_save(directory: Path, epoch: int, kept: str, reason: str = FULL) -> str:
    return (f"cannot save epoch {epoch} in {directory} ({reason}); {kept}: free space (or fix "
            f"permissions), then run the same command to resume")


@pytest.mark.parametrize("error", [disk_full, no_permission], ids=["ENOSPC", "EACCES"])
@pytest.mark.parametrize("failing", ["orbax", "manifest"])
def test_a_full_disk_while_saving_is_one_line_and_loses_nothing(tmp_path, template, monkeypatch,
                                                               failing, error):
    run_state = tmp_path / "run_state"
    save_epochs(run_state, {1: state_of(template, 1)})
    saver = RunCheckpoints(run_state, 2, log=pytest.fail)
    # orbax writes its JSON files through etils' paths; the manifest is fsynced.
    target = (epath.gpath.PosixGPath, "write_text") if failing == "orbax" else (os, "fsync")
    monkeypatch.setattr(*target, error)
    with pytest.raises(CheckpointError) as raised:
        saver.save(state_of(template, 2), RunProgress(epoch=2))
    monkeypatch.undo()
    reason = FULL if error is disk_full else "Permission denied"
    assert str(raised.value) == cannot_save(run_state, 2, "epoch 1 stays saved", reason)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert sorted(os.listdir(run_state)) == ["1"] and debris(tmp_path) == []
    saver.save(state_of(template, 2), RunProgress(epoch=2))  # Space again: it saves.
    saver.close()
    (restored, progress), _ = resume(run_state, template)
    assert progress.epoch == 2
    assert_identical(restored, state_of(template, 2))


def test_a_full_disk_before_any_epoch_was_saved(tmp_path, template, monkeypatch):
    saver = RunCheckpoints(tmp_path, 2, log=pytest.fail)
    monkeypatch.setattr(epath.gpath.PosixGPath, "write_text", disk_full)
    with pytest.raises(CheckpointError, match=re.escape(
            cannot_save(tmp_path, 1, "no epoch was saved before"))):
        saver.save(state_of(template, 1), RunProgress(epoch=1))
    saver.close()
    assert os.listdir(tmp_path) == []


def test_an_epoch_already_saved_is_not_saved_silently(run_state, template):
    saver = RunCheckpoints(run_state, 2, log=pytest.fail)
    with pytest.raises(CheckpointError, match=f"epoch 2 is already saved in {run_state}$"):
        saver.save(state_of(template, 9), RunProgress(epoch=2))
    saver.close()


# --- The best model: workdir/best_checkpoint.

def model_of(config, seed: int) -> ViT:
    return ViT(config, rngs=nnx.Rngs(seed))


def weights(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def assert_same_model(model, expected) -> None:
    for got, want in zip(weights(model), weights(expected), strict=True):
        assert np.array_equal(got, want)


@pytest.fixture(scope="module")
def models(config):
    return {seed: model_of(config, seed) for seed in (1, 2, 3)}


@pytest.fixture(scope="module")
def best_pristine(tmp_path_factory, models):
    directory = tmp_path_factory.mktemp("best") / "best_checkpoint"
    checkpoints.save_model(directory, models[1])
    return directory


@pytest.fixture
def best(best_pristine, tmp_path) -> Path:
    return Path(shutil.copytree(best_pristine, tmp_path / "best_checkpoint"))


def test_save_model_replaces_the_best_model_and_leaves_nothing_else(best, config, models):
    checkpoints.save_model(best, models[2])
    assert_same_model(checkpoints.restore_model(best, config), models[2])
    assert sorted(os.listdir(best.parent)) == ["best_checkpoint"]
    assert MANIFEST in os.listdir(best)


def corrupt_message(directory: Path, reason: str) -> str:
    return (f"best checkpoint {directory} is corrupt ({reason}); restore it from a backup, or "
            f"train again into a new workdir (the same command gives the same model)")


def test_a_corrupt_best_model_is_a_one_line_error_naming_the_file(best_pristine, tmp_path, config):
    names = files_of(best_pristine)
    assert any("/d/" in f"/{name}" for name in names)  # Array data is among them.
    for case, name in enumerate(name for name in names if name != MANIFEST):
        directory = Path(shutil.copytree(best_pristine, tmp_path / str(case) / "best"))
        flip(directory / name, (directory / name).stat().st_size // 2)
        with pytest.raises(CheckpointError) as raised:
            checkpoints.restore_model(directory, config)
        assert str(raised.value) == corrupt_message(directory, f"checksum mismatch in {name}")




@pytest.mark.parametrize("corrupt", [truncate, unfinished], ids=lambda f: f.__name__)
def test_a_truncated_or_unfinished_best_model_is_a_one_line_error(best, config, corrupt):
    reason = corrupt(best)
    with pytest.raises(CheckpointError) as raised:
        checkpoints.restore_model(best, config)
    assert str(raised.value) == corrupt_message(best, reason)


def test_vit_flax_load_refuses_a_corrupt_best_checkpoint(best, config):
    (best.parent / "config.json").write_text(config.to_json())
    name = max(files_of(best), key=lambda n: (best / n).stat().st_size)
    flip(best / name, 7)
    with pytest.raises(CheckpointError, match=re.escape(
            corrupt_message(best, f"checksum mismatch in {name}"))):
        vit_flax.load(best.parent)


def test_a_best_model_of_another_configuration_is_one_line_and_no_log(best, config, caplog):
    other = dataclasses.replace(config, num_classes=config.num_classes + 2)
    with pytest.raises(CheckpointError) as raised:
        checkpoints.restore_model(best, other)
    # The head's bias or its kernel, whichever orbax's concurrent reads refuse first.
    units, stored, given = config.mlp_head_units[-1], config.num_classes, other.num_classes
    assert str(raised.value) in {
        f"cannot restore the model in {best} (an array is stored with shape {shapes[0]} where "
        f"this configuration has {shapes[1]}); was it saved with another configuration?"
        for shapes in [((stored,), (given,)), ((units, stored), (units, given))]}
    # Orbax's cancelled reads logged a traceback each through asyncio (thousands of lines).
    assert [record for record in caplog.records if record.name == "asyncio"] == []


def test_a_best_model_with_non_finite_weights_is_refused(tmp_path, config):
    model = model_of(config, 1)
    kernel = model.patch_encoder.projection.kernel
    kernel[...] = kernel[...].at[0, 0].set(jnp.inf)
    checkpoints.save_model(tmp_path / "best", model)
    with pytest.raises(CheckpointError, match=re.escape(
            f"best checkpoint {tmp_path / 'best'} holds NaN or inf in "
            f"patch_encoder/projection/kernel/value")):
        checkpoints.restore_model(tmp_path / "best", config)


@pytest.mark.parametrize("failing", ["orbax", "manifest"])
def test_a_full_disk_while_saving_the_best_model_keeps_the_old_one(best, config, models,
                                                                    monkeypatch, failing):
    target = (epath.gpath.PosixGPath, "write_text") if failing == "orbax" else (os, "fsync")
    monkeypatch.setattr(*target, disk_full)
    with pytest.raises(CheckpointError) as raised:
        checkpoints.save_model(best, models[2])
    monkeypatch.undo()
    assert str(raised.value) == (f"cannot save the best model in {best} ({FULL}); the previous "
                                 f"one is kept: free space (or fix permissions), then run the "
                                 f"same command to resume")
    assert debris(best.parent) == [] and sorted(os.listdir(best.parent)) == ["best_checkpoint"]
    assert_same_model(checkpoints.restore_model(best, config), models[1])


def test_a_full_disk_at_the_first_best_model_leaves_nothing(tmp_path, models, monkeypatch):
    monkeypatch.setattr(epath.gpath.PosixGPath, "write_text", disk_full)
    with pytest.raises(CheckpointError, match=re.escape(
            f"({FULL}); none was saved before: free space")):
        checkpoints.save_model(tmp_path / "best", models[1])
    assert os.listdir(tmp_path) == []


def staged_copy(best: Path, model) -> Path:
    """A complete new model beside `best`, as save_model writes it before the swap."""
    staged = best.with_name(best.name + checkpoints.STAGED_SUFFIX)
    checkpoints.save_model(best.with_name("elsewhere"), model)
    os.replace(best.with_name("elsewhere"), staged)
    return staged


def aside(best: Path) -> Path:
    return best.with_name(best.name + checkpoints.ASIDE_SUFFIX)


def killed_before_the_swap(best, models):
    staged_copy(best, models[2])
    return models[1]


def killed_between_the_renames(best, models):
    staged = staged_copy(best, models[2])
    os.replace(best, aside(best))
    assert not best.exists() and staged.exists()
    return models[2]


def killed_before_deleting_the_old_one(best, models):
    staged = staged_copy(best, models[2])
    os.replace(best, aside(best))
    os.replace(staged, best)
    return models[2]


def killed_while_orbax_wrote_the_new_one(best, models):
    staged = best.with_name(best.name + checkpoints.STAGED_SUFFIX)
    partial = staged.with_name(staged.name + ".orbax-checkpoint-tmp")
    shutil.copytree(best, partial)
    (partial / MANIFEST).unlink()
    return models[1]


@pytest.mark.parametrize("kill", [killed_before_the_swap, killed_between_the_renames,
                                  killed_before_deleting_the_old_one,
                                  killed_while_orbax_wrote_the_new_one],
                         ids=lambda f: f.__name__)
def test_a_kill_while_replacing_the_best_model_leaves_a_complete_one(best, config, models,
                                                                      kill):
    expected = kill(best, models)
    # Readers find the complete model without touching anything (training may be running).
    assert_same_model(checkpoints.restore_model(best, config), expected)
    # The next save finishes or undoes the interrupted one and leaves nothing behind.
    checkpoints.save_model(best, models[3])
    assert debris(best.parent) == [] and sorted(os.listdir(best.parent)) == ["best_checkpoint"]
    assert_same_model(checkpoints.restore_model(best, config), models[3])


def test_no_saved_model_is_a_one_line_error(tmp_path, config):
    with pytest.raises(CheckpointError, match=f"^there is no saved model in {tmp_path / 'x'}$"):
        checkpoints.restore_model(tmp_path / "x", config)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, where disk full is real (TensorStore's errors, not a patch)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                                            str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match=FULL):
        while True:
            os.write(descriptor, bytes(1 << 16))
    os.close(descriptor)
    return filler


@pytest.mark.slow
def test_a_really_full_disk(small_disk, template, config, models):
    save_epochs(small_disk / "run_state", {1: state_of(template, 1)})
    checkpoints.save_model(small_disk / "best", models[1])
    filler = fill(small_disk)
    saver = RunCheckpoints(small_disk / "run_state", 2, log=pytest.fail)
    with pytest.raises(CheckpointError, match=re.escape(
            cannot_save(small_disk / "run_state", 2, "epoch 1 stays saved"))):
        saver.save(state_of(template, 2), RunProgress(epoch=2))
    with pytest.raises(CheckpointError, match=re.escape(f"({FULL}); the previous one is kept")):
        checkpoints.save_model(small_disk / "best", models[2])
    assert debris(small_disk) == [] and sorted(os.listdir(small_disk / "run_state")) == ["1"]
    filler.unlink()
    saver.save(state_of(template, 2), RunProgress(epoch=2))
    saver.close()
    assert resume(small_disk / "run_state", template)[0][1].epoch == 2
    assert_same_model(checkpoints.restore_model(small_disk / "best", config), models[1])


# --- What a training run does with them: it resumes from the last good epoch.

def small_problem():
    labels = np.arange(48) % 3
    return data.from_arrays(random_images(48, 8), labels, random_images(9, 8, 1), labels[:9])


METRICS = ("epoch", "loss", "accuracy", "top-5-accuracy", "val_loss", "val_accuracy",
           "val_top-5-accuracy")


def metrics(workdir: Path) -> list[list[float]]:
    history = json.loads((workdir / "history.json").read_text())
    return [[row[name] for name in METRICS] for row in history]  # Timings left out.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-epoch run that keeps all 3 epochs' checkpoints, and its results."""
    workdir = tmp_path_factory.mktemp("trained")
    results = vit_flax.train(vit_flax.ViTConfig(**TINY, epochs=3), small_problem(), workdir,
                             log=lambda _: None, keep_checkpoints=3)
    return workdir, results


def train_again(workdir: Path) -> tuple[dict, list[str]]:
    lines = []
    results = vit_flax.train(vit_flax.ViTConfig(**TINY, epochs=3), small_problem(), workdir,
                             log=lines.append, keep_checkpoints=3)
    return results, lines


def poison(run_state: Path, epoch: int, template) -> None:
    """Replace the step of `epoch` by one saved validly whose first weight is NaN."""
    scratch = run_state.with_name("scratch")
    shutil.copytree(run_state / str(epoch), scratch / str(epoch))
    (state, progress), _ = resume(scratch, template)
    shutil.rmtree(scratch / str(epoch))
    leaves, tree = jax.tree.flatten(state.params)
    leaves[0] = leaves[0] * jnp.nan
    saver = RunCheckpoints(scratch, 3, log=pytest.fail)
    saver.save(state.replace(params=jax.tree.unflatten(tree, leaves)), progress)
    saver.close()
    shutil.rmtree(run_state / str(epoch))
    os.replace(scratch / str(epoch), run_state / str(epoch))


@pytest.mark.slow
def test_training_resumes_from_the_last_good_epoch(trained, tmp_path, template):
    reference, expected = trained
    workdir = Path(shutil.copytree(reference, tmp_path / "run"))
    run_state = workdir / "run_state"
    flipped = largest_data_file(run_state / "3")
    flip(run_state / "3" / flipped, 3)
    poison(run_state, 2, template)
    results, lines = train_again(workdir)
    warnings = [line for line in lines if line.startswith("warning")]
    assert warnings == [
        skipped_line(run_state, 3, f"checksum mismatch in {flipped}"),
        skipped_line(run_state, 2, "NaN or inf in params/blocks/0/attention/attention_output/"
                                   "bias/value")]
    assert f"Resuming {workdir} after epoch 1" in lines
    assert metrics(workdir) == metrics(reference)  # Bit for bit, on the CPU.
    assert results["best_epoch"] == expected["best_epoch"]
    assert results["test_accuracy"] == expected["test_accuracy"]
    assert sorted(os.listdir(run_state)) == ["1", "2", "3"]



def test_save_model_deletes_no_entry_but_its_own_temporaries(best, models):
    # A name like orbax's partial write of the new model, but not one orbax gives: the
    # user's (a workdir may hold the user's files), never deleted.
    mine = best.with_name(best.name + checkpoints.STAGED_SUFFIX + ".orbax-checkpoint-tmp-mine")
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "a.txt").write_text("mine\n")
    checkpoints.save_model(best, models[2])
    assert (mine / "notes" / "a.txt").read_text() == "mine\n"
    assert sorted(os.listdir(best.parent)) == ["best_checkpoint", mine.name]


def test_a_run_state_step_that_is_a_symbolic_link_is_refused_naming_it(run_state, tmp_path,
                                                                      template):
    elsewhere = Path(shutil.move(run_state / "2", tmp_path / "elsewhere"))
    (run_state / "2").symlink_to(elsewhere, target_is_directory=True)
    before = files_of(elsewhere)
    message = (f"{run_state / '2'} is a symbolic link; vit_flax never follows links in its run "
               f"state: remove it (what it points to is left as it is), then run the same "
               f"command again")
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
        RunCheckpoints(run_state, 2, log=pytest.fail)
    (run_state / "2").unlink()
    run_state.rename(tmp_path / "real")
    run_state.symlink_to(tmp_path / "real", target_is_directory=True)  # run_state itself.
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(run_state))} is a symbolic"):
        RunCheckpoints(run_state, 2, log=pytest.fail)
    assert files_of(elsewhere) == before and (run_state / "1" / MANIFEST).is_file()
