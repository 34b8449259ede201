"""What is saved of a run, and how: the per-epoch run state and the best model (orbax).

A run is a pure function of its config: the data order of epoch e depends on (seed, e) and
the randomness of step s on fold_in(rng, s). So the state at an epoch's end (weights,
optimizer state, step, key) plus the history and the best score so far is all a restart
needs to reproduce, bit for bit, the run it continues.

Every checkpoint is verified before it is used. Once orbax has finished writing one (a run
state step `run_state/<epoch>/`, or the best model's directory), vit_flax writes `MANIFEST`
inside it: JSON `{"format": MANIFEST_FORMAT, "files": {path: {"size": n, "sha256": hex}}}`
with one entry per file of the checkpoint (paths relative to it, '/'-separated, sorted; the
manifest itself excluded), written to a temporary name, fsynced and renamed into place, so
a checkpoint without it was never completely saved. orbax lists only directories named by
their step number as steps and reads only the files it wrote, so the manifest is invisible
to it. A restore first compares every listed file (present, same size, same sha256);
files added to a checkpoint later are ignored, as orbax ignores them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vit_flax.config import ConfigError, ViTConfig
from vit_flax.infra.runtime import quiet_logger
from vit_flax.models import Model, abstract_model

MANIFEST = "vit_flax-manifest.json"  # Written last, inside each checkpoint: its checksums.
MANIFEST_FORMAT = "vit_flax checkpoint manifest 1"
# save_model writes the new model beside the old one, then swaps them by renames.
STAGED_SUFFIX = ".vit_flax-new"  # The new model, complete once it holds its manifest.
ASIDE_SUFFIX = ".vit_flax-old"  # The old model, during the swap.


class CheckpointError(OSError):
    """A checkpoint that cannot be written or read; the message says which and why."""


class _Unusable(Exception):
    """A checkpoint that is not as it was saved; the message says how (one line)."""


@dataclasses.dataclass
class RunProgress:
    """What the loop knows besides the train state, saved with it."""

    epoch: int = 0  # Epochs finished.
    history: list = dataclasses.field(default_factory=list)
    best_accuracy: float = -math.inf
    best_epoch: int = 0
    # A mid-epoch checkpoint's: the steps done in epoch `epoch + 1`, and that epoch's running
    # metric sums so far (steps.Totals as numbers); 0 and None at an epoch's end.
    step: int = 0
    totals: dict | None = None


class RunCheckpoints:
    """One orbax step per finished epoch in `directory`, the last `keep` verified ones kept.

    A step that fails verification when resuming (see the module docstring), or whose
    weights or optimizer state hold NaN or inf, is skipped with one line to `log`, deleted
    (so the epoch can be saved again) and the step before it is tried; when no step is
    usable the run starts afresh, with a warning.
    """

    def __init__(self, directory: Path, keep: int, log: Callable[[str], None] = print):
        self.log = log  # For one-line warnings (a skipped step, say).
        if keep < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {keep}")
        self.keep = keep
        self.directory = Path(directory).absolute()
        _refuse_links(self.directory)
        # Old steps are deleted by save() once the new one has its manifest, not by orbax's
        # max_to_keep, which deletes them before. Saves are synchronous: the epoch is on
        # disk before the next one starts, and a failed save has no writes left running.
        options = ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, state, progress: RunProgress, number: int | None = None) -> None:
        """Checkpoint the end of epoch `progress.epoch` (as orbax step `number`, default the
        epoch: mid-epoch checkpoints number theirs by optimizer steps), then delete the
        steps beyond the last `keep`; a one-line CheckpointError when it cannot be written
        (disk full, say), leaving the steps saved before as they were."""
        number = progress.epoch if number is None else number
        try:
            saved = self._write(state, progress, number)
        except (OSError, ValueError) as error:  # TensorStore reports I/O errors as ValueError.
            self._discard_unfinished(number)
            steps = self.manager.all_steps()
            kept = f"epoch {max(steps)} stays saved" if steps else "no epoch was saved before"
            raise CheckpointError(f"cannot save epoch {progress.epoch} in {self.directory} "
                                  f"({_reason(error)}); {kept}: free space (or fix "
                                  f"permissions), then run the same command to resume") from None
        if not saved:  # orbax saves no step at or before the last one.
            raise CheckpointError(f"epoch {progress.epoch} is already saved in {self.directory}")
        for old in sorted(self.manager.all_steps())[:-self.keep]:
            self.manager.delete(old)

    def _write(self, state, progress: RunProgress, number: int) -> bool:
        meta = dataclasses.asdict(progress)
        meta["best_accuracy"] = None if math.isinf(progress.best_accuracy) else \
            progress.best_accuracy
        saved = self.manager.save(number, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_savable(state)), progress=ocp.args.JsonSave(meta)))
        if saved and _primary():
            _write_manifest(self._path(number))
        return saved

    def _discard_unfinished(self, epoch: int) -> None:
        """Delete what a failed save left: orbax's temporary directory, or the step itself
        when it has no manifest (it never counts as saved). Without orbax's collective
        delete: the other processes may not have failed."""
        if _primary():
            for temporary in ocp.path.step.all_temporary_paths(self.directory):
                shutil.rmtree(temporary.get(), ignore_errors=True)
            if not (self._path(epoch) / MANIFEST).exists():
                shutil.rmtree(self._path(epoch), ignore_errors=True)
        self.manager.reload()

    def restore_latest(self, template_state):
        """(state, RunProgress) of the last usable epoch, or None when there is none."""
        skipped = False
        for epoch in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self._restore(epoch, template_state)
            except _Unusable as why:
                self.log(f"warning: skipping the checkpoint of epoch {epoch} "
                         f"({self._path(epoch)}): {why}; deleted it")
                self.manager.delete(epoch)
                skipped = True
        if skipped:
            self.log(f"warning: no usable checkpoint in {self.directory}; the run starts "
                     f"again from epoch 1")
        return None

    def _restore(self, epoch: int, template_state):
        restored = self._read(epoch, template_state)
        saved = restored["state"]
        bad = _non_finite({"params": saved["params"], "opt_state": saved["opt_state"]})
        if bad:
            raise _Unusable(f"NaN or inf in {bad}")
        meta = dict(restored["progress"])
        if meta["best_accuracy"] is None:
            meta["best_accuracy"] = -math.inf
        state = template_state.replace(
            step=saved["step"], params=saved["params"], opt_state=saved["opt_state"],
            rng=jax.random.wrap_key_data(saved["rng"],
                                         impl=jax.random.key_impl(template_state.rng)))
        return state, RunProgress(**meta)

    def _read(self, epoch: int, template_state) -> dict:
        """The verified step as orbax restores it; _Unusable when it is not as saved."""
        path = self._path(epoch)
        try:
            _verify(path)
        except OSError as error:  # Unreadable, which says nothing of what it holds.
            raise CheckpointError(f"cannot read {path} ({_reason(error)})") from None
        try:
            return self.manager.restore(epoch, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_savable(template_state)),
                progress=ocp.args.JsonRestore()))
        except (OSError, ValueError) as error:  # Its files are as saved: not corruption.
            raise CheckpointError(f"cannot restore {path} ({_reason(error)}): was it saved by "
                                  f"another version of vit_flax? Use another workdir") from None

    def _path(self, epoch: int) -> Path:
        return self.directory / str(epoch)

    def close(self) -> None:
        self.manager.close()


def _refuse_links(directory: Path) -> None:
    """A CheckpointError naming `directory`, or an entry of it, that is a symbolic link:
    orbax would follow it (read, and delete, what it points to) as if it were a step."""
    links = [directory] if directory.is_symlink() else []
    if directory.is_dir() and not links:
        links = sorted(entry for entry in directory.iterdir() if entry.is_symlink())
    if links:
        raise CheckpointError(f"{links[0]} is a symbolic link; vit_flax never follows links in "
                              f"its run state: remove it (what it points to is left as it is), "
                              f"then run the same command again")


def _savable(state) -> dict:
    # Typed PRNG keys are stored as their raw uint32 data.
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": jax.random.key_data(state.rng)}


def save_model(directory: str | os.PathLike, model: Model) -> None:
    """Write the model's weights and normalization statistics to `directory` (orbax),
    replacing what is there so that at every moment the old or the new model is complete:
    the new one is written beside it with its manifest (STAGED_SUFFIX), the old one renamed
    aside (ASIDE_SUFFIX), the new one renamed into place, the old one deleted. What a kill
    left of an earlier replacement is finished or deleted first. A one-line CheckpointError
    when it cannot be written; the old model is then kept."""
    final = Path(directory).absolute()
    staged, aside = _siblings(final)
    try:
        if _primary():
            _recover(final)
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            checkpointer.save(staged, args=ocp.args.StandardSave(nnx.state(model)))
        if _primary():
            _write_manifest(staged)
            if final.exists():
                os.replace(final, aside)
            os.replace(staged, final)
            _sync(final.parent)
            shutil.rmtree(aside, ignore_errors=True)
    except (OSError, ValueError) as error:  # TensorStore reports I/O errors as ValueError.
        if _primary():
            with contextlib.suppress(OSError):
                _recover(final)
        kept = "the previous one is kept" if final.exists() else "none was saved before"
        raise CheckpointError(f"cannot save the best model in {final} ({_reason(error)}); "
                              f"{kept}: free space (or fix permissions), then run the same "
                              f"command to resume") from None


def restore_model(directory: str | os.PathLike, config: ViTConfig) -> Model:
    """The model of `config` with the weights saved by `save_model` in `directory`, verified
    first: a one-line CheckpointError when they are missing, corrupt or not finite."""
    final = Path(directory).absolute()
    source = _complete_copy(final)
    try:
        _verify(source)
    except _Unusable as why:
        raise CheckpointError(f"best checkpoint {final} is corrupt ({why}); restore it from "
                              f"a backup, or train again into a new workdir (the same "
                              f"command gives the same model)") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {source} ({_reason(error)})") from None
    graphdef, abstract_state = nnx.split(abstract_model(config))
    # Onto this process' first device, whatever devices (or processes) saved it: a model
    # saved by a run over several processes loads in one (the caller replicates it).
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=local),
        abstract_state)
    try:
        # A failed restore's cancelled reads each log a traceback through asyncio (thousands
        # of lines before the one that says why): the CheckpointError below says it.
        with quiet_logger("asyncio", logging.CRITICAL), \
                ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            state = checkpointer.restore(source, args=ocp.args.StandardRestore(abstract_state))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot restore the model in {final} ({_mismatch(error)}); "
                              f"was it saved with another configuration?") from None
    bad = _non_finite(state)
    if bad:
        raise CheckpointError(f"best checkpoint {final} holds NaN or inf in {bad}")
    return nnx.merge(graphdef, state)


def _primary() -> bool:
    """Whether this process writes what vit_flax adds to orbax's checkpoints (manifests,
    renames, deletions); in a run of several processes, each writes its part of the arrays
    through orbax, and only process 0 the rest, as orbax does."""
    return jax.process_index() == 0


def _siblings(final: Path) -> tuple[Path, Path]:
    return final.with_name(final.name + STAGED_SUFFIX), final.with_name(final.name + ASIDE_SUFFIX)


def _complete_copy(final: Path) -> Path:
    """Where the model is: `final`, or while a replacement is under way (or was killed in
    it) the new one once complete, else the old one. Only reads, so that it is safe while
    another process saves."""
    staged, aside = _siblings(final)
    if final.is_dir():
        return final
    if (staged / MANIFEST).is_file():
        return staged
    if aside.is_dir():
        return aside
    raise CheckpointError(f"there is no saved model in {final}")


def _recover(final: Path) -> None:
    """Finish a replacement a kill interrupted: the new model if it is complete, else the
    old one, ends up at `final`; the other copy and orbax's partial writes are deleted."""
    staged, aside = _siblings(final)
    if not final.exists():
        if (staged / MANIFEST).is_file():
            os.replace(staged, final)
        elif aside.is_dir():
            os.replace(aside, final)
    # Only the names orbax gives its partial write of `staged` (with or without its
    # "-<timestamp>"): another entry of the workdir is not vit_flax's to delete.
    partial = re.compile(re.escape(staged.name + ocp.path.step.TMP_DIR_SUFFIX) + r"(-\d+)?")
    for leftover in (staged, aside, *(entry for entry in final.parent.iterdir()
                                      if partial.fullmatch(entry.name))):
        shutil.rmtree(leftover, ignore_errors=True)


