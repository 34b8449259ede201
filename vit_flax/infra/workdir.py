"""The workdir: what a run writes where, whose files are whose, and who may write there.

A directory is a vit_flax run only when it holds vit_flax's marker (`MARKER`, written when
the run is created, with the run's configuration). Only the entries named in `OWN_ENTRIES`
are ever written, replaced or deleted by vit_flax; anything else in the directory is the
user's and is never touched, nor are entries followed when they are links. A lock (an flock
on the directory, which the kernel releases when the process dies, and on `LOCK`) keeps two
processes from training into one workdir at the same time.

vit_flax's temporary files get names no user file has (a random token, created exclusively):
`.<name>.vit_flax-<token>.tmp`; entries named `best_checkpoint.vit_flax-*` are the best
model's temporaries (checkpoints.save_model), so a directory that already holds one is
refused like one holding an entry of OWN_ENTRIES.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from vit_flax.config import ConfigError, ViTConfig

MARKER = ".vit_flax-run.json"  # This directory is a vit_flax run; holds its configuration.
GROUP_MARKER = ".vit_flax-group.json"  # A group of runs (training.group); their configs.
GROUP_RUNS = "runs"  # A group's runs, a directory each.
# The marker's format: 2 adds "format" (a marker without it is format 1, read the same).
FORMAT = 2
LOCK = ".vit_flax.lock"  # Held (flock) by the process training here; holds its pid.
CONFIG_FILE = "config.json"  # The run's configuration, for people and `vit_flax.load`.
HISTORY_FILE = "history.json"  # One row of metrics per finished epoch.
RESULTS_FILE = "results.json"  # Test metrics, best epoch, config, versions.
DATA_FILE = "data.json"  # What the run was trained on: data set, directory, class names.
BEST_CHECKPOINT = "best_checkpoint"  # The best-by-val_accuracy model (orbax).
RUN_STATE = "run_state"  # One orbax step per finished epoch, for resuming.
MID_EPOCH_STATE = "mid_epoch_state"  # The last mid-epoch checkpoint (checkpoint_every).
TENSORBOARD = "tensorboard"  # TensorBoard event files.
FIGURES = ("loss.png", "top-5-accuracy.png", "patches.png", "attention.png")
# checkpoints.save_model's temporaries of an atomic replace (left by a kill mid-swap).
BEST_CHECKPOINT_SWAP = (BEST_CHECKPOINT + ".vit_flax-new", BEST_CHECKPOINT + ".vit_flax-old")
OWN_ENTRIES = (MARKER, LOCK, CONFIG_FILE, HISTORY_FILE, RESULTS_FILE, DATA_FILE,
               BEST_CHECKPOINT, *BEST_CHECKPOINT_SWAP, RUN_STATE, MID_EPOCH_STATE, TENSORBOARD,
               *FIGURES)
OWN_PREFIX = BEST_CHECKPOINT + ".vit_flax-"  # The swap's names and orbax's partial writes.
# A longer run may continue a shorter one: the only field allowed to change on resume.
RESUMABLE_CHANGES = {"epochs"}


def ensure_directory(workdir: str | os.PathLike) -> Path:
    """The workdir as a Path, created if missing; a one-line ConfigError if it cannot be."""
    if not str(workdir).strip():
        raise ConfigError("workdir is empty; give a directory (use '.' for this one)")
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"workdir={path} is a file; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A nameless file (O_TMPFILE where the file system has it, else a unique name):
        # several processes of one run probe the same workdir at once, and a fixed name
        # was created by one and deleted under the other.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError(f"workdir={path} is not writable ({error.strerror})") from None
    return path


def is_run(path: Path) -> bool:
    return (path / MARKER).is_file()


def saved_config(path: Path) -> dict:
    """The configuration recorded in the run's marker (of a FORMAT this version reads)."""
    try:
        marker = json.loads((path / MARKER).read_text())
        saved = marker["config"]
        if not isinstance(saved, dict):
            raise TypeError(type(saved).__name__)
        version = marker.get("format", 1)  # Markers before FORMAT 2 have no "format".
        if type(version) is not int:
            raise TypeError(f"format {version!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"workdir={path}: its run marker {MARKER} is unreadable ({error}); "
                          f"use another workdir") from None
    if not 1 <= version <= FORMAT:
        raise ConfigError(f"workdir={path} was written by a newer vit_flax (format "
                          f"{version}); this one reads formats 1-{FORMAT}: use that version, "
                          f"or another workdir")
    return saved


