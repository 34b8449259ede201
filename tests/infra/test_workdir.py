"""The workdir rules: nothing of the user's is ever deleted or overwritten, one trainer at a
time, a run is recognised by its marker (not by a config.json anyone could write)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, TINY_FLAGS, random_images, write_image_folder

import vit_flax
from vit_flax.data import sources as data
from vit_flax.infra import workdir as layout

REPO = Path(__file__).resolve().parents[2]
QUIET = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def splits():
    labels = np.arange(40) % 3
    return data.from_arrays(random_images(40, 8), labels, random_images(6, 8, 1), labels[:6])


@pytest.fixture
def config():
    return vit_flax.ViTConfig(**TINY, epochs=1)


@pytest.fixture(scope="module")
def trained_pristine(tmp_path_factory, splits):
    """A finished 2-epoch run of TINY, trained once: a test that needs a run copies it (the
    programs of `config` are then in the session's compilation cache)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    vit_flax.train(vit_flax.ViTConfig(**TINY, epochs=2), splits, workdir, log=QUIET)
    return workdir


@pytest.fixture
def trained(trained_pristine, tmp_path) -> Path:
    """A copy of trained_pristine, for a test to change."""
    workdir = tmp_path / "trained"
    shutil.copytree(trained_pristine, workdir)
    return workdir


def as_run_of(workdir: Path, **fields) -> None:
    """Make the finished run in `workdir` one of another configuration (its marker and
    config.json say so), without training it."""
    marker = json.loads((workdir / layout.MARKER).read_text())
    marker["config"].update(fields)
    (workdir / layout.MARKER).write_text(json.dumps(marker))
    saved = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps(saved | fields))


def user_files(root: Path) -> dict[str, bytes]:
    """A user's own files: a note, source code in a subfolder, a README."""
    files = {"notes.txt": b"my notes\n", "src/app.py": b"print('mine')\n",
             "README": b"read me\n", "deep/er/data.bin": bytes(range(256))}
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return files


