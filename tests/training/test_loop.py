"""The training step, the metrics and the fit/checkpoint/evaluate loop."""

from __future__ import annotations

import collections
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vit_flax
from vit_flax.data import sources as data
from vit_flax.models import augment, create_model
from vit_flax.training import steps
from vit_flax.training.optim import keras_adamw


def test_metrics_follow_keras_tie_rules():
    logits = jnp.array([[1.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0],
                        [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 0.0],
                        [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 0.0]])
    labels = jnp.array([2, 5, 6])
    metrics = steps.per_example_metrics(logits, labels)
    # argmax picks the first of tied maxima (index 1), so label 2 is not "accurate".
    np.testing.assert_array_equal(metrics["accuracy"], [0, 0, 0])
    # Label 5 ties with the 5th largest logit: Keras' in_top_k counts it; label 6 is 7th.
    np.testing.assert_array_equal(metrics["top-5-accuracy"], [1, 1, 0])
    expected_loss = -jax.nn.log_softmax(logits)[jnp.arange(3), labels]
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-6)


def test_epoch_metrics_are_sample_weighted():
    totals = steps.Totals.zero().replace(
        sums={"loss": jnp.array(30.0), "accuracy": jnp.array(3.0),
              "top-5-accuracy": jnp.array(9.0)}, count=jnp.array(10.0))
    assert totals.means() == {"loss": 3.0, "accuracy": 0.3, "top-5-accuracy": 0.9}


def deterministic_setup(config, count, microbatch_size=None, tx=None):
    """Dropout off and mirror-symmetric images with zero rotation and zoom ranges: the
    augmentation is then an exact identity and a train step is a deterministic function."""
    config = config.replace(attention_dropout=0.0, dropout=0.0, head_dropout=0.0,
                            rotation_factor=0.0, zoom_factor=0.0,
                            microbatch_size=microbatch_size or config.batch_size)
    half = np.random.default_rng(0).integers(0, 256, (count, 8, 4, 3), dtype=np.uint8)
    images = np.concatenate([half, half[:, :, ::-1]], axis=2)
    labels = np.arange(count, dtype=np.int32) % config.num_classes
    model = create_model(config, images)
    graphdef, params, statistics = steps.split_model(model)
    tx = tx or keras_adamw(config.learning_rate, config.weight_decay)
    state = steps.TrainState.create(params, tx, config)
    return steps.make_train_step(graphdef, tx, microbatch_size=config.microbatch_size,
                                 loss=steps.LossOptions.of(config)), state, \
        statistics, jnp.asarray(images), jnp.asarray(labels)