def differing_fields(saved: dict, config: ViTConfig) -> list[str]:
    # A field the saved run predates has its default there (ViTConfig.from_json's rule).
    current, defaults = json.loads(config.to_json()), json.loads(ViTConfig().to_json())
    return sorted(k for k in current.keys() | saved.keys()
                  if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != current.get(k))


def check_claim(path: Path, config: ViTConfig, *, overwrite: bool = False,
                allow_non_empty: bool = False) -> str:
    """What `claim` would do, writing nothing: "resume", "overwrite" or "new"; or the
    ConfigError it would raise. (Checked before the lock is taken, so that a refused
    directory is left without even a lock file.)

    - A run of the same config (all but `epochs`): resumed.
    - A run of another config: an error, unless `overwrite`, which deletes that run's own
      entries (OWN_ENTRIES) and nothing else, then starts afresh.
    - Not a run and empty: becomes one. Not a run and not empty: an error unless
      `allow_non_empty`; even then, an entry vit_flax would write (a user's own
      history.json, say) is never overwritten: an error names it.
    `overwrite` never deletes anything in a directory that is not a run.
    """
    if is_run(path):
        differing = differing_fields(saved_config(path), config)
        if not differing:
            return "resume"
        if not overwrite:
            raise ConfigError(
                f"workdir={path} holds a run with another configuration (differs in "
                f"{', '.join(differing)}); use another workdir, or overwrite=True to delete "
                f"that run (only vit_flax's own files; anything else there is kept)")
        return "overwrite"
    _check_foreign_directory(path, allow_non_empty)
    return "new"


def claim(path: Path, config: ViTConfig, *, overwrite: bool = False,
          allow_non_empty: bool = False) -> bool:
    """Make `path` the run of `config` (see check_claim); True when it already was (the
    run resumes). Call it holding the workdir's Lock."""
    action = check_claim(path, config, overwrite=overwrite, allow_non_empty=allow_non_empty)
    if action == "resume":
        return True
    if action == "overwrite":
        delete_run(path)
    write_json(path / MARKER, {"vit_flax": "run", "format": FORMAT,
                               "config": json.loads(config.to_json())})
    return False


def _check_foreign_directory(path: Path, allow_non_empty: bool) -> None:
    entries = sorted(p.name for p in path.iterdir() if p.name != LOCK)
    if not entries:
        return
    if not allow_non_empty:
        raise ConfigError(
            f"workdir={path} is not empty and is not a vit_flax run (it holds "
            f"{_listing(entries)}); use an empty or new directory, or allow_non_empty=True "
            f"to add a run beside those files")
    clashes = sorted(name for name in entries
                     if name in OWN_ENTRIES or name.startswith(OWN_PREFIX))
    if clashes:
        raise ConfigError(
            f"workdir={path} is not a vit_flax run but holds {_listing(clashes)}, which a "
            f"run would overwrite; move them or use another directory")


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def delete_run(path: Path) -> None:
    """Delete the run's own entries (never anything else) and its marker last, so that an
    interrupted delete still leaves a directory recognised as a run."""
    for name in OWN_ENTRIES:
        entry = path / name
        if name in (MARKER, LOCK) or not (entry.exists() or entry.is_symlink()):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (path / MARKER).unlink()


def write_json(path: Path, value) -> None:
    """`value` as indented JSON, written whole or not at all (write_whole)."""
    write_whole(path, (json.dumps(value, indent=2) + "\n").encode())


