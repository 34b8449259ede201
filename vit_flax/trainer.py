"""The seed's `run_experiment`: fit with a validation split, keep the best weights by
val_accuracy, evaluate them on the test split. `run` is what train.py calls."""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax import augment, parallel, plots, resume, steps
from vit_flax import data as data_lib
from vit_flax.config import ConfigError, ViTConfig
from vit_flax.inference import BEST_CHECKPOINT, CONFIG_FILE, restore_model, save_model
from vit_flax.model import ViT, create_model, patches
from vit_flax.optim import keras_adamw

PACKAGES = ("vit_flax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def run(config: ViTConfig, *, dataset: str = "cifar100", data_dir: str | None = None,
        workdir: str = "workdir", train_examples: int | None = None,
        test_examples: int | None = None, coordinator_address: str | None = None,
        num_processes: int | None = None, process_id: int | None = None,
        overwrite: bool = False, keep_checkpoints: int = 2, log_every: int = 0) -> dict:
    """Load the named data set, then `train` on it. Everything train.py does.

    With `coordinator_address` (several hosts), JAX's distributed runtime is started first
    and the devices of every process form one data-parallel mesh.
    """
    if coordinator_address is not None:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    for name, value in (("train_examples", train_examples), ("test_examples", test_examples)):
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    prepare_workdir(workdir)
    splits = data_lib.load(dataset, data_dir, config.input_size)
    splits = data_lib.Splits(splits.train.take(train_examples),
                             splits.test and splits.test.take(test_examples), splits.class_names)
    return train(config.replace(num_classes=splits.num_classes), splits, workdir,
                 overwrite=overwrite, keep_checkpoints=keep_checkpoints, log_every=log_every)


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir {path} is a file; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--workdir {path} is not writable ({error.strerror})") from None
    return path


def check_data(config: ViTConfig, splits: data_lib.Splits) -> None:
    expected = config.input_shape
    for name, part in (("train", splits.train), ("test", splits.test)):
        if part is None:
            continue
        if part.images.shape[1:] != expected:
            raise data_lib.DataError(f"{name} images are {part.images.shape[1:]}, the config "
                                     f"expects {expected} (input_size, channels)")
        data_lib.check_labels(part, config.num_classes, name)
    if len(splits.train) == 0:
        raise data_lib.DataError("the training set is empty")


def to_device(dataset: data_lib.Dataset, mesh) -> tuple[jax.Array, jax.Array]:
    """The host -> device boundary: a whole split goes to every device once, as uint8."""
    return jax.device_put((dataset.images, dataset.labels), parallel.replicated(mesh))


def batch_rows(order: np.ndarray, batch_size: int, mesh) -> list[jax.Array]:
    """An epoch's batch index rows, put on the devices in one go before the epoch starts
    (each row split across them), so the steps themselves copy nothing from the host."""
    rows = list(data_lib.batch_indices(order, batch_size))
    return jax.device_put(rows, parallel.batch_sharded(mesh))