def assert_intact(root: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        assert (root / name).read_bytes() == content, name


@pytest.mark.slow
def test_overwrite_deletes_only_what_vit_flax_wrote(trained, splits, config):
    as_run_of(trained, learning_rate=0.01)  # A run of another configuration.
    mine = user_files(trained)  # Added beside the run afterwards.
    with pytest.raises(vit_flax.ConfigError, match="differs in learning_rate.*overwrite=True"):
        vit_flax.train(config, splits, trained, log=QUIET)
    vit_flax.train(config, splits, trained, log=QUIET, overwrite=True)
    assert_intact(trained, mine)
    assert json.loads((trained / "config.json").read_text())["learning_rate"] == 0.001
    assert layout.saved_config(trained)["learning_rate"] == 0.001
    # Trained afresh: one epoch (the deleted run had two).
    assert [row["epoch"] for row in json.loads((trained / "history.json").read_text())] == [1]
    expected = {"best_checkpoint", "run_state", "tensorboard", "config.json", "history.json",
                "results.json", "data.json", "loss.png", "top-5-accuracy.png", "patches.png",
                "attention.png",
                layout.MARKER, layout.LOCK, "notes.txt", "src", "README", "deep"}
    assert {p.name for p in trained.iterdir()} == expected


@pytest.mark.slow
def test_a_directory_that_is_not_a_run_is_refused_and_never_deleted(tmp_path, splits, config):
    mine = user_files(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(vit_flax.ConfigError, match="not empty and is not a vit_flax run"):
            vit_flax.train(config, splits, tmp_path, log=QUIET, overwrite=overwrite)
    assert_intact(tmp_path, mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README", "deep", "notes.txt", "src"]
    # Said explicitly: the run goes beside the user's files, which stay as they were.
    vit_flax.train(config, splits, tmp_path, log=QUIET, allow_non_empty=True)
    assert_intact(tmp_path, mine)
    assert layout.is_run(tmp_path)


@pytest.mark.parametrize("name", ["history.json", "results.json", "config.json", "data.json"])
def test_a_users_file_of_a_run_name_is_never_overwritten(tmp_path, splits, config, name):
    (tmp_path / name).write_text("the user's own\n")
    with pytest.raises(vit_flax.ConfigError, match=f"holds {name}, which a run would overwrite"):
        vit_flax.train(config, splits, tmp_path, log=QUIET, allow_non_empty=True,
                       overwrite=True)
    assert (tmp_path / name).read_text() == "the user's own\n"


def test_an_empty_path_is_an_error(splits, config):
    with pytest.raises(vit_flax.ConfigError, match="workdir is empty"):
        vit_flax.train(config, splits, "", log=QUIET)


@pytest.mark.slow
def test_the_marker_not_config_json_says_which_run_it_is(trained, splits, config):
    (trained / "config.json").unlink()  # Lost or deleted: the run is still recognised.
    with pytest.raises(vit_flax.ConfigError, match="differs in learning_rate"):
        vit_flax.train(config.replace(learning_rate=0.01), splits, trained, log=QUIET)
    (trained / layout.MARKER).write_text("{not json")
    with pytest.raises(vit_flax.ConfigError, match="run marker .* is unreadable"):
        vit_flax.train(config, splits, trained, log=QUIET)


@pytest.mark.slow
def test_fewer_epochs_than_trained_is_refused(trained, splits, config):
    before = {name: (trained / name).read_bytes() for name in ("config.json", "results.json")}
    with pytest.raises(vit_flax.ConfigError, match="holds 2 trained epochs, more than epochs=1"):
        vit_flax.train(config, splits, trained, log=QUIET)
    results = json.loads((trained / "results.json").read_text())
    assert (results["epochs"], results["config"]["epochs"]) == (2, 2)
    # The refused run rewrote nothing: config.json still says epochs=2.
    assert {name: (trained / name).read_bytes() for name in before} == before


@pytest.mark.slow
def test_a_second_trainer_is_refused_naming_the_holder(tmp_path, splits, config):
    images = write_image_folder(tmp_path / "images", train_per_class=4)
    run = tmp_path / "run"
    run.mkdir()
    with layout.Lock(run):
        with pytest.raises(vit_flax.ConfigError, match=f"in use by .*pid {os.getpid()}"):
            vit_flax.train(config, splits, run, log=QUIET)
        # Another process gets the same answer, as one line with exit status 2.
        second = subprocess.run(
            [sys.executable, str(REPO / "train.py"), *TINY_FLAGS, "--dataset", "folder",
             "--data-dir", str(images), "--workdir", str(run), "--compilation-cache", "none"],
            capture_output=True, text=True, timeout=300,
            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines() == [
        f"error: --workdir {run} is in use by another training process (pid {os.getpid()}); "
        f"wait for it or use another workdir"]
    vit_flax.train(config, splits, run, log=QUIET)  # Released: it trains.


def test_a_trainer_half_way_through_its_claim_is_in_use_not_a_stranger(tmp_path, splits,
                                                                        config):
    # The holder has taken the lock and is writing its marker (only its temporary is
    # there): a second trainer must say "in use", not "not empty and not a vit_flax run".
    run = tmp_path / "run"
    run.mkdir()
    with layout.Lock(run):
        partial, descriptor = layout.temporary_file(run / layout.MARKER)
        os.close(descriptor)
        with pytest.raises(vit_flax.ConfigError, match=f"in use by .*pid {os.getpid()}"):
            vit_flax.train(config, splits, run, log=QUIET)
    assert sorted(p.name for p in run.iterdir()) == sorted([layout.LOCK, partial.name])


@pytest.mark.slow
def test_the_lock_is_released_when_its_process_dies(tmp_path):
    code = ("import sys, os; from pathlib import Path; from vit_flax.infra import workdir; "
            "workdir.Lock(Path(sys.argv[1])).__enter__(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    with layout.Lock(tmp_path):  # Not held by a dead process: the kernel released it.
        pass


def test_processes_of_one_run_probe_the_workdir_at_once(tmp_path):
    # Every process of a multi-process run checks the shared workdir is writable; a fixed
    # probe name was deleted by one under another ("not writable", and a dead peer).
    def probe_often(_):
        for _ in range(300):
            layout.ensure_directory(tmp_path)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(probe_often, range(4)))
    assert list(tmp_path.iterdir()) == []  # And the probes leave nothing behind.


def test_deleting_the_lock_file_does_not_let_a_second_trainer_in(tmp_path):
    # The directory itself is locked too: a deleted (or replaced) LOCK changes nothing.
    with layout.Lock(tmp_path):
        (tmp_path / layout.LOCK).unlink()
        for attempt in (layout.Lock(tmp_path).__enter__, layout.Lock(tmp_path).refuse_if_held):
            with pytest.raises(vit_flax.ConfigError) as refused:
                attempt()
            assert str(refused.value) == (
                f"workdir={tmp_path} is in use by another training process (pid unknown); "
                f"wait for it or use another workdir")
    with layout.Lock(tmp_path):  # Released with the first: the next one takes it.
        assert (tmp_path / layout.LOCK).read_text() == f"{os.getpid()}\n"


def test_the_run_marker_has_a_format_and_a_newer_one_is_refused(tmp_path, config):
    assert not layout.claim(tmp_path, config)
    marker = json.loads((tmp_path / layout.MARKER).read_text())
    assert marker["format"] == layout.FORMAT == 2
    del marker["format"]  # As the previous version wrote it (format 1): it resumes.
    (tmp_path / layout.MARKER).write_text(json.dumps(marker))
    assert layout.check_claim(tmp_path, config) == "resume"
    for newer, error in ((3, f"workdir={tmp_path} was written by a newer vit_flax (format 3); "
                             f"this one reads formats 1-2: use that version, or another "
                             f"workdir"),
                         ("2", f"workdir={tmp_path}: its run marker {layout.MARKER} is "
                               f"unreadable (format '2'); use another workdir")):
        (tmp_path / layout.MARKER).write_text(json.dumps({**marker, "format": newer}))
        for overwrite in (False, True):  # Never deleted either: it may be another's run.
            with pytest.raises(vit_flax.ConfigError) as refused:
                layout.check_claim(tmp_path, config, overwrite=overwrite)
            assert str(refused.value) == error
