"""export.py: ONNX (run in onnxruntime) and StableHLO (jax.export, reloaded without
vit_flax) of the seed's ViT and the standard ViT give vit_flax.predict's logits (<= 1e-4) on
raw pixels at batch sizes 1 and 3, and its held-out accuracy. Each architecture is exported
once per format (module fixture)."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY, write_preset
from flax import nnx

import vit_flax
from vit_flax.config import ConfigError
from vit_flax.inference import export as export_lib
from vit_flax.infra import workdir as layout
from vit_flax.models.hub_vit import ViTHub, ViTHubConfig

ROOT = Path(__file__).resolve().parents[2]
pytest_plugins = ["inference_fixtures"]  # seed_run, standard_run, folder_splits: shared.
TOLERANCE = 1e-4  # The bound on exported logits; measured ~5e-7 (docs/inference.md).


def load_cli():
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = load_cli()


@pytest.fixture(scope="module", params=["seed", "standard"])
def exported(request, tmp_path_factory):
    """(run, model, {format: file}): both formats written by export.py's main."""
    run = request.getfixturevalue(f"{request.param}_run")
    folder = tmp_path_factory.mktemp(f"export_{request.param}")
    files = {"onnx": folder / "model.onnx", "stablehlo": folder / "model.stablehlo"}
    for fmt, path in files.items():
        assert cli.main([str(run), "--format", fmt, "--output", str(path)]) == 0
    return run, vit_flax.load(run)[0], files


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.astype(np.float32)})[0]


def run_stablehlo(path: Path, images: np.ndarray) -> np.ndarray:
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return np.asarray(exported.call(images.astype(np.float32)))


RUNNERS = {"onnx": run_onnx, "stablehlo": run_stablehlo}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "stablehlo"])
def test_exported_logits_are_predicts_at_batch_sizes_1_and_3(exported, folder_splits, fmt):
    """uint8 pixels as float32 0..255: one exported file takes both batch sizes."""
    _, model, files = exported
    images = folder_splits.test.images[:3]
    for count in (1, 3):
        logits = RUNNERS[fmt](files[fmt], images[:count])
        assert logits.shape == (count, 3)
        np.testing.assert_allclose(logits, vit_flax.predict(model, images[:count]),
                                   rtol=0, atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "stablehlo"])
def test_exported_held_out_accuracy_is_predicts(exported, folder_splits, fmt):
    run, model, files = exported
    test = folder_splits.test
    predicted = vit_flax.predict(model, test.images).argmax(1)
    exported_classes = RUNNERS[fmt](files[fmt], test.images).argmax(1)
    np.testing.assert_array_equal(exported_classes, predicted)
    results = run / "results.json"
    if results.is_file():  # The trained seed run: also what training measured.
        accuracy = float(np.mean(exported_classes == test.labels))
        assert accuracy == pytest.approx(json.loads(results.read_text())["test_accuracy"],
                                         abs=1e-6)


@pytest.mark.slow
def test_onnx_input_and_output_are_typed_with_a_dynamic_batch(exported):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported[2]["onnx"]),
                                           providers=["CPUExecutionProvider"])
    [given], [taken] = session.get_inputs(), session.get_outputs()
    assert (given.name, given.type, given.shape) == ("images", "tensor(float)",
                                                     ["batch", 8, 8, 3])
    assert (taken.name, taken.type, taken.shape) == ("logits", "tensor(float)", ["batch", 3])


@pytest.mark.slow
def test_stablehlo_runs_in_a_process_without_vit_flax(exported, folder_splits, tmp_path):
    _, model, files = exported
    np.save(tmp_path / "images.npy", folder_splits.test.images[:2].astype(np.float32))
    script = (
        "import sys, jax, numpy as np\n"
        f"e = jax.export.deserialize(bytearray(open({str(files['stablehlo'])!r}, 'rb').read()))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, "
        f"np.asarray(e.call(np.load({str(tmp_path / 'images.npy')!r}))))\n"
        "print(sorted(m for m in sys.modules if m.startswith('vit_flax')), e.platforms)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] ('cpu', 'cuda')"
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"),
                               vit_flax.predict(model, folder_splits.test.images[:2]),
                               rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_a_presets_onnx_export_is_its_logits(tmp_path):
    """A Keras Hub preset (ViTHub: its converter's scale and offset inside the graph)."""
    config = ViTHubConfig(image_shape=(8, 8, 3), patch_size=4, num_layers=1, num_heads=2,
                          hidden_dim=8, mlp_dim=12, num_classes=4)
    preset = write_preset(ViTHub(config, rngs=nnx.Rngs(0)), tmp_path / "preset",
                          converter={"scale": 1 / 127.5, "offset": -1.0})
    path = export_lib.export_run(preset, tmp_path / "preset.onnx", "onnx")
    model, _ = vit_flax.load_pretrained(preset)
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(path, images), vit_flax.predict(model, images),
                               rtol=0, atol=TOLERANCE)


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert cli.main([str(tmp_path), "--output", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path} holds no finished train.py checkpoint (expected config.json and "
        f"best_checkpoint/)\n")
    model = vit_flax.create_model(vit_flax.ViTConfig(**TINY))
    with pytest.raises(ValueError) as raised:
        export_lib.export_stablehlo(model, tmp_path / "m", platforms=("cpu", "gpu"))
    assert str(raised.value) == "platforms must be some of cpu, cuda, rocm, tpu, got cpu, gpu"
    with pytest.raises(SystemExit) as exit_status:
        cli.main([str(tmp_path), "--format", "tflite", "--output", "m"])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err  # argparse quotes the choices or not, by Python version.
    assert error.startswith("error: argument --format: invalid choice: 'tflite' (choose from ")
    assert "stablehlo" in error and error.endswith(") (see --help)\n")
    assert error.count("\n") == 1
    for platforms in ("tpu", "cpu,cuda"):  # Was silently ignored; the default's value too.
        with pytest.raises(SystemExit) as exit_status:
            cli.main([str(tmp_path), "--format", "onnx", "--platforms", platforms, "--output",
                      "m"])
        assert exit_status.value.code == 2
        assert capsys.readouterr().err == (
            "error: --platforms is for --format stablehlo; an ONNX model runs wherever its "
            "runtime does (see --help)\n")


def test_a_failed_export_keeps_the_file_it_would_replace(tmp_path, monkeypatch):
    model = vit_flax.create_model(vit_flax.ViTConfig(**TINY))
    path = tmp_path / "m.stablehlo"
    path.write_bytes(b"the last good export")

    class FillsUp:  # A disk that fills up halfway through the write.
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(layout, "open", lambda *args: FillsUp(open(*args)), raising=False)
    with pytest.raises(ConfigError) as raised:
        export_lib.export_stablehlo(model, path, platforms=None)
    assert str(raised.value) == f"cannot write {path} (No space left on device)"
    assert path.read_bytes() == b"the last good export"
    assert list(tmp_path.iterdir()) == [path]  # No temporary left either.


def test_cli_help_names_each_flag_default_and_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("{onnx,stablehlo}", "(default: onnx)", "--output PATH",
                     "--platforms PLATFORMS", "(default: cpu,cuda)"):
        assert expected in text
