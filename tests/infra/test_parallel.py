"""Data parallelism over several devices, no host transfers in the step loop, bfloat16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, random_images, xla_flags
from flax import nnx

import vit_flax
from vit_flax.data import sources as data
from vit_flax.infra import parallel
from vit_flax.training import steps
from vit_flax.training.feeds import batch_rows, to_device
from vit_flax.training.setup import create_train_state

# In one process with 4 CPU devices (one JAX start, each program compiled once): trains 4
# epochs on 4 devices and on 1, then 2 epochs on one count resumed on the other to 4; then
# a batch the devices cannot split. Prints the device counts and the error.
DEVICE_COUNTS = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import vit_flax
    from vit_flax.data import sources as data
    from vit_flax.infra import runtime
    runtime.use_compilation_cache(sys.argv[3])  # Each program compiles once, not per run.
    config = vit_flax.ViTConfig(**json.loads(sys.argv[1]))
    rng = np.random.default_rng(0)
    labels = np.arange(120) % 3
    images = np.clip(40 + 80 * labels[:, None, None, None]
                     + rng.integers(-30, 30, (120, 8, 8, 3)), 0, 255).astype(np.uint8)
    splits = data.from_arrays(images, labels, images[:24], labels[:24])
    devices = {"one": jax.devices()[:1], "four": jax.devices()}
    results = {}
    for name, runs in (("four", [(4, "four")]), ("one", [(4, "one")]),
                       ("four_then_one", [(2, "four"), (4, "one")]),
                       ("one_then_four", [(2, "one"), (4, "four")])):
        for epochs, count in runs:
            results[name] = vit_flax.train(config.replace(epochs=epochs), splits,
                                           f"{sys.argv[2]}/{name}", log=lambda _: None,
                                           devices=devices[count])["devices"]
    try:
        vit_flax.train(config.replace(batch_size=6, microbatch_size=6), splits,
                       sys.argv[2] + "/bad", log=lambda _: None)
    except vit_flax.ConfigError as error:
        results["error"] = str(error)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def device_counts(tmp_path_factory) -> tuple[Path, dict]:
    """DEVICE_COUNTS' workdirs and printed report; micro-batches of 4 in batches of 8: each
    of the 4 devices gets one row of each."""
    root = tmp_path_factory.mktemp("device_counts")
    env = dict(os.environ, XLA_FLAGS=xla_flags(4),
               JAX_PLATFORMS="cpu")
    completed = subprocess.run([sys.executable, "-c", DEVICE_COUNTS,
                                json.dumps(dict(TINY, microbatch_size=4)), str(root),
                                os.environ["VIT_FLAX_CACHE"]],  # The session's (conftest).
                               env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root, json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_four_devices_train_like_one(device_counts):
    root, report = device_counts
    assert (report["one"], report["four"]) == (1, 4)
    assert report["error"] == ("batch_size (6) must be divisible by the number of devices (4); "
                               "e.g. batch_size=4")
    one = json.loads((root / "one" / "history.json").read_text())
    four = json.loads((root / "four" / "history.json").read_text())
    # The same random draws (partitionable threefry) and the same sums, reduced in another
    # order across devices: float32 round-off only (measured: at most 1.1e-7 relative).
    for a, b in zip(one, four, strict=True):
        for key in ("loss", "val_loss"):
            assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (key, a[key], b[key])
    saved = json.loads((root / "four" / "results.json").read_text())
    assert saved["devices"] == 4
    # The weights too (measured: at most 9e-8 apart), except the attention key biases
    # (assert_same_weights says why).
    assert_same_weights(vit_flax.load(root / "one")[0], vit_flax.load(root / "four")[0])


@pytest.mark.slow
def test_resuming_on_another_device_count_ends_as_the_uninterrupted_run(device_counts):
    root, report = device_counts
    assert (report["four_then_one"], report["one_then_four"]) == (1, 4)  # Where each ended.
    history = {name: json.loads((root / name / "history.json").read_text())
               for name in ("four", "one", "four_then_one", "one_then_four")}
    # The state is saved and restored exactly; the resumed epochs differ from the
    # uninterrupted ones only in where the gradient sums are added (measured: at most
    # 1.4e-7 relative, one float32 ulp, between any two of the four runs).
    for resumed, uninterrupted in (("four_then_one", "four"), ("one_then_four", "one"),
                                   ("four_then_one", "one")):
        for a, b in zip(history[resumed], history[uninterrupted], strict=True):
            for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (resumed, key)
    models = {name: vit_flax.load(root / name)[0] for name in history}
    for name in ("four_then_one", "one_then_four", "one"):
        assert_same_weights(models[name], models["four"])


def assert_same_weights(model: vit_flax.ViT, reference: vit_flax.ViT) -> None:
    """Equal within float32 round-off (measured: 9e-8 at most after 4 epochs), except the
    attention key biases: their gradient is zero in exact arithmetic (softmax ignores a
    score added to every key of a query), so it is round-off, which AdamW scales up to
    whole learning-rate steps (they differ by up to 4.5e-4 even between uninterrupted runs
    on 1 and 4 devices)."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    for (path, a), b in zip(leaves, jax.tree.leaves(nnx.state(reference)), strict=True):
        if "['key']['bias']" not in jax.tree_util.keystr(path):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                       err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_step_loop_makes_no_host_transfers():
    config = vit_flax.ViTConfig(**TINY)
    images, labels = random_images(20, 8), np.arange(20) % 3
    mesh = parallel.data_mesh()
    setup = create_train_state(config, images, steps_per_epoch=3, mesh=mesh)
    state, statistics, train_step = setup.state, setup.statistics, setup.train_step
    arrays = to_device(data.Dataset(images, labels), mesh)
    rows = batch_rows(data.epoch_order(20, 0, 1), config.batch_size, mesh)
    totals = steps.Totals.zero()
    state, totals = train_step(state, statistics, totals, *arrays, rows[0])  # compiles
    # Everything the steps touch is on the device already: any implicit copy either way
    # would raise here.
    with jax.transfer_guard("disallow"):
        for row in rows[1:]:
            state, totals = train_step(state, statistics, totals, *arrays, row)
    assert float(totals.count) == 20.0


