"""The recipes: `keras` is the seed bit for bit; each ingredient of `strong` does what it says."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, TINY_FLAGS
from flax import nnx

import vit_flax
from vit_flax.models import augment
from vit_flax.models.seed_vit import TransformerBlock, drop_path_rates
from vit_flax.training import optim, steps

ROOT = Path(__file__).resolve().parents[2]

# A 2-epoch run with dropout, augmentation and micro-batches, printed to the last bit. It
# runs the vit_flax it imports (today's, or an older commit's: only API both have), with
# the threefry lowering of today's vit_flax/runtime.py (argv[2]), as train.py runs.
GOLDEN_RUN = textwrap.dedent("""
    import importlib.util, json, sys, tempfile
    import numpy as np
    import vit_flax
    try:  # Today's layout, or the flat one of the older commit.
        from vit_flax.data import sources as data
    except ImportError:
        from vit_flax import data
    spec = importlib.util.spec_from_file_location("runtime_of_today", sys.argv[2])
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    assert runtime.unroll_threefry_on_cpu()
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 3
    images = np.clip(40 + 80 * labels[:, None, None, None]
                     + rng.integers(-30, 30, (40, 8, 8, 3)), 0, 255).astype(np.uint8)
    splits = data.from_arrays(images, labels, images[:12], labels[:12])
    config = vit_flax.ViTConfig(**json.loads(sys.argv[1]), epochs=2, microbatch_size=4)
    with tempfile.TemporaryDirectory() as workdir:
        results = vit_flax.train(config, splits, workdir, log=lambda _: None)
        history = json.loads(open(workdir + "/history.json").read())
        model, _ = vit_flax.load(workdir)
        logits = vit_flax.predict(model, images[:12]).astype(np.float64)
    keys = ["loss", "accuracy", "top-5-accuracy", "val_loss", "val_accuracy",
            "val_top-5-accuracy"]
    print(json.dumps({"history": [[row[k].hex() for k in keys] for row in history],
                      "test": [results[k].hex() for k in ("test_loss", "test_accuracy")],
                      "logits": [float(logits.sum()).hex(), float(np.abs(logits).sum()).hex()]}))
