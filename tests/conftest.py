"""Shared fixtures: a model config small enough to compile in seconds, and generated data
in the real on-disk formats. No test reaches the network."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from vit_flax import ViTConfig
from vit_flax.models.hub_vit import ViTHub
from vit_flax.weights.keras_hub import BACKBONE_FIELDS, variable_at, weight_table

# 8x8 inputs resized to 12x12, 3x3 = 9 patches of 4x4, one block of width 8.
TINY = dict(num_classes=3, input_size=8, image_size=12, patch_size=4, projection_dim=8,
            num_heads=2, transformer_layers=1, mlp_head_units=(16, 8), batch_size=8)
# The same as train.py flags, with JAX's own (rolled) lowering of threefry: the same random
# bits as train.py's default unrolled one (tests/infra/test_runtime.py checks the hash's
# known answers; tests/training/test_recipe.py trains a whole run unrolled, bit for bit
# against an older commit), and a tiny run's programs compile in ~13 s instead of ~20 s
# (measured on this 2-core machine). Trained floats can differ from the unrolled run's in
# the last bit (the programs fuse differently): no test compares a rolled with an unrolled run.
TINY_FLAGS = ["--input-size", "8", "--image-size", "12", "--patch-size", "4",
              "--projection-dim", "8", "--num-heads", "2", "--transformer-layers", "1",
              "--mlp-head-units", "16,8", "--batch-size", "8", "--no-unroll-threefry"]


SHARED_CACHE = "VIT_FLAX_TEST_CACHE"  # The session's compilation cache, for every worker.
# XLA's LLVM back end without its optimisations (-O0) in every process of the session: most
# of the suite's time is XLA compiling small programs, and a tiny train step compiles in
# ~2.2-3.0 s instead of ~3.7-4.9 s (2-core CPU; the whole suite: 1,272 -> 1,030
# worker-seconds; docs/testing.md).
# XLA's own passes (fusion, layout, scheduling: what the programs compute, and in which
# order) are the same; the machine code is slower, and its float32 results can differ from
# -O3's in the last bits, so every comparison within the suite runs both sides under these
# flags. The golden runs (tests/training/test_recipe.py) compile as train.py does.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test's subprocess: TEST_XLA_FLAGS (any others the session was
    started with are left out), with `devices` CPU devices (None: one)."""
    count = [f"--xla_force_host_platform_device_count={devices}"] if devices else []
    return " ".join([TEST_XLA_FLAGS, *count])


def pytest_configure(config):
    """One JAX compilation cache for the whole test session, made by the controlling
    process before pytest-xdist starts its workers (they inherit the variable): the tests
    compile the same tiny programs again and again (a train step per trained run), and
    from the second time on each worker loads them instead. Never the user's ~/.cache.
    The session's XLA flags, likewise inherited (JAX reads them when its first device is
    made, which no import does)."""
    if SHARED_CACHE not in os.environ:
        os.environ[SHARED_CACHE] = tempfile.mkdtemp(prefix="vit_flax-test-jax-cache-")
        config.vit_flax_cache_owner = True
    given = os.environ.get("XLA_FLAGS", "")
    if TEST_XLA_FLAGS not in given:
        os.environ["XLA_FLAGS"] = f"{given} {TEST_XLA_FLAGS}".strip()


# The test files that take longest (worker-seconds measured with --durations), longest
# first: pytest-xdist hands them out before the rest, so that no long file starts last and
# leaves one worker running alone at the end (longest processing time first). Without this,
# --dist loadfile hands out the files with the most tests first, whatever their time.
LONGEST_FIRST = (  # Worker-seconds per file, 2026-12-06 (13c8030), -n 2 on the idle machine.
    "tests/training/test_resume.py",  # 133
    "tests/infra/test_multiprocess.py",  # 101
    "tests/training/test_loop.py",  # 79
    "tests/infra/test_parallel.py",  # 74
    "tests/training/test_recipe.py",  # 74
    "tests/test_gpu_check.py",  # 73
    "parity/test_keras_hub.py",  # 61
    "tests/training/test_group.py",  # 56
    "parity/test_training.py",  # 50
    "tests/weights/test_finetune.py",  # 34
    "tests/inference/test_export.py",  # 24
    "tests/infra/test_checkpoints.py",  # 21
    "tests/test_mutations.py",  # 21
    "tests/models/test_hub_vit.py",  # 20
)