@pytest.mark.slow
def test_padding_of_the_last_batch_changes_nothing(tiny_config):
    # Five real examples in a batch of 8 (three -1 pads) must train exactly like a batch of
    # five: same loss mean, same gradients, same AdamW step.
    step, state, statistics, images, labels = deterministic_setup(tiny_config, 5)
    padded_state, padded_totals = step(state, statistics, steps.Totals.zero(), images, labels,
                                       jnp.array([0, 1, 2, 3, 4, -1, -1, -1]))
    step5, state5, statistics, images, labels = deterministic_setup(tiny_config, 5)
    exact_state, exact_totals = step5(state5, statistics, steps.Totals.zero(), images, labels,
                                      jnp.arange(5))
    assert float(padded_totals.count) == 5.0
    np.testing.assert_allclose(padded_totals.sums["loss"], exact_totals.sums["loss"], rtol=1e-6)
    # A different batch shape is a different XLA program, with float32 round-off in the
    # gradient. Adam normalises each step to ~lr = 1e-3, and the key biases' gradients are
    # analytically zero (softmax ignores a per-query shift), i.e. pure round-off, whose
    # normalised step differs by up to ~2e-6 between programs. 1e-5 is 1% of one step; a
    # mishandled pad (an extra example in the mean) moves weights by a whole step.
    for padded, exact in zip(jax.tree.leaves(padded_state.params),
                             jax.tree.leaves(exact_state.params), strict=True):
        np.testing.assert_allclose(padded, exact, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("microbatch_size", [4, 2, 1])
def test_micro_batches_give_the_whole_batch_update(tiny_config, microbatch_size):
    # Five real examples and three pads in a batch of 8, in micro-batches of 4 (3 + 2 real
    # examples), 2 (2 + 1 + 1 + 1) or 1 (three of pads only). Plain SGD with lr 1 (Adam
    # would hide a wrongly scaled gradient): the step must be minus the mean gradient over
    # the five, as in one pass, up to float32 round-off of the same sums in another order.
    batch = jnp.array([0, 1, 2, 3, 4, -1, -1, -1])
    sgd = optax.sgd(1.0)
    step, state, statistics, images, labels = deterministic_setup(tiny_config, 5, tx=sgd)
    whole_state, whole_totals = step(state, statistics, steps.Totals.zero(), images, labels,
                                     batch)
    step, state, statistics, images, labels = deterministic_setup(tiny_config, 5,
                                                                  microbatch_size, sgd)
    micro_state, micro_totals = step(state, statistics, steps.Totals.zero(), images, labels,
                                     batch)
    assert float(micro_totals.count) == 5.0
    for name in steps.METRIC_NAMES:
        np.testing.assert_allclose(micro_totals.sums[name], whole_totals.sums[name], rtol=1e-6)
    for micro, whole in zip(jax.tree.leaves(micro_state.params),
                            jax.tree.leaves(whole_state.params), strict=True):
        np.testing.assert_allclose(micro, whole, atol=1e-5)


def test_train_step_donates_and_advances(tiny_config):
    step, state, statistics, images, labels = deterministic_setup(tiny_config, 8)
    old_leaves = jax.tree.leaves(state)
    # No numpy views of the old buffers: on the CPU a live view would block the donation.
    checksum = float(jnp.sum(jax.tree.leaves(state.params)[-1]))
    new_state, _ = step(state, statistics, steps.Totals.zero(), images, labels, jnp.arange(8))
    assert int(new_state.step) == 1
    assert float(jnp.sum(jax.tree.leaves(new_state.params)[-1])) != checksum
    # The old state's buffers were donated to the new one: no second copy of the weights.
    assert all(leaf.is_deleted() for leaf in old_leaves if leaf.dtype == jnp.float32)


def brightness_problem(count: int, seed: int):
    """Three classes told apart by brightness: learnable in a few epochs by any model."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    images = np.clip(40 + 80 * labels[:, None, None, None]
                     + rng.integers(-30, 30, (count, 8, 8, 3)), 0, 255).astype(np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = vit_flax.ViTConfig(num_classes=3, input_size=8, image_size=12, patch_size=4,
                                projection_dim=8, num_heads=2, transformer_layers=1,
                                mlp_head_units=(16, 8), batch_size=16, epochs=15)
    splits = data.from_arrays(*brightness_problem(200, 0), *brightness_problem(60, 1))
    workdir = tmp_path_factory.mktemp("run")
    return config, splits, workdir, vit_flax.train(config, splits, workdir, log=lambda _: None)


@pytest.mark.slow
def test_loss_falls_on_a_learnable_problem(trained):
    config, _, workdir, results = trained
    history = json.loads((workdir / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, config.epochs + 1))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert results["test_accuracy"] > 0.8  # Chance is 1/3; measured 0.88 after 8 epochs.


@pytest.mark.slow
def test_best_checkpoint_is_the_first_best_val_accuracy(trained):
    config, splits, workdir, results = trained
    history = json.loads((workdir / "history.json").read_text())
    scores = [row["val_accuracy"] for row in history]
    assert results["best_epoch"] == 1 + int(np.argmax(scores))  # argmax: the first maximum
    model, loaded_config = vit_flax.load(workdir)
    assert loaded_config == config.replace(num_classes=3)
    _, validation = data.validation_split(splits.train, config.validation_split)
    logits = vit_flax.predict(model, validation.images)
    accuracy = np.mean(np.argmax(logits, -1) == validation.labels)
    assert accuracy == pytest.approx(max(scores), abs=1e-9)
    # The saved model normalizes raw images by statistics of *all* training images.
    mean, variance = augment.channel_statistics(splits.train.images)
    np.testing.assert_array_equal(model.data_augmentation.normalization.mean[...], mean)
    np.testing.assert_array_equal(model.data_augmentation.normalization.variance[...], variance)


@pytest.mark.slow
def test_training_is_reproducible(trained, tmp_path):
    config, splits, workdir, results = trained
    again = vit_flax.train(config, splits, tmp_path, log=lambda _: None)
    first = json.loads((workdir / "history.json").read_text())
    second = json.loads((tmp_path / "history.json").read_text())
    metric_names = [k for k in first[0]
                    if k not in ("epoch_seconds", "images_per_second", "data_wait")]
    assert [[row[k] for k in metric_names] for row in first] == \
        [[row[k] for k in metric_names] for row in second]
    assert again["test_accuracy"] == results["test_accuracy"]


def test_each_epoch_sees_every_training_example_once(tiny_config):
    step, state, statistics, images, labels = deterministic_setup(tiny_config, 21)
    totals = steps.Totals.zero()
    for row in jnp.asarray(data.batch_indices(data.epoch_order(21, 0, 1), 8)):
        state, totals = step(state, statistics, totals, images, labels, row)
    assert float(totals.count) == 21.0  # 8 + 8 + 5: the partial batch is trained on.
    assert int(state.step) == 3


def test_the_optimizer_sees_only_parameters(tiny_config):
    model = create_model(tiny_config, np.zeros((4, 8, 8, 3), np.uint8))
    _, params, statistics = steps.split_model(model)
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == \
        sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # What is left out of training: Normalization's mean (3), variance (3) and count.
    assert sorted(leaf.size for leaf in jax.tree.leaves(statistics)) == [1, 3, 3]


# --- every feed, for a run and for a group ---------------------------------------------------

HISTORY_METRICS = ("loss", "accuracy", "top-5-accuracy", "val_loss", "val_accuracy",
                   "val_top-5-accuracy")


def metrics_of(workdir) -> list[list[float]]:
    return [[row[k] for k in HISTORY_METRICS]
            for row in json.loads((workdir / "history.json").read_text())]


@pytest.mark.slow
def test_a_folder_streamed_from_disk_trains_as_in_memory(tmp_path, monkeypatch):
    # The same files, order and batches: decoded up front (DeviceFeed) or by the streaming
    # pipeline each step (StreamFeed). Measured: identical histories on one CPU device; the
    # stated tolerance is float32 round-off of the two step programs (gather in the step, or
    # on the host), 1e-5 relative.
    from conftest import TINY, write_image_folder

    from vit_flax.data import stream
    from vit_flax.training import feeds

    paced = collections.Counter()  # Steps whose output went through a Pace, by its limit.
    pace = feeds.Pace.__call__
    monkeypatch.setattr(feeds.Pace, "__call__", lambda self, output: (
        paced.update([self.ahead]), pace(self, output)))
    folder = write_image_folder(tmp_path / "images", train_per_class=7, size=12, suffix=".jpg")
    config = vit_flax.ViTConfig(**TINY, epochs=2)
    lines = {}
    for data_in in ("memory", "stream"):
        lines[data_in] = []
        vit_flax.train(config, stream.open_folder(folder, 8), tmp_path / data_in,
                       data_in=data_in, log=lines[data_in].append)
    assert "data on the devices" in lines["memory"][0] and "streamed" in lines["stream"][0]
    # Every train and validation step of both epochs (19 and 2 images: 3 + 1 steps each).
    assert paced == {None: 8, feeds.StreamFeed.AHEAD: 8}
    for streamed, in_memory in zip(metrics_of(tmp_path / "stream"),
                                   metrics_of(tmp_path / "memory"), strict=True):
        assert streamed == pytest.approx(in_memory, rel=1e-5)
    rows = json.loads((tmp_path / "stream" / "history.json").read_text())
    assert all(0.0 <= row["data_wait"] < 1.0 for row in rows)
    assert " - data wait: " in lines["stream"][1]


@pytest.mark.slow
def test_unreadable_images_are_named_and_never_cost_a_run_its_results(tmp_path):
    from conftest import TINY, write_image_folder

    from vit_flax.data import stream
    from vit_flax.training import feeds

    folder = write_image_folder(tmp_path / "images", train_per_class=7, test_per_class=2,
                                size=12, suffix=".jpg")
    first_test = sorted((folder / "test").rglob("*.jpg"))[0]
    first_test.write_bytes(b"\xff\xd8 truncated")
    config = vit_flax.ViTConfig(**TINY, epochs=1)
    # In memory every file is read before training: the test image's error comes first.
    lines = []
    with pytest.raises(data.DataError, match=f"cannot read image {first_test}: "):
        vit_flax.train(config, stream.open_folder(folder, 8), tmp_path / "memory",
                       data_in="memory", log=lines.append)
    assert not [line for line in lines if line.startswith("Epoch ")]  # Was after training.
    # Streamed, it is named, left out of the test metrics and of attention.png; the run
    # ends with its results (the figure read the first 4 test images: it ended the run).
    with pytest.warns(feeds.BadImageWarning):
        vit_flax.train(config, stream.open_folder(folder, 8), tmp_path / "stream",
                       data_in="stream", log=lines.append)
    results = json.loads((tmp_path / "stream" / "results.json").read_text())
    assert (results["test_examples"], results["test_unreadable"]) == (6, 1)
    assert "1 test images could not be read (each named above): the test metrics leave them " \
           "out" in lines
    assert (tmp_path / "stream" / "attention.png").is_file()
    # Every training image gone after epoch 1 (a folder moved away): epoch 2's steps have
    # no loss, and the verdict says why instead of suggesting a lower learning rate.
    def log(line):
        lines.append(line)
        if line.startswith("Epoch 1/2 "):
            for path in (folder / "train").rglob("*.jpg"):
                path.unlink()

    with pytest.warns(feeds.BadImageWarning), pytest.raises(FloatingPointError) as stopped:
        vit_flax.train(dataclasses.replace(config, epochs=2), stream.open_folder(folder, 8),
                       tmp_path / "gone", data_in="stream", log=log)
    assert str(stopped.value).endswith(  # 21 images, 3 of them validation.
        "keeps epoch 1, the last finite one (18 training images of the epoch could not be "
        "read, each named above; a step with none of its images has no loss: are they still "
        "there? Else a lower learning_rate?)")


@pytest.mark.slow
def test_a_group_streamed_from_the_host_trains_as_on_the_device(tmp_path):
    # A group's batches gathered on the host (HostFeed: every run's rows one after the other)
    # or in the step from the data on the device: the same runs, float32 round-off apart.
    from conftest import TINY

    configs = [vit_flax.ViTConfig(**TINY, epochs=1, seed=seed) for seed in (0, 1)]
    splits = data.from_arrays(*brightness_problem(40, 0), *brightness_problem(9, 1))
    for data_in in ("memory", "stream"):
        vit_flax.train_group(configs, splits, tmp_path / data_in, data_in=data_in,
                             log=lambda _: None)
    for name in ("seed0_lr0.001_wd0.0001", "seed1_lr0.001_wd0.0001"):
        np.testing.assert_allclose(metrics_of(tmp_path / "stream" / "runs" / name),
                                   metrics_of(tmp_path / "memory" / "runs" / name), rtol=1e-5)


def test_a_groups_progress_bar_pools_its_runs():
    # The bar reads the totals of the step before; a group's have a runs axis, which one
    # run's means() cannot read (float() of an array): pooled sums over the runs.
    from vit_flax.training import group, reporting

    stacked = group.zero_totals(2).replace(
        sums={name: jnp.array([3.0, 1.0]) for name in steps.METRIC_NAMES},
        count=jnp.array([2.0, 2.0]))
    assert reporting.pooled(stacked).means() == {"loss": 1.0, "accuracy": 1.0,
                                                 "top-5-accuracy": 1.0}
    solo = steps.Totals.zero()
    assert reporting.pooled(solo) is solo