def write_whole(path: Path, data: bytes) -> None:
    """Written whole or not at all: readers never see a half-written file, and a write that
    fails (a full disk, a signal) leaves the file that was there. Through a temporary of a
    random name beside it (temporary_file), never a user's file; a failure is a ConfigError
    naming `path`."""
    partial = None
    try:
        partial, descriptor = temporary_file(path)
        with open(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(partial, path)
    except BaseException as error:  # A signal's Interrupted too: no temporary left.
        if partial is not None:
            partial.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise ConfigError(f"cannot write {path} ({error.strerror})") from None
        raise


def temporary_file(path: Path) -> tuple[Path, int]:
    """A new file beside `path`, `.<name>.vit_flax-<random>.tmp`, and its open descriptor
    (write-only): created exclusively, so that no existing file is ever written through it,
    with the permissions a new file gets (not mkstemp's 0600: the result is renamed into
    place)."""
    while True:
        partial = path.with_name(f".{path.name}.vit_flax-{secrets.token_hex(8)}.tmp")
        try:
            return partial, os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # 2**-64 by chance; or a file made to be in the way.
            continue


@dataclasses.dataclass
class Lock:
    """An exclusive flock on the workdir itself, and on workdir/LOCK, which holds the owner's
    pid. The kernel releases both when the process ends, however it ends (SIGKILL
    included): no stale locks. The directory's lock is what deleting LOCK cannot undo; LOCK's
    is what a file system without directory locks (NFS) still has. LOCK is never followed:
    a link there (or a file of several names) is refused, not truncated."""

    path: Path
    handle: object = None
    directory: int | None = None  # The locked directory's descriptor, when it locks.

    def __enter__(self) -> Lock:
        self.directory = self._lock_directory()
        try:
            handle = self._open(os.O_RDWR | os.O_CREAT)
            self._take(handle)
        except BaseException:
            self._release_directory()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def _lock_directory(self) -> int | None:
        """The directory's descriptor, flocked; None where directories cannot be locked."""
        descriptor = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            self._in_use(self._holder())
        except OSError:  # EBADF, ENOLCK (NFS): LOCK's flock alone keeps the rule.
            os.close(descriptor)
            return None
        return descriptor

    def _open(self, flags: int, mode: str = "r+"):
        """LOCK, opened without following a link there; a regular file of one name only."""
        lock = self.path / LOCK
        try:
            descriptor = os.open(lock, flags | os.O_NOFOLLOW, 0o666)
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            descriptor = None
        info = os.fstat(descriptor) if descriptor is not None else None
        if info is None or not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            if descriptor is not None:
                os.close(descriptor)
            raise ConfigError(f"workdir={self.path}: {LOCK} there is not vit_flax's lock file "
                              f"(a link, or a file of several names); vit_flax never writes "
                              f"through it: remove it, or use another workdir")
        return open(descriptor, mode)  # noqa: SIM115 - held until __exit__.

    def _take(self, handle) -> None:
        """flock the open lock file, or close it and raise the one-line "in use" error."""
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(handle)
            handle.close()
            self._in_use(holder)

    def _holder(self, handle=None) -> str:
        """The pid the lock's holder wrote in LOCK ("unknown" when it is gone)."""
        try:
            if handle is None:
                with self._open(os.O_RDONLY, "r") as lock:
                    return lock.read().strip() or "unknown"
            handle.seek(0)
            return handle.read().strip() or "unknown"
        except (OSError, ConfigError):
            return "unknown"

    def _in_use(self, holder: str):
        raise ConfigError(f"workdir={self.path} is in use by another training process "
                          f"(pid {holder}); wait for it or use another workdir") from None

    def refuse_if_held(self) -> None:
        """The "in use" error when another process holds the lock; creates nothing."""
        directory = self._lock_directory()
        if directory is not None:
            os.close(directory)  # Closing its only descriptor releases the flock.
        try:
            handle = self._open(os.O_RDONLY, "r")
        except FileNotFoundError:
            return
        self._take(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

    def _release_directory(self) -> None:
        if self.directory is not None:
            os.close(self.directory)
            self.directory = None

    def __exit__(self, *exc) -> bool:
        with contextlib.suppress(OSError):
            fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self._release_directory()
        return False
