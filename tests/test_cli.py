"""train.py: a real end-to-end run, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import jax
import matplotlib.figure
import numpy as np
import pytest
from conftest import TINY, TINY_FLAGS, random_images, write_image_folder, xla_flags

import vit_flax
import vit_flax.data.sources
import vit_flax.infra.workdir

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HISTORY_KEYS = {"epoch", "loss", "accuracy", "top-5-accuracy", "val_loss", "val_accuracy",
                "val_top-5-accuracy", "epoch_seconds", "images_per_second", "data_wait"}


def load_train_module():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = load_train_module()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def download(*args, **kwargs):
        raise AssertionError(f"a test tried to download {args}")

    monkeypatch.setattr(urllib.request, "urlretrieve", download)


def run_train_py(*args: str) -> subprocess.CompletedProcess:
    # One CPU device, whatever this machine has: the run's facts (devices == 1) are fixed.
    env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_by_train_py(tmp_path_factory):
    """(train.py's process, its image folder, its workdir): one real run, read by the tests
    below (a test that changes the workdir changes a copy of it)."""
    root = tmp_path_factory.mktemp("train_py")
    image_folder = write_image_folder(root / "images", train_per_class=12, test_per_class=4)
    workdir = root / "run"
    done = run_train_py(*TINY_FLAGS, "--dataset", "folder", "--data-dir", str(image_folder),
                        "--epochs", "1", "--workdir", str(workdir))
    return done, image_folder, workdir


@pytest.mark.slow
def test_train_py_end_to_end(trained_by_train_py):
    done, image_folder, workdir = trained_by_train_py
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

    history = json.loads((workdir / "history.json").read_text())
    assert isinstance(history, list) and len(history) == 1
    assert set(history[0]) == HISTORY_KEYS and history[0]["epoch"] == 1
    assert all(math.isfinite(value) for value in history[0].values())

    results = json.loads((workdir / "results.json").read_text())
    # The test metrics are the best model's on the held-out images, recomputed here.
    model, config = vit_flax.load(workdir)
    test = vit_flax.data.sources.load_folder(image_folder, 8).test
    logits = vit_flax.predict(model, test.images)
    assert results["test_accuracy"] == pytest.approx(
        np.mean(logits.argmax(-1) == test.labels), abs=1e-7)
    loss = -np.take_along_axis(jax.nn.log_softmax(logits), test.labels[:, None], 1).mean()
    assert results["test_loss"] == pytest.approx(float(loss), rel=1e-5)
    # 3 classes: the true label is always among the top 5.
    assert results["test_top-5-accuracy"] == 1.0
    assert results["devices"] == 1 and results["best_epoch"] == 1
    assert results["config"]["num_classes"] == 3 and results["config"]["epochs"] == 1
    assert {"jax", "flax", "numpy"} <= set(results["versions"])
    # 36 training images: floor(36 * 0.9) train, the last 4 validate; 4 test images per class.
    assert (results["train_examples"], results["validation_examples"],
            results["test_examples"]) == (32, 4, 12)
    assert json.loads((workdir / "config.json").read_text()) == results["config"]

    for figure in ("loss.png", "top-5-accuracy.png", "patches.png", "attention.png"):
        assert (workdir / figure).read_bytes()[:8] == PNG_SIGNATURE, figure

    lines = done.stdout.splitlines()
    accuracy = round(results["test_accuracy"] * 100, 2)
    assert f"Test accuracy: {accuracy}%" in lines
    assert f"Test top 5 accuracy: {round(results['test_top-5-accuracy'] * 100, 2)}%" in lines

    assert config.to_json() == (workdir / "config.json").read_text().strip()
    logits = vit_flax.predict(model, random_images(5, 8))
    assert logits.shape == (5, 3) and np.isfinite(logits).all()


@pytest.mark.slow
def test_bad_input_in_a_real_process(tmp_path):
    done = run_train_py("--dataset", "folder", "--data-dir", str(tmp_path / "nowhere"),
                        "--workdir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def images(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images", train_per_class=4)


def folder_args(images: Path, tmp_path: Path, *extra: str) -> list[str]:
    """A valid tiny one-epoch run, then `extra` (argparse keeps a flag's last value)."""
    return [*TINY_FLAGS, "--dataset", "folder", "--data-dir", str(images), "--epochs", "1",
            "--workdir", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--batch-size", "-8"], "--batch-size must be a positive integer"),
    (["--epochs", "-1"], "epochs"),
    (["--image-size", "13"],  # 13 is not a multiple of --patch-size 4.
     "--image-size (13) must be divisible by --patch-size (4); e.g. --image-size 12"),
    (["--projection-dim", "0"], "--projection-dim"),
    (["--mlp-head-units", "16,0"], "--mlp-head-units"),
    (["--validation-split", "1"], "--validation-split must be in [0, 1)"),
    (["--train-examples", "0"], "train-examples"),
    (["--test-examples", "-1"], "test-examples"),
    # One example cannot be split.
    (["--train-examples", "1"], "--validation-split 0.1 of 1 examples"),
    (["--seed", "-1"], "seed"),  # As Keras' set_random_seed, a negative seed is refused.
    (["--seed", str(2**63)], "seed"),  # Too large for a JAX key.
    # Would train to NaN weights, exit 0.
    (["--learning-rate", "nan"], "--learning-rate must be finite"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_values_are_one_line_errors(images, tmp_path, capsys, flags, expected):
    assert train.main(folder_args(images, tmp_path, *flags)) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.parametrize("flags, expected", [
    (["--mlp-head-units", "a,b"], "--mlp-head-units"),
    (["--epochs", "two"], "--epochs"),
    (["--head", "mean"], "--head: invalid choice: 'mean'"),
    (["--dtype", "float16"], "--dtype"),
    (["--no-such-flag"], "--no-such-flag"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_flags_that_do_not_parse_are_one_line_errors(images, tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit) as exit_:
        train.main(folder_args(images, tmp_path, *flags))
    assert exit_.value.code == 2
    assert expected in one_error_line(capsys)


def test_bad_data_is_a_one_line_error(tmp_path, capsys):
    workdir = ["--workdir", str(tmp_path / "run")]
    assert train.main(["--dataset", "imagenet", *workdir]) == 2
    assert "imagenet" in one_error_line(capsys)
    assert train.main(["--dataset", "folder", *workdir]) == 2
    assert "--data-dir" in one_error_line(capsys)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "dog").mkdir(parents=True)
    assert train.main(["--dataset", "folder", "--data-dir", str(tmp_path / "empty"),
                       *workdir]) == 2
    assert "train/cat has no images (it is empty)" in one_error_line(capsys)
    missing = tmp_path / "missing"
    assert train.main(["--dataset", "cifar10", "--data-dir", str(missing), *workdir]) == 2
    assert str(missing) in one_error_line(capsys)


def test_workdir_that_is_a_file_is_a_one_line_error(images, tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    assert train.main(folder_args(images, tmp_path)) == 2
    assert "is a file" in one_error_line(capsys)


@pytest.mark.slow
def test_zero_epochs_trains_nothing(image_folder, tmp_path, capsys):
    # epochs=0 is a valid config (>= 0): fit(epochs=0) trains nothing, so no epoch improves
    # and no checkpoint is written; there are no best weights to evaluate on test.
    assert train.main(folder_args(image_folder, tmp_path, "--epochs", "0")) == 0
    assert "Traceback" not in capsys.readouterr().err
    workdir = tmp_path / "run"
    results = json.loads((workdir / "results.json").read_text())
    assert results["best_epoch"] == 0
    assert results["test_loss"] is results["test_accuracy"] is None
    assert results["config"]["epochs"] == 0
    assert (workdir / "config.json").is_file() and not (workdir / "best_checkpoint").exists()
    with pytest.raises(FileNotFoundError, match="no finished"):
        vit_flax.load(workdir)


@pytest.fixture(scope="module")
def help_text() -> str:
    """What `train.py --help` prints (test_help_in_a_real_process_is_the_parsers), unwrapped:
    the parser train.main builds, without a process of its own."""
    parser = train.build_parser(vit_flax.ViTConfig, vit_flax.config.RECIPES,
                                vit_flax.config.MODELS)
    parser.prog = "train.py"
    return " ".join(parser.format_help().split())


def test_every_config_field_has_its_flag_with_the_configs_default(help_text):
    fields = dataclasses.fields(vit_flax.ViTConfig)
    parser_flags = set(re.findall(r"(--[a-z0-9-]+)", help_text))
    for field in fields:
        assert (train.flag(field.name) in parser_flags) == field.metadata["flag"], field.name
    args, _ = train.parse_args([], vit_flax.ViTConfig, vit_flax.config.RECIPES,
                              vit_flax.config.MODELS)
    assert {name: args[name] for name in train.GRID_FIELDS} == {"learning_rate": (0.001,),
                                                                 "weight_decay": (0.0001,)}
    from_flags = vit_flax.ViTConfig(**{
        f.name: args[f.name][0] if f.name in train.GRID_FIELDS else args[f.name]
        for f in fields if f.metadata["flag"]})
    assert from_flags == vit_flax.ViTConfig()  # The defaults are the seed's, in one place.


def test_every_run_flag_defaults_to_what_the_library_defaults_to():
    import inspect

    from vit_flax.training.options import DataSpec, Processes, RunOptions

    library = {f.name: f.default for cls in (DataSpec, Processes, RunOptions)
               for f in dataclasses.fields(cls)}
    library |= {name: parameter.default for name, parameter
                in inspect.signature(vit_flax.run).parameters.items()}
    assert set(train.RUN_FLAGS) - set(library) == {"seeds"}  # A group's list: vit_flax.sweep.
    assert {name: default for name, (default, _) in train.RUN_FLAGS.items()
            if name != "seeds"} == {name: library[name] for name in train.RUN_FLAGS
                                    if name != "seeds"}


@pytest.mark.slow
def test_help_in_a_real_process_is_the_parsers(help_text):
    done = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert " ".join(done.stdout.split()) == help_text


def test_help_gives_each_flag_its_meaning_default_and_choices(help_text):
    text = help_text
    assert "--head {flatten,gap,cls} how tokens become one vector" in text
    assert "--learning-rate LEARNING_RATE AdamW learning rate; a comma list trains one run " \
           "per value, together (see --seeds) (default: 0.001)" in text
    assert "--seeds SEEDS train one run per seed, together in one program" in text
    assert "--mlp-head-units MLP_HEAD_UNITS Dense widths of the classifier MLP, a comma list " \
           "(default: 2048,1024)" in text
    assert "--keep-checkpoints KEEP_CHECKPOINTS how many epoch-end checkpoints" in text


def test_library_errors_name_arguments_and_the_cli_names_flags(tmp_path, capsys):
    splits = vit_flax.data.sources.from_arrays(random_images(10, 8), np.arange(10) % 3)
    config = vit_flax.ViTConfig(**TINY, epochs=1)
    with pytest.raises(vit_flax.ConfigError, match=r"^log_every must be >= 0, got -1$"):
        vit_flax.train(config, splits, tmp_path / "run", log_every=-1)
    # Checked before any data is read: the missing folder is never reached.
    nowhere = ["--dataset", "folder", "--data-dir", str(tmp_path / "nowhere")]
    assert train.main([*nowhere, "--log-every", "-1"]) == 2
    assert one_error_line(capsys) == "error: --log-every must be >= 0, got -1"
    assert train.main([*nowhere, "--keep-checkpoints", "0"]) == 2
    assert one_error_line(capsys) == "error: --keep-checkpoints must be >= 1, got 0"


def as_train_py_ran(trained_by_train_py, workdir: Path, *extra: str) -> list[str]:
    """The command of trained_by_train_py in another workdir: its compiled programs are in
    the session's compilation cache, so this process loads them instead of compiling."""
    _, image_folder, _ = trained_by_train_py
    return [*TINY_FLAGS, "--dataset", "folder", "--data-dir", str(image_folder), "--epochs",
            "1", "--workdir", str(workdir), *extra]


@pytest.mark.slow
def test_a_messages_advice_is_a_command_line_that_runs(trained_by_train_py, tmp_path, capsys):
    # A run of another configuration: train.py's, its marker saying learning_rate 0.01.
    workdir = tmp_path / "run"
    shutil.copytree(trained_by_train_py[2], workdir)
    marker = workdir / vit_flax.infra.workdir.MARKER
    saved = json.loads(marker.read_text())
    marker.write_text(json.dumps(saved | {"config": saved["config"] | {"learning_rate": 0.01}}))
    command = as_train_py_ran(trained_by_train_py, workdir)
    assert train.main(command) == 2
    message = one_error_line(capsys)
    assert "differs in --learning-rate); use another workdir, or --overwrite to delete" in message
    assert train.main([*command, "--overwrite"]) == 0  # The advice, as given, runs.
    assert json.loads(marker.read_text())["config"]["learning_rate"] == 0.001
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    beside = as_train_py_ran(trained_by_train_py, stranger)
    assert train.main(beside) == 2
    assert "or --allow-non-empty to add a run beside" in one_error_line(capsys)
    assert train.main([*beside, "--allow-non-empty"]) == 0
    assert (stranger / "notes.txt").read_text() == "mine"
    assert json.loads((stranger / "history.json").read_text())[0]["epoch"] == 1
    # A field that is not a switch keeps its value.
    assert train.in_flags("use batch_size=True", ["batch_size"]) == "use --batch-size True"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES], ids=["ENOSPC", "EACCES"])
@pytest.mark.slow
def test_a_failed_write_outside_the_checkpoints_is_one_line(trained_by_train_py, tmp_path,
                                                           capsys, monkeypatch, code):
    def failing(self, path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing)
    assert train.main(as_train_py_ran(trained_by_train_py, tmp_path / "run")) == 1
    remedy = "free space" if code == errno.ENOSPC else "fix the permissions"
    assert one_error_line(capsys) == (
        f"error: [Errno {code}] {os.strerror(code)}: '{tmp_path / 'run' / 'patches.png'}'; "
        f"the epochs finished before are saved: {remedy}, then run the same command to "
        f"resume")


def configs_of(*argv: str):
    args, given = train.parse_args(list(argv), vit_flax.ViTConfig, vit_flax.config.RECIPES,
                                   vit_flax.config.MODELS)
    return train.configs(args, given, vit_flax.ViTConfig.recipe, vit_flax.sweep)


def test_seeds_and_comma_lists_make_a_group_of_every_combination():
    group = configs_of("--recipe", "strong", "--seeds", "0,1", "--learning-rate", "1e-3,3e-4",
                       "--weight-decay", "0.01")
    assert [(c.seed, c.learning_rate, c.weight_decay) for c in group] == [
        (0, 1e-3, 0.01), (1, 1e-3, 0.01), (0, 3e-4, 0.01), (1, 3e-4, 0.01)]
    # Everything else is the recipe's, as for a single run.
    strong = vit_flax.ViTConfig.recipe("strong")
    assert all(c == strong.replace(seed=c.seed, learning_rate=c.learning_rate,
                                   weight_decay=0.01) for c in group)
    # A comma list alone is a group too; one value (or none) is a single run.
    assert len(configs_of("--weight-decay", "0,0.1")) == 2
    assert configs_of("--learning-rate", "3e-4") == vit_flax.ViTConfig(learning_rate=3e-4)
    assert configs_of() == vit_flax.ViTConfig()


@pytest.mark.slow
def test_train_py_trains_a_group_of_seeds(images, tmp_path, capsys):
    assert train.main(folder_args(images, tmp_path, "--seeds", "0,1")) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    names = ["seed0_lr0.001_wd0.0001", "seed1_lr0.001_wd0.0001"]
    assert list(summary["runs"]) == names
    assert summary["over_seeds"][0]["seeds"] == [0, 1]
    assert "learning_rate=0.001 weight_decay=0.0001, seeds [0, 1]: test accuracy" in printed
    for name in names:
        results = json.loads((tmp_path / "run" / "runs" / name / "results.json").read_text())
        assert results["test_accuracy"] == summary["runs"][name]["test_accuracy"]
        assert results["config"]["seed"] == int(name[4])


@pytest.mark.parametrize("flags, expected", [
    (["--seeds", "0,0"], "error: the group holds the run seed0_lr0.001_wd0.0001 more than once"),
    (["--seeds", "0,-1"], "seed"),
    (["--learning-rate", "1e-3,nan"], "--learning-rate must be finite"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_groups_are_one_line_errors(images, tmp_path, capsys, flags, expected):
    assert train.main(folder_args(images, tmp_path, *flags)) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # Refused before anything is written.


def test_grid_lists_that_do_not_parse_are_one_line_errors(images, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(folder_args(images, tmp_path, "--learning-rate", "1e-3,fast"))
    assert exit_.value.code == 2
    assert "expected a number or a comma-separated list like 1e-3,3e-4, got '1e-3,fast'" in \
        one_error_line(capsys)
