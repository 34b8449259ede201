"""Streaming from disk (vit_flax.data.stream): lazy sources agree with the in-memory ones,
the streamed feed gives the in-memory batches in the same order, `start` skips exactly,
unreadable files are named once and masked, each process decodes only its share."""

from __future__ import annotations

import io
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image

from vit_flax.data import sources, stream
from vit_flax.data.sources import DataError, Dataset
from vit_flax.infra import parallel
from vit_flax.models import augment
from vit_flax.training import feeds

SIZE = 8  # The input size; the files are 12 px JPEGs, so every image is resized.


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), train_per_class=7,
                              test_per_class=2, size=12, suffix=".jpg")


@pytest.fixture(scope="module")
def in_memory(folder):
    return sources.load_folder(folder, SIZE)


@pytest.fixture(scope="module")
def mesh():
    return parallel.data_mesh()


def examples(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, real) a step gathers from a Batch, as steps.gather does, on the host."""
    images, labels, index = (np.asarray(a) for a in batch)
    safe = np.maximum(index, 0)
    return images[safe], labels[safe], index >= 0


def expected(split: Dataset, rows: np.ndarray):
    safe = np.maximum(rows, 0)
    return split.images[safe], split.labels[safe], rows >= 0


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g[want[2]], w[want[2]])
    np.testing.assert_array_equal(got[2], want[2])


# --- sources ---------------------------------------------------------------------------------

def test_open_folder_is_load_folder_undecoded(folder, in_memory):
    lazy = stream.open_folder(folder, SIZE)
    assert lazy.class_names == in_memory.class_names
    for part, want in ((lazy.train, in_memory.train), (lazy.test, in_memory.test)):
        assert isinstance(part.images, stream.FileImages)
        assert part.images.shape == want.images.shape
        assert part.images.nbytes == want.images.nbytes
        np.testing.assert_array_equal(part.labels, want.labels)
        np.testing.assert_array_equal(np.asarray(part.images), want.images)
    train, validation = sources.validation_split(lazy.train, 0.2)  # Slices stay lazy.
    assert isinstance(validation.images, stream.FileImages)
    np.testing.assert_array_equal(validation.images[1], in_memory.train.images[17])


def test_channel_statistics_of_a_lazy_split_are_the_in_memory_ones(folder, in_memory):
    got = stream.channel_statistics(stream.open_folder(folder, SIZE).train.images, chunk=4,
                                     workers=0)
    want = augment.channel_statistics(in_memory.train.images)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)  # The same exact int64 sums.


def test_the_processes_shares_of_the_sums_add_up_to_the_whole(folder):
    images = stream.open_folder(folder, SIZE).train.images
    whole = stream.channel_sums(images, chunk=4, workers=0)
    parts = [stream.channel_sums(images, chunk=4, workers=0, share=i, shares=3)
             for i in range(3)]
    assert all(part.any() for part in parts)  # 21 images: 7 each.
    np.testing.assert_array_equal(sum(parts), whole)


class FakeTfds:
    """tfds.builder and tfds.data_source of a prepared 3-class data set of PNG records."""

    SPLITS = {"train": 6, "validation": 3, "test": 2}

    def __init__(self):
        rng = np.random.default_rng(5)
        self.records = {}
        for split, count in self.SPLITS.items():
            records = []
            for i in range(count):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(
                    png, format="PNG")
                records.append({"image": png.getvalue(), "label": i % 3})
            self.records[split] = records
        self.opened = []

    def builder(self, name, data_dir=None):
        if name != "fake":
            raise FileNotFoundError(f"no {name} in {data_dir}")
        label = SimpleNamespace(names=["a", "b", "c"])
        return SimpleNamespace(info=SimpleNamespace(
            splits=dict.fromkeys(self.SPLITS), supervised_keys=("image", "label"),
            features={"label": label}))

    def data_source(self, name, *, split, data_dir, download, decoders):
        assert not download and set(decoders) == {"image"}
        self.opened.append(split)
        return self.records[split]


@pytest.fixture
def fake_tfds(monkeypatch):
    import tensorflow_datasets as tfds

    fake = FakeTfds()
    monkeypatch.setattr(tfds, "builder", fake.builder)
    monkeypatch.setattr(tfds, "data_source", fake.data_source)
    return fake


def test_tfds_splits_stream_their_decoded_images(fake_tfds, mesh):
    splits = stream.open_source("tfds:fake", None, SIZE)
    assert splits.class_names == ("a", "b", "c")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (6, 3, 2)
    np.testing.assert_array_equal(splits.train.labels, [0, 1, 2, 0, 1, 2])
    record = fake_tfds.records["test"][1]["image"]
    want = np.asarray(Image.open(io.BytesIO(record)).resize((SIZE, SIZE),
                                                            Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(splits.test.images[1], want)
    feed = feeds.StreamFeed(splits.train, mesh, workers=0)
    (batch,) = feed.batches(np.arange(6), 6)
    assert_same(examples(batch), expected(stream.materialize(splits.train), np.arange(6)))


def test_tfds_that_is_not_prepared_says_how_to_prepare_it(fake_tfds, monkeypatch):
    fake_tfds.SPLITS = {}  # A known data set that was never built: TFDS lists no splits.
    with pytest.raises(DataError, match=r"^tfds:fake is not prepared in /data \(splits found: "
                       r"none, expected train\); prepare it once with `tfds build fake "
                       r"--file_format=array_record --data_dir=/data`$"):
        stream.open_source("tfds:fake", "/data", SIZE)
    with pytest.raises(DataError, match=r"^tfds:nosuch: no nosuch in None; expected the name"):
        stream.open_source("tfds:nosuch", None, SIZE)


# --- in memory or streamed -------------------------------------------------------------------

def test_choose_forced_and_automatic(folder, in_memory):
    lazy = stream.open_folder(folder, SIZE).train
    assert stream.choose(lazy, "memory") == "memory"
    assert stream.choose(in_memory.train, "stream") == "stream"
    assert stream.choose(in_memory.train) == "memory"  # Arrays are in memory already.
    assert stream.choose(lazy) == "memory"  # 4 KB of pixels.
    host = stream.host_memory_bytes()
    assert stream.choose(lazy, fraction=0.99 * lazy.images.nbytes / host) == "stream"
    with pytest.raises(DataError, match="data_in must be one of auto, memory, stream, got 'gpu'"):
        stream.choose(lazy, "gpu")


def test_make_feed_decodes_small_splits_and_streams_large_or_forced_ones(folder, in_memory,
                                                                         mesh, monkeypatch):
    lazy = stream.open_folder(folder, SIZE).train
    assert isinstance(feeds.make_feed(lazy, mesh), feeds.DeviceFeed)  # Decoded: it fits.
    assert isinstance(feeds.make_feed(lazy, mesh, True), feeds.DeviceFeed)
    assert isinstance(feeds.make_feed(lazy, mesh, False), feeds.StreamFeed)
    assert isinstance(feeds.make_feed(in_memory.train, mesh, False), feeds.HostFeed)
    monkeypatch.setattr(stream, "HOST_MEMORY_FRACTION", 0.99 * lazy.images.nbytes
                        / stream.host_memory_bytes())
    assert isinstance(feeds.make_feed(lazy, mesh), feeds.StreamFeed)
    assert isinstance(feeds.make_feed(in_memory.train, mesh), feeds.DeviceFeed)


def test_a_split_goes_to_the_devices_padded_to_its_stored_rows(monkeypatch, mesh):
    assert [feeds.stored_rows(n) for n in (1, 256, 257, 5000, 45_000, 32_769)] == \
        [256, 256, 512, 5120, 45_056, 36_864]  # At most 1/8 more (the last), often far less.
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    labels = np.array([4, 3, 2, 1, 0], np.int32)
    padded_images, padded_labels = feeds.to_device(Dataset(images, labels), mesh)
    assert padded_images.shape == (256, 2, 2, 3) and padded_labels.shape == (256,)
    np.testing.assert_array_equal(np.asarray(padded_images[:5]), images)
    np.testing.assert_array_equal(np.asarray(padded_labels[:5]), labels)
    assert not np.asarray(padded_images[5:]).any() and not np.asarray(padded_labels[5:]).any()
    # Above PAD_BYTES a split goes as it is: padding would copy it on the host first.
    monkeypatch.setattr(feeds, "PAD_BYTES", images.nbytes + labels.nbytes - 1)
    exact_images, exact_labels = feeds.to_device(Dataset(images, labels), mesh)
    assert exact_images.shape == images.shape and exact_labels.shape == labels.shape


# --- the streamed feed -----------------------------------------------------------------------

def test_streamed_batches_are_the_in_memory_ones_in_the_same_order(folder, in_memory, mesh):
    order = sources.epoch_order(len(in_memory.train), seed=3, epoch=2)
    device = feeds.DeviceFeed(in_memory.train, mesh)
    streamed = feeds.StreamFeed(stream.open_folder(folder, SIZE).train, mesh, workers=0)
    pairs = list(zip(streamed.batches(order, 8), device.batches(order, 8), strict=True))
    assert len(pairs) == 3  # 21 examples: 8, 8, and 5 with 3 pads.
    for got, want in pairs:
        assert_same(examples(got), examples(want))
    arrays = feeds.StreamFeed(in_memory.train, mesh, workers=0)  # CIFAR-like arrays stream too.
    for got, (_, want) in zip(arrays.batches(order, 8), pairs, strict=True):
        assert_same(examples(got), examples(want))


def test_a_group_streams_every_runs_own_order(folder, in_memory, mesh):
    n = len(in_memory.train)
    order = np.stack([sources.epoch_order(n, seed, 1) for seed in (0, 1)])
    order[1, -2:] = -1  # Entries a loop masks (a stopped run's) stay padding.
    feed = feeds.StreamFeed(stream.open_folder(folder, SIZE).train, mesh, workers=0)
    rows = stream.step_rows(order, 8)
    for step, batch in enumerate(feed.batches(order, 8)):
        assert batch.index.shape == (2, 8) and batch.images.shape == (16, SIZE, SIZE, 3)
        assert_same(examples(batch), expected(in_memory.train, rows[step]))


def test_start_skips_exactly_that_many_batches(folder, mesh):
    feed = feeds.StreamFeed(stream.open_folder(folder, SIZE).train, mesh, workers=0)
    order = sources.epoch_order(feed.size, seed=0, epoch=1)
    whole = [examples(b) for b in feed.batches(order, 4)]
    resumed = [examples(b) for b in feed.batches(order, 4, start=3)]
    assert len(whole) == 6 and len(resumed) == 3
    for got, want in zip(resumed, whole[3:], strict=True):
        assert_same(got, want)
    assert list(feed.batches(order, 4, start=6)) == []
    with pytest.raises(DataError, match="start=7 is outside the epoch's 6 steps"):
        list(feed.batches(order, 4, start=7))


@pytest.mark.parametrize("feed_class", [feeds.DeviceFeed, feeds.HostFeed])
def test_in_memory_feeds_skip_start_batches_too(in_memory, mesh, feed_class):
    feed = feed_class(in_memory.train, mesh)
    order = np.stack([sources.epoch_order(feed.size, seed, 1) for seed in (0, 1)])
    whole = [examples(b) for b in feed.batches(order, 4)]
    resumed = [examples(b) for b in feed.batches(order, 4, start=4)]
    assert len(whole) == 6 and len(resumed) == 2
    for got, want in zip(resumed, whole[4:], strict=True):
        assert_same(got, want)


class StepOutput:
    """Stands for a step's output, and records when it is waited for."""

    def __init__(self, number: int, waited: list):
        self.number, self.waited = number, waited

    def block_until_ready(self):
        self.waited.append(self.number)
        return self