# The `slow` tests of files edited elsewhere (the others carry @pytest.mark.slow where they
# are): they train end to end or start processes. Each name must be one the file has.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, LONGEST_FIRST's files first; None (xdist's own) for any other --dist."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            for scope in reversed(LONGEST_FIRST):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return LongestFirst(config, log)


def pytest_unconfigure(config):
    if getattr(config, "vit_flax_cache_owner", False):
        shutil.rmtree(os.environ.pop(SHARED_CACHE), ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def compilation_cache_for_the_session():
    """Every program this process compiles goes through the session's cache; runs that go
    through vit_flax.run (train.py, in this process or a subprocess) use the same folder."""
    import jax

    previous = os.environ.get("VIT_FLAX_CACHE")
    os.environ["VIT_FLAX_CACHE"] = os.environ[SHARED_CACHE]
    jax.config.update("jax_compilation_cache_dir", os.environ[SHARED_CACHE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    if previous is None:
        os.environ.pop("VIT_FLAX_CACHE", None)
    else:
        os.environ["VIT_FLAX_CACHE"] = previous


def _cpu_threefry_rule():
    """(JAX's table of CPU lowering rules, the threefry primitive), or None where this JAX
    has neither under the names runtime.unroll_threefry_on_cpu knows."""
    import importlib

    try:
        from jax._src.interpreters import mlir
    except ImportError:
        return None
    for name in ("jax._src.random.threefry2x32", "jax._src.prng"):
        try:
            primitive = importlib.import_module(name).threefry2x32_p
        except (ImportError, AttributeError):
            continue
        return mlir._platform_specific_lowerings["cpu"], primitive
    return None


@pytest.fixture(autouse=True)
def threefry_lowering_as_before():
    """A test that calls vit_flax.run (train.main) in this process switches JAX's CPU
    lowering of threefry to the unrolled one for the whole process; put back what was there,
    so that the next tests compile as they would alone (and ~4x faster: the tiny train step
    compiles in ~8 s rolled, ~30 s unrolled) and their programs are the same whatever ran
    before them in this worker (the shared compilation cache finds them)."""
    found = _cpu_threefry_rule()
    if found is None:
        yield
        return
    rules, primitive = found
    before = rules.get(primitive)
    yield
    if rules.get(primitive) is not before:
        if before is None:
            rules.pop(primitive, None)
        else:
            rules[primitive] = before


@pytest.fixture
def tiny_config() -> ViTConfig:
    return ViTConfig(**TINY)


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def write_image_folder(root: Path, classes=("cat", "dog", "frog"), train_per_class: int = 10,
                       test_per_class: int = 0, size: int = 8, suffix: str = ".png",
                       seed: int = 0) -> Path:
    """root/train/<class>/NNNN<suffix> (and root/test/...) with class-dependent brightness."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            for i in range(count):
                folder.mkdir(parents=True, exist_ok=True)
                base = 40 + 80 * label
                pixels = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images", train_per_class=12, test_per_class=4)


def write_preset(model: ViTHub, path, converter: dict | None = None):
    """The files save_to_preset writes, with the entries they hold for vit_flax."""
    config = model.config
    path.mkdir()
    backbone = {k: getattr(config, k) for k in BACKBONE_FIELDS}
    backbone["patch_size"] = [config.patch_size] * 2
    (path / "config.json").write_text(json.dumps({"class_name": "ViTBackbone",
                                                  "config": backbone}))
    if config.num_classes is not None:
        task = dict(num_classes=config.num_classes, pooling=config.pooling,
                    intermediate_dim=config.intermediate_dim, activation=config.activation,
                    dropout=config.head_dropout)
        (path / "task.json").write_text(json.dumps({"config": task}))
    if converter is not None:
        (path / "image_converter.json").write_text(json.dumps({"config": converter}))
    for entry in weight_table(config):
        value = np.asarray(variable_at(model, entry.flax).get_value())
        if entry.reshape:  # Back to the Conv2D's (p, p, C, D).
            value = value.reshape(config.patch_size, config.patch_size, -1, value.shape[-1])
        with h5py.File(path / entry.file, "a") as file:
            file.create_dataset(entry.h5, data=value)
            file[entry.h5].parent.attrs["name"] = entry.keras.rsplit("/", 2)[-2]
    return path