def _write_manifest(directory: Path) -> None:
    """MANIFEST in `directory`: the size and sha256 of each of its files (module docstring)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name != MANIFEST:
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    partial = directory / (MANIFEST + ".partial")
    with open(partial, "w") as handle:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, directory / MANIFEST)
    _sync(directory)


def _sync(directory: Path) -> None:
    """Put the renames in `directory` on the disk, not only the files renamed."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _verify(directory: Path) -> None:
    """Raise _Unusable naming the first file of `directory` that is not as its MANIFEST
    says: missing, of another size, or of another sha256."""
    for name, entry in sorted(_read_manifest(directory).items()):
        path = directory / name
        if not path.is_file():
            raise _Unusable(f"{_missing_part(directory, name)} is missing")
        size = path.stat().st_size
        if size < entry["size"]:
            raise _Unusable(f"{name} is truncated ({size} of {entry['size']} bytes)")
        if size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise _Unusable(f"checksum mismatch in {name}")


def _read_manifest(directory: Path) -> dict:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise _Unusable(f"it has no {MANIFEST} (its save did not finish, or an older "
                        f"vit_flax wrote it)") from None
    except ValueError as error:  # Not JSON, or not text.
        raise _Unusable(f"its {MANIFEST} is unreadable ({_reason(error)})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    valid = isinstance(files, dict) and manifest.get("format") == MANIFEST_FORMAT and all(
        isinstance(entry, dict) and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str) for entry in files.values())
    if not valid:
        raise _Unusable(f"its {MANIFEST} is not a {MANIFEST_FORMAT}")
    return files