def test_pace_keeps_the_host_at_most_ahead_steps_in_front_of_the_devices():
    waited = []
    pace = feeds.Pace(2)
    for number in range(5):
        pace(StepOutput(number, waited))
        # After step n is dispatched, step n - 2 must have run.
        assert waited == list(range(max(0, number - 1)))
    free = feeds.Pace(feeds.DeviceFeed.AHEAD)  # Its steps hold no batch: never waits.
    for number in range(5):
        free(StepOutput(number, waited))
    assert waited == [0, 1, 2]
    assert feeds.HostFeed.AHEAD == feeds.StreamFeed.AHEAD == 2


def test_a_worker_process_streams_the_same_batches(folder, in_memory, mesh):
    order = sources.epoch_order(len(in_memory.train), seed=1, epoch=1)
    feed = feeds.StreamFeed(stream.open_folder(folder, SIZE).train, mesh, workers=1)
    rows = stream.step_rows(order, 8)
    for step, batch in enumerate(feed.batches(order, 8)):
        assert_same(examples(batch), expected(in_memory.train, rows[step, 0]))


def test_unreadable_files_are_named_once_and_left_out(tmp_path, mesh):
    root = write_image_folder(tmp_path, train_per_class=4, size=12, suffix=".jpg")
    split = stream.open_folder(root, SIZE).train
    truncated, deleted = split.images.path(2), split.images.path(5)
    with open(truncated, "rb") as handle:
        payload = handle.read()
    with open(truncated, "wb") as handle:
        handle.write(payload[:len(payload) // 2])
    feed = feeds.StreamFeed(split, mesh, workers=0)
    order = sources.epoch_order(feed.size, seed=0, epoch=1)
    rows = stream.step_rows(order, 4)[:, 0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad in ([2], [2, 5]):  # The second epoch also misses a file deleted before it.
            real = np.stack([examples(b)[2] for b in feed.batches(order, 4)])
            np.testing.assert_array_equal(real, (rows >= 0) & ~np.isin(rows, bad))
            assert feed.skipped == len(bad)
            (tmp_path / deleted).unlink(missing_ok=True)
    messages = [str(w.message) for w in caught if w.category is feeds.BadImageWarning]
    assert len(messages) == 2
    assert sum(truncated in m for m in messages) == sum(deleted in m for m in messages) == 1
    assert all("left out of the step" in m for m in messages)


# --- each process' share ---------------------------------------------------------------------

def test_layout_places_each_shards_columns_of_every_run_together():
    layout = stream.Layout(runs=2, batch_size=4, owners=(0, 1))
    np.testing.assert_array_equal(layout.positions(), [[0, 1, 4, 5], [2, 3, 6, 7]])
    np.testing.assert_array_equal(layout.local_rows(1), [4, 5, 6, 7])
    rows = np.arange(16).reshape(2, 2, 4)  # (steps, runs, batch)
    np.testing.assert_array_equal(layout.local_keys(rows, 1), [[2, 3, 6, 7], [10, 11, 14, 15]])


@pytest.mark.parametrize("runs", [1, 2])
def test_each_process_decodes_only_its_share(folder, in_memory, monkeypatch, runs):
    """Two processes of two devices each (owners 0, 0, 1, 1): each opens only the files of
    its devices' columns (one run: half of the files each, none twice), and their parts
    make the global batch."""
    opened = []
    read = sources.read_image
    monkeypatch.setattr(sources, "read_image", lambda path, size: (opened.append(path),
                                                                   read(path, size))[1])
    images = stream.open_folder(folder, SIZE).train.images
    order = np.stack([sources.epoch_order(len(images), seed, 1) for seed in range(runs)])
    rows = stream.step_rows(order, 8)
    layout = stream.Layout(runs=runs, batch_size=8, owners=(0, 0, 1, 1))
    parts, files = [], []
    for process in (0, 1):
        opened.clear()
        keys = layout.local_keys(rows, process)
        parts.append([pixels for pixels, _ in stream.local_batches(images, keys)])
        columns = rows[:, :, :4] if process == 0 else rows[:, :, 4:]
        assert sorted(opened) == sorted(images.path(k) for k in columns.reshape(-1) if k >= 0)
        files.append(opened.copy())
    if runs == 1:  # 21 examples in batches of 8: columns 0-3 hold 4 + 4 + 4, columns 4-7 9.
        assert (len(files[0]), len(files[1])) == (12, 9)
        assert not set(files[0]) & set(files[1]) and len(set(files[0] + files[1])) == 21
    positions = layout.positions()
    for step in range(len(rows)):
        assembled = np.zeros((8 * runs, SIZE, SIZE, 3), np.uint8)
        for process in (0, 1):
            assembled[layout.local_rows(process)] = parts[process][step]
        want = expected(in_memory.train, rows[step])
        np.testing.assert_array_equal(assembled[positions][want[2]], want[0][want[2]])
