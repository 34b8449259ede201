"""Untrusted inputs never make vit_flax (or its scripts) write outside the folder it was
given: tarball members naming other places, and user files bearing the names of vit_flax's
temporaries."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

import vit_flax
from vit_flax.infra import workdir as layout

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "split_image_tarball.py"


def tarball(path: Path, members: dict[str, bytes | tuple[bytes, str]]) -> Path:
    """{name: content} as files; {name: (type, target)} as links (tarfile.SYMTYPE, LNKTYPE)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            member = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                member.type, member.linkname = content
                tar.addfile(member)
            else:
                member.size = len(content)
                tar.addfile(member, io.BytesIO(content))
    return path


def split(archive: Path, output: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(archive), str(output), *flags],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_the_split_script_unpacks_each_class_into_test_then_train(tmp_path):
    archive = tarball(tmp_path / "images.tar.gz", {
        "train/cat/2.jpg": b"c2", "train/cat/1.jpg": b"c1", "train/cat/3.jpg": b"c3",
        "train/dog/1.jpg": b"d1"})
    completed = split(archive, tmp_path / "out", "--test-per-class", "1")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == ["cat: 1 test, 2 train", "dog: 1 test, 0 train"]
    written = {str(p.relative_to(tmp_path / "out")): p.read_bytes()
               for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert written == {"test/cat/1.jpg": b"c1", "train/cat/2.jpg": b"c2",
                       "train/cat/3.jpg": b"c3", "test/dog/1.jpg": b"d1"}


@pytest.mark.slow
def test_split_keeps_at_most_train_per_class_after_the_test_files(tmp_path):
    # What benchmarks/gpu_check.py unpacks with (its small form: a few images per class).
    spec = importlib.util.spec_from_file_location("split_image_tarball", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    archive = tarball(tmp_path / "images.tar.gz",
                      {f"train/cat/{i}.jpg": bytes([i]) for i in range(5)})
    assert script.split(archive, tmp_path / "out", 2, train_per_class=1) == {"cat": (2, 1)}
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.jpg")) \
        == ["test/cat/0.jpg", "test/cat/1.jpg", "train/cat/2.jpg"]


ESCAPE = f"vit_flax-test-{uuid.uuid4().hex}.jpg"  # At the file system's root, were it written.
OUTSIDE = "points outside the archive (an absolute path or '..'); expected train/<class>/<file>"
LINK = "is a link or device, not a file; expected only files train/<class>/<file>"


@pytest.mark.slow
@pytest.mark.parametrize("name, content, why", [
    ("/" + ESCAPE, b"x", OUTSIDE),
    ("train/../../" + ESCAPE, b"x", OUTSIDE),
    ("train/cat/link.jpg", (tarfile.SYMTYPE, "/etc/passwd"), LINK),
    ("train/cat/hard.jpg", (tarfile.LNKTYPE, "train/cat/1.jpg"), LINK),
    (ESCAPE, b"x", "is in no class folder; expected train/<class>/<file>"),
], ids=["absolute", "dotdot", "symlink", "hardlink", "no-class"])
def test_the_split_script_refuses_a_member_outside_the_archive(tmp_path, name, content, why):
    archive = tarball(tmp_path / "images.tar.gz",
                      {"train/cat/1.jpg": b"c1", name: content, "train/dog/1.jpg": b"d1"})
    try:
        completed = split(archive, tmp_path / "out", "--test-per-class", "0")
        assert not Path("/", ESCAPE).exists()
    finally:
        Path("/", ESCAPE).unlink(missing_ok=True)
    assert (completed.returncode, completed.stderr) == (
        2, f"error: tarball member {name!r} {why}; nothing was written\n")
    assert not (tmp_path / "out").exists()


# --- vit_flax's temporaries never take a user's file's name.

@pytest.mark.parametrize("name", ["history.json", "config.json", "results.json"])
def test_write_json_never_writes_through_a_users_file_of_a_temporary_name(tmp_path, name):
    mine = {f"{name}.tmp": b"the user's own\n", f".{name}.tmp": b"also mine\n"}
    for entry, content in mine.items():
        (tmp_path / entry).write_bytes(content)
    layout.write_json(tmp_path / name, {"written": name})
    assert json.loads((tmp_path / name).read_text()) == {"written": name}
    assert {entry: (tmp_path / entry).read_bytes() for entry in mine} == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, *mine])
    umask = os.umask(0)
    os.umask(umask)  # A new file's permissions, as the user's umask makes them (not 0600).
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_claiming_a_directory_keeps_a_users_file_named_as_the_markers_temporary(tmp_path):
    (tmp_path / (layout.MARKER + ".tmp")).write_text("the user's own\n")
    assert not layout.claim(tmp_path, vit_flax.ViTConfig(), allow_non_empty=True)
    assert (tmp_path / (layout.MARKER + ".tmp")).read_text() == "the user's own\n"
    assert layout.is_run(tmp_path)


def test_a_directory_holding_a_best_model_temporary_name_is_refused(tmp_path):
    mine = tmp_path / "best_checkpoint.vit_flax-new.orbax-checkpoint-tmp-mine"
    mine.mkdir()
    (mine / "data").write_text("mine\n")
    with pytest.raises(vit_flax.ConfigError) as refused:
        layout.check_claim(tmp_path, vit_flax.ViTConfig(), allow_non_empty=True)
    assert str(refused.value) == (
        f"workdir={tmp_path} is not a vit_flax run but holds {mine.name}, which a run would "
        f"overwrite; move them or use another directory")
    assert (mine / "data").read_text() == "mine\n"


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path, link):
    target = tmp_path / "precious.txt"
    target.write_text("the user's own\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / layout.LOCK).symlink_to(target) if link == "symlink" else \
        os.link(target, run / layout.LOCK)
    message = (f"workdir={run}: {layout.LOCK} there is not vit_flax's lock file (a link, or a "
               f"file of several names); vit_flax never writes through it: remove it, or use "
               f"another workdir")
    for attempt in (layout.Lock(run).__enter__, layout.Lock(run).refuse_if_held):
        with pytest.raises(vit_flax.ConfigError) as refused:
            attempt()
        assert str(refused.value) == message
    assert target.read_text() == "the user's own\n"
    (run / layout.LOCK).unlink()
    with layout.Lock(run):  # The refusals left nothing held (the directory's lock).
        pass