@pytest.mark.slow
def test_bfloat16_computes_in_bf16_and_keeps_float32_weights():
    config = vit_flax.ViTConfig(**TINY)
    full = vit_flax.ViT(config, rngs=nnx.Rngs(0))
    mixed = vit_flax.ViT(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(mixed, nnx.Param))} == \
        {jnp.dtype(jnp.float32)}
    images = jnp.asarray(random_images(6, 8))
    full_logits, mixed_logits = full(images), mixed(images)
    assert mixed_logits.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); a few roundings deep
    # the logits stay within a few percent of their scale, and are not identical.
    scale = float(jnp.abs(full_logits).max())
    difference = float(jnp.abs(full_logits - mixed_logits.astype(jnp.float32)).max())
    assert 0 < difference < 0.05 * scale


@pytest.mark.slow
def test_train_py_reports_devices_and_dtype(tmp_path, image_folder):
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo))
    try:
        import train
    finally:
        sys.path.remove(str(repo))
    from conftest import TINY_FLAGS
    assert train.main([*TINY_FLAGS, "--dataset", "folder", "--data-dir", str(image_folder),
                       "--epochs", "1", "--dtype", "bfloat16", "--compilation-cache", "none",
                       "--workdir", str(tmp_path / "w")]) == 0
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["devices"] == 1 and results["config"]["dtype"] == "bfloat16"
    assert np.isfinite(results["test_loss"])


@pytest.mark.slow
def test_streaming_from_the_host_trains_like_data_on_the_device(tmp_path):
    config = vit_flax.ViTConfig(**TINY, epochs=2)
    labels = np.arange(60) % 3
    splits = data.from_arrays(random_images(60, 8), labels, random_images(12, 8, seed=1),
                              labels[:12])
    quiet = lambda _: None  # noqa: E731
    on_device = vit_flax.train(config, splits, tmp_path / "device", log=quiet,
                               data_in="memory")
    streamed = vit_flax.train(config, splits, tmp_path / "host", log=quiet,
                              data_in="stream")
    device_history = json.loads((tmp_path / "device" / "history.json").read_text())
    host_history = json.loads((tmp_path / "host" / "history.json").read_text())
    # The same batches, keys and arithmetic; only where the gather happens differs. The
    # step programs differ in their input shapes, so allow float32 round-off.
    for a, b in zip(device_history, host_history, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert streamed["test_loss"] == pytest.approx(on_device["test_loss"], rel=1e-5)