""")
# main before the recipes existed (2026-12-01). Its results are compared bit for bit with
# today's on the machine that runs the test: XLA's CPU code, and so the last bits of float32
# sums, depend on the CPU (the same run differs in its last bits between an AVX2 and an
# AVX-512 machine), so stored hex values would test the machine, not the code.
BEFORE_RECIPES = "f86eabb84ddf1eec8ce150d3ede5d7fe35c4d027"


def golden_run(package_root: Path, cache: Path) -> dict:
    """GOLDEN_RUN's numbers with the vit_flax found in package_root. Both runs share the
    compilation `cache`: where the two versions lower to the same programs, the second loads
    them (the same programs give the same bits; the test compares the numbers either way)."""
    tiny = {k: v for k, v in TINY.items() if k != "mlp_head_units"} | {"mlp_head_units": [16, 8]}
    # cwd and PYTHONPATH first on sys.path: this vit_flax, not the installed one. No
    # XLA_FLAGS: compiled as train.py compiles (-O3), not as the rest of the suite (-O0).
    completed = subprocess.run(
        [sys.executable, "-c", GOLDEN_RUN, json.dumps(tiny),
         str(ROOT / "vit_flax/infra/runtime.py")],
        capture_output=True, text=True, timeout=600, cwd=package_root,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(package_root), XLA_FLAGS="",
                 JAX_COMPILATION_CACHE_DIR=str(cache),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_keras_recipe_trains_bit_for_bit_as_before_the_recipes(tmp_path):
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_RECIPES, "vit_flax"],
                             capture_output=True, timeout=60)
    assert archive.returncode == 0, (
        f"this test needs the git history of the checkout (commit {BEFORE_RECIPES[:7]}): "
        f"{archive.stderr.decode()[-500:]}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tmp_path, filter="data")
    cache = Path(os.environ["VIT_FLAX_CACHE"])  # The session's (conftest).
    before = golden_run(tmp_path, cache)
    assert before["history"][0][0] != before["history"][1][0]  # It trained.
    assert golden_run(ROOT, cache) == before
    assert vit_flax.ViTConfig.recipe("keras") == vit_flax.ViTConfig()  # train.py's default.


def test_recipes_set_defaults_and_explicit_fields_win():
    assert vit_flax.ViTConfig.recipe("keras") == vit_flax.ViTConfig()
    strong = vit_flax.ViTConfig.recipe("strong", head="cls", epochs=7)
    assert (strong.head, strong.epochs, strong.patch_size, strong.image_size) == \
        ("cls", 7, 4, 32)
    with pytest.raises(vit_flax.ConfigError, match="recipe must be one of"):
        vit_flax.ViTConfig.recipe("fast")


# --- schedule and loss ---------------------------------------------------------------------

def test_warmup_then_cosine_decay_to_zero():
    config = vit_flax.ViTConfig(learning_rate=1e-3, schedule="cosine", warmup_epochs=1.0,
                                epochs=3)
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10)
    rates = np.array([float(schedule(step)) for step in range(31)])
    np.testing.assert_allclose(rates[:11], np.linspace(0, 1e-3, 11), rtol=1e-6, atol=1e-12)
    # Cosine over the 20 steps after the warmup: half way (step 20) is half the peak.
    np.testing.assert_allclose(rates[20], 0.5e-3, rtol=1e-5)
    assert rates[30] == pytest.approx(0.0, abs=1e-12) and np.all(np.diff(rates[10:]) <= 0)
    assert optim.learning_rate_schedule(vit_flax.ViTConfig(), 10) == 1e-3  # The seed's.


def test_a_schedule_scales_the_adam_step_and_the_decay():
    params = {"w": jnp.array([2.0, -3.0])}
    grads = {"w": jnp.array([0.5, 0.5])}
    scheduled = optim.keras_adamw(lambda count: 1e-3 * (count + 1.0), 0.1)
    fixed = optim.keras_adamw(1e-3, 0.1)
    updates, _ = scheduled.update(grads, scheduled.init(params), params)
    expected, _ = fixed.update(grads, fixed.init(params), params)  # count 0: the same rate.
    np.testing.assert_array_equal(updates["w"], expected["w"])


def test_label_smoothing_mixes_the_one_hot_with_the_uniform():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 2])
    log_p = jax.nn.log_softmax(logits)
    targets = 0.9 * jax.nn.one_hot(labels, 3) + 0.1 / 3
    expected = -(targets * log_p).sum(-1)
    np.testing.assert_allclose(steps.cross_entropy(logits, labels, 0.1), expected, rtol=1e-6)
    np.testing.assert_array_equal(steps.cross_entropy(logits, labels),
                                  optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                                  labels))


# --- per-image augmentations -----------------------------------------------------------------

def test_random_crop_takes_windows_of_the_zero_padded_image():
    images = jnp.asarray(np.random.default_rng(0).integers(1, 256, (64, 6, 6, 1)), jnp.float32)
    cropped = np.asarray(augment.random_crop(jax.random.key(3), images, 2))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = set()
    for image, out in zip(padded, cropped, strict=True):
        found = [(y, x) for y in range(5) for x in range(5)
                 if np.array_equal(image[y:y + 6, x:x + 6], out)]
        assert found, "a crop is not a window of the padded image"
        offsets.add(found[0])
    assert len(offsets) > 15  # 64 draws over the 25 offsets: every image its own.


def test_random_erasing_fills_one_rectangle_of_bounded_area_with_noise():
    images = jnp.full((200, 16, 16, 3), 7.0)
    erased = np.asarray(augment.random_erasing(jax.random.key(0), images, 0.5))
    changed = (erased != 7.0).all(-1)  # Noise replaces all channels of a pixel.
    counts = changed.reshape(200, -1).sum(-1)
    assert 0.4 < np.mean(counts > 0) < 0.6  # probability 0.5
    for mask in changed[counts > 0]:
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.all()  # One solid rectangle ...
        assert 0.02 * 256 - 4 <= box.size <= 256 / 3 + 10  # ... of the stated area.
    np.testing.assert_array_equal(augment.random_erasing(jax.random.key(0), images, 0.0),
                                  images)


@pytest.mark.parametrize("name, signed, expected", [
    ("identity", 1.0, lambda x: x),
    ("solarize", 1.0, lambda x: 255.0 - x),  # threshold 0: every pixel inverted
    ("solarize", 0.0, lambda x: np.where(x >= 256, 255.0 - x, x)),  # threshold 256: none
    ("posterize", 1.0, lambda x: np.floor(x / 16) * 16),  # 4 bits dropped
    ("brightness", -1.0, lambda x: np.clip(0.1 * x, 0, 255)),
    ("rotate", 0.0, lambda x: x),
    ("translate_x", 0.0, lambda x: x),
    ("shear_y", 0.0, lambda x: x),
])
def test_rand_augment_operations(name, signed, expected):
    ops = dict(augment.RAND_AUGMENT_OPS)
    image = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3)), jnp.float32)
    np.testing.assert_allclose(ops[name](image, jnp.float32(signed)),
                               expected(np.asarray(image)), atol=1e-4)


def test_rand_augment_keeps_pixels_in_range_and_varies_per_image():
    images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (16, 8, 8, 3)), jnp.uint8)
    out = np.asarray(augment.rand_augment(jax.random.key(0), images, 2, 9.0))
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    changed = [not np.allclose(o, i) for o, i in zip(out, np.asarray(images), strict=True)]
    assert 8 <= sum(changed) <= 16  # Identity is one op of 13: most images change.


# --- mixing and stochastic depth -----------------------------------------------------------

def test_cutmix_label_weight_is_the_kept_area_and_mixup_a_constant():
    for seed in range(20):
        weight, label_weight = augment.sample_mixing(jax.random.key(seed), 8, 8, 0.0, 1.0)
        assert set(np.unique(weight)) <= {0.0, 1.0}
        assert float(label_weight) == pytest.approx(float(weight.mean()), abs=1e-7)
        weight, label_weight = augment.sample_mixing(jax.random.key(seed), 8, 8, 0.8, 0.0)
        assert np.all(np.asarray(weight) == float(label_weight))
        assert 0.0 <= float(label_weight) <= 1.0


def test_stochastic_depth_drops_whole_residual_branches_per_example():
    config = vit_flax.ViTConfig(**TINY, attention_dropout=0.0, dropout=0.0)
    assert drop_path_rates(config.replace(transformer_layers=3, stochastic_depth=0.2)) == \
        [0.0, 0.1, 0.2]
    block = TransformerBlock(config, drop_path=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (400, 9, 8))
    out = block(x, train=True, rngs=nnx.Rngs(dropout=2))
    same = np.all(np.isclose(out, x, atol=0.0), axis=(1, 2))  # Both branches dropped.
    assert 0.2 < same.mean() < 0.3  # 0.5 * 0.5
    np.testing.assert_array_equal(block(x, train=False, rngs=None),
                                  TransformerBlock(config, rngs=nnx.Rngs(0))(x, train=False,
                                                                              rngs=None))


@pytest.mark.slow
def test_train_py_strong_recipe_records_the_resolved_config(tmp_path, image_folder):
    completed = subprocess.run(
        [sys.executable, "train.py", "--recipe", "strong", *TINY_FLAGS, "--dataset", "folder",
         "--data-dir", str(image_folder), "--epochs", "1", "--mixup-alpha", "0.8",
         "--cutmix-alpha", "1.0", "--randaugment-ops", "2", "--random-erasing", "0.25",
         "--stochastic-depth", "0.1", "--workdir", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    strong = vit_flax.config.RECIPES["strong"]
    # The recipe's values, except where a flag was given (TINY_FLAGS, and every ingredient
    # the recipe leaves off: all of them together, in one real process).
    assert saved["crop_padding"] == strong["crop_padding"] and saved["head"] == "flatten"
    assert (saved["schedule"], saved["warmup_epochs"], saved["label_smoothing"]) == \
        ("cosine", strong["warmup_epochs"], strong["label_smoothing"])
    assert (saved["randaugment_ops"], saved["random_erasing"], saved["stochastic_depth"]) == \
        (2, 0.25, 0.1)
    assert (saved["patch_size"], saved["image_size"], saved["mixup_alpha"]) == (4, 12, 0.8)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"] == saved and np.isfinite(results["test_loss"])