def _missing_part(directory: Path, name: str) -> str:
    """The outermost missing part of `name`: "state/" when the whole folder is gone."""
    parts = Path(name).parts
    for depth in range(1, len(parts)):
        if not (directory.joinpath(*parts[:depth])).is_dir():
            return "/".join(parts[:depth]) + "/"
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _non_finite(tree) -> str | None:
    """The path of the first floating-point array of `tree` that holds NaN or inf."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        # On the host: one jitted check per array shape would compile for seconds. The
        # weights are replicated, so this process's first copy holds all of each.
        values = np.asarray(leaf.addressable_shards[0].data if isinstance(leaf, jax.Array)
                            else leaf)
        if jnp.issubdtype(values.dtype, jnp.inexact) and not np.isfinite(values).all():
            return jax.tree_util.keystr(path, simple=True, separator="/")
    return None


def _mismatch(error: BaseException) -> str:
    """Why a restore failed: orbax's words for an array of another shape made plain (they
    advise an option of its API, which does not apply here), else _reason."""
    shapes = re.search(r"Requested shape: (\(.*?\)) is not compatible with the stored "
                       r"shape: (\(.*?\))", str(error))
    if shapes:
        return (f"an array is stored with shape {shapes.group(2)} where this configuration "
                f"has {shapes.group(1)}")
    return _reason(error)


def _reason(error: BaseException) -> str:
    """The OS's words for an I/O error (TensorStore's ValueErrors carry its errno), else the
    first line of the error."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"os_error_code='(\d+)'", str(error))
    if code:
        return os.strerror(int(code.group(1)))
    return (str(error).splitlines() or [type(error).__name__])[0][:200]