def fits_on_device(dataset: data_lib.Dataset, mesh, fraction: float = 0.25) -> bool:
    """Whether a split may live on each device: at most `fraction` of its memory (the rest
    is for weights, optimizer state and activations). CPUs report no limit: it fits."""
    stats = mesh.devices.flat[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return limit is None or dataset.images.nbytes + dataset.labels.nbytes <= fraction * limit


class DeviceFeed:
    """The split lives on the devices; a step gets the whole arrays and its index row, and
    gathers its batch in jit. No per-step host work."""

    def __init__(self, dataset: data_lib.Dataset, mesh):
        self.arrays, self.mesh, self.size = to_device(dataset, mesh), mesh, len(dataset)

    def batches(self, order: np.ndarray, batch_size: int):
        for row in batch_rows(order, batch_size, self.mesh):
            yield (*self.arrays, row)


class HostFeed:
    """For a split too large for the devices: the host gathers each batch, and sends it
    `PREFETCH` steps ahead of the step that uses it (the step indexes it with 0..B-1)."""

    PREFETCH = 2

    def __init__(self, dataset: data_lib.Dataset, mesh):
        self.dataset, self.mesh, self.size = dataset, mesh, len(dataset)

    def _put(self, row: np.ndarray):
        safe = np.maximum(row, 0)
        local = np.where(row >= 0, np.arange(len(row)), -1).astype(np.int32)
        batch = (self.dataset.images[safe], self.dataset.labels[safe], local)
        return jax.device_put(batch, parallel.batch_sharded(self.mesh))

    def batches(self, order: np.ndarray, batch_size: int):
        queue = collections.deque()
        for row in data_lib.batch_indices(order, batch_size):
            queue.append(self._put(row))
            if len(queue) > self.PREFETCH:
                yield queue.popleft()
        yield from queue


def make_feed(dataset: data_lib.Dataset, mesh, on_device: bool | None = None):
    """DeviceFeed when the split fits on the devices (or on_device=True), else HostFeed."""
    if on_device is None:
        on_device = fits_on_device(dataset, mesh)
    return DeviceFeed(dataset, mesh) if on_device else HostFeed(dataset, mesh)


class EventLog:
    """TensorBoard event files (tensorboardX) in workdir/tensorboard, beside history.json:
    per epoch the train and validation metrics, the learning rate and the epoch time; per
    step (with --log-every) the running training loss and accuracy. Process 0 only."""

    def __init__(self, workdir: Path, config: ViTConfig):
        self.config = config
        self.writer = None
        if _is_main_process():
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        for name, value in row.items():
            if name != "epoch":
                split, metric = ("validation", name[4:]) if name.startswith("val_") \
                    else ("train", name)
                self.writer.add_scalar(f"{split}/{metric}", value, row["epoch"])
        self.writer.add_scalar("train/learning_rate", self.config.learning_rate, row["epoch"])
        self.writer.flush()

    def step(self, step: int, means: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"step/{name}", value, step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()
        return False


class Progress:
    """A tqdm bar with live loss and accuracy on a terminal; plain lines elsewhere."""

    def __init__(self, epoch: int, epochs: int, total_steps: int):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc=f"Epoch {epoch}/{epochs}", leave=False,
                            dynamic_ncols=True)
        self.last_refresh = 0.0

    def update(self, done_steps: int, totals_so_far: steps.Metrics) -> None:
        if self.bar is None or not done_steps or time.monotonic() - self.last_refresh < 0.5:
            return
        # totals of an earlier step, already computed or nearly: reading them keeps the
        # device busy with the steps queued behind.
        means = steps.summarize(totals_so_far)
        self.bar.n = done_steps
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", accuracy=f"{means['accuracy']:.4f}")
        self.last_refresh = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def evaluate(eval_step, params, statistics, feed, batch_size: int) -> dict[str, float]:
    totals = steps.zero_totals()
    for batch in feed.batches(np.arange(feed.size), batch_size):
        totals = eval_step(params, statistics, totals, *batch)
    return steps.summarize(totals)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _is_main_process() -> bool:
    """On several hosts every process trains; only the first writes files and logs."""
    return jax.process_index() == 0


def _write_json(path: Path, value) -> None:
    if not _is_main_process():
        return
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    partial.replace(path)  # Readers never see a half-written file.


def _line(prefix: str, metrics: dict[str, float]) -> str:
    return " - ".join(f"{prefix}{name}: {value:.4f}" for name, value in metrics.items())


def train(config: ViTConfig, splits: data_lib.Splits, workdir: str | os.PathLike,
          log: Callable[[str], None] = print, devices=None,
          data_on_device: bool | None = None, overwrite: bool = False,
          keep_checkpoints: int = 2, log_every: int = 0) -> dict:
    """Fit, keep the best weights by val_accuracy, evaluate them on the test split.

    Data-parallel over `devices` (default: all of them). The data lives on the devices
    unless it would take more than a quarter of their memory (or data_on_device=False), in
    which case batches stream from the host. Writes config.json, history.json (every
    epoch), the best checkpoint, results.json and the figures into `workdir`; returns the
    contents of results.json.

    Every epoch's end is checkpointed (the last `keep_checkpoints` kept); calling train
    again on the same workdir resumes there and ends as the uninterrupted run would have.
    A workdir holding another configuration's run is an error unless `overwrite`.
    SIGTERM/SIGINT stop the run at the next step, keep the last epoch's checkpoint and raise
    resume.Interrupted. TensorBoard events go to workdir/tensorboard (every epoch, and every
    `log_every` steps when > 0).
    """
    if log_every < 0:
        raise ConfigError(f"--log-every must be >= 0, got {log_every}")
    mesh = parallel.data_mesh(devices)
    parallel.check_batch_size(config, mesh)
    check_data(config, splits)
    workdir = prepare_workdir(workdir)
    resume.check_workdir_config(workdir, config, CONFIG_FILE, overwrite)
    if not _is_main_process():
        log = lambda _: None  # noqa: E731
    train_set, validation_set = data_lib.validation_split(splits.train, config.validation_split)
    # As the seed: Normalization is adapted on all training images, the validation part too.
    model = create_model(config, splits.train.images)
    if _is_main_process():
        (workdir / CONFIG_FILE).write_text(config.to_json() + "\n")
        _plot_patches(model, train_set.images[0], workdir / "patches.png")

    graphdef, params, statistics = steps.split_model(model)
    tx = keras_adamw(config.learning_rate, config.weight_decay)
    state = steps.TrainState.create(params, tx, config)
    state, statistics = jax.device_put((state, statistics), parallel.replicated(mesh))
    train_feed = make_feed(train_set, mesh, data_on_device)
    validation_feed = make_feed(validation_set, mesh, data_on_device) \
        if len(validation_set) else None

    started = time.perf_counter()
    example = next(train_feed.batches(np.zeros(config.batch_size, np.int32), config.batch_size))
    train_step = steps.make_train_step(graphdef, tx, mesh, config.microbatch_size).lower(
        state, statistics, steps.zero_totals(), *example).compile()
    compile_seconds = time.perf_counter() - started
    log(f"Training on {len(train_set)} images, validating on {len(validation_set)}, "
        f"{mesh.size} {mesh.devices.flat[0].platform.upper()} device(s), data "
        f"{'on the devices' if isinstance(train_feed, DeviceFeed) else 'streamed'}; "
        f"train step compiled in {compile_seconds:.1f}s")
    eval_step = steps.make_eval_step(graphdef, mesh)

    checkpoints = resume.RunCheckpoints(workdir, keep_checkpoints)
    restored = checkpoints.restore_latest(state)
    run = resume.RunProgress()
    if restored is not None:
        state, run = restored
        state = jax.device_put(state, parallel.replicated(mesh))
        log(f"Resuming {workdir} after epoch {run.epoch}")
    _write_json(workdir / "history.json", run.history)
    with resume.StopSignals() as stop, contextlib.closing(checkpoints), \
            EventLog(workdir, config) as events:
        for epoch in range(run.epoch + 1, config.epochs + 1):
            state, row = _train_epoch(config, epoch, state, statistics, train_step, eval_step,
                                      train_feed, validation_feed, stop, events, log_every)
            if row is None:
                raise resume.Interrupted(
                    f"{stop.requested}: stopped in epoch {epoch}; {workdir} holds epoch "
                    f"{run.epoch}: run the same command to resume")
            bad_step = row.pop("first_nonfinite_step")
            if bad_step >= 0:
                raise FloatingPointError(
                    f"the training loss became non-finite at step {int(bad_step)} (epoch "
                    f"{epoch}); {workdir} keeps epoch {run.epoch}, the last finite one "
                    f"(lower --learning-rate?)")
            run.history.append(row)
            events.epoch(row)
            log(f"Epoch {epoch}/{config.epochs} - {row['epoch_seconds']:.1f}s - "
                + _line("", {k: row[k] for k in steps.METRIC_NAMES})
                + (" - " + _line("", {k: row[k] for k in row if k.startswith("val_")})
                   if validation_feed is not None else ""))
            # ModelCheckpoint(save_best_only=True): only a strict improvement saves. Without
            # a validation set every epoch saves, so the last one is kept.
            score = row.get("val_accuracy", np.inf)
            if score > run.best_accuracy or validation_feed is None:
                run.best_accuracy, run.best_epoch = score, epoch
                save_model(workdir / BEST_CHECKPOINT,
                           nnx.merge(graphdef, state.params, statistics))
            run.epoch = epoch
            checkpoints.save(state, run)
            _write_json(workdir / "history.json", run.history)

    results = _finish(config, splits, workdir, run.history, run.best_epoch, eval_step, mesh,
                      data_on_device, log)
    results.update(compile_seconds=compile_seconds, train_examples=len(train_set),
                   validation_examples=len(validation_set))
    _write_json(workdir / "results.json", results)
    return results


def _train_epoch(config, epoch, state, statistics, train_step, eval_step, train_feed,
                 validation_feed, stop, events, log_every):
    """One epoch of training and validation: (state, history row), or (state, None) when a
    stop signal arrived during it (the partial epoch is abandoned)."""
    started = time.perf_counter()
    order = data_lib.epoch_order(train_feed.size, config.seed, epoch)
    progress = Progress(epoch, config.epochs, -(-len(order) // config.batch_size))
    totals = steps.zero_totals()
    for i, batch in enumerate(train_feed.batches(order, config.batch_size)):
        if stop.requested:
            progress.close()
            return state, None
        previous = totals
        state, totals = train_step(state, statistics, totals, *batch)
        progress.update(i, previous)
        if log_every and i and i % log_every == 0:  # Running means up to the step before.
            events.step(int(state.step) - 1, steps.summarize(previous))
    row = {"epoch": epoch, **steps.summarize(totals),  # Waits for the last step.
           "first_nonfinite_step": float(totals["first_nonfinite_step"])}
    train_seconds = time.perf_counter() - started
    progress.close()
    if validation_feed is not None:
        validation = evaluate(eval_step, state.params, statistics, validation_feed,
                              config.batch_size)
        row.update({f"val_{name}": value for name, value in validation.items()})
    row["epoch_seconds"] = time.perf_counter() - started
    row["images_per_second"] = train_feed.size / train_seconds
    return state, row


def _finish(config, splits, workdir: Path, history, best_epoch: int, eval_step, mesh,
            data_on_device, log) -> dict:
    """Restore the best weights (as the seed's model.load_weights), evaluate, plot."""
    results = {"test_loss": None, "test_accuracy": None, "test_top-5-accuracy": None}
    if history and _is_main_process():
        for item in ("loss", "top-5-accuracy"):
            if f"val_{item}" in history[0]:
                plots.plot_history(history, item, workdir / f"{item}.png")
    if best_epoch and splits.test is not None and len(splits.test):
        _, params, statistics = steps.split_model(restore_model(workdir / BEST_CHECKPOINT, config))
        params, statistics = jax.device_put((params, statistics), parallel.replicated(mesh))
        test = evaluate(eval_step, params, statistics,
                        make_feed(splits.test, mesh, data_on_device), config.batch_size)
        results.update({f"test_{name}": value for name, value in test.items()})
        log(f"Test accuracy: {round(test['accuracy'] * 100, 2)}%")
        log(f"Test top 5 accuracy: {round(test['top-5-accuracy'] * 100, 2)}%")
    elif splits.test is None:
        log("No test split (an image folder without test/): test metrics are not computed.")
    elif not best_epoch:
        log("No epoch was trained: there is no checkpoint to test.")
    results.update(best_epoch=best_epoch, test_examples=0 if splits.test is None
                   else len(splits.test), config=json.loads(config.to_json()),
                   devices=mesh.size, versions=versions())
    return results


def _plot_patches(model: ViT, image: np.ndarray, path: Path) -> None:
    """patches.png: one training image resized to image_size, and its patches."""
    config = model.config
    resized = augment.resize(jnp.asarray(image, jnp.float32)[None], config.image_size)
    plots.plot_patches(np.asarray(resized[0]), np.asarray(patches(resized, config.patch_size)[0]),
                       config.patch_size, path)
