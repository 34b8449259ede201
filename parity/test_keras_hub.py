"""vit_flax's standard ViT against keras_hub's (JAX backend, float32, CPU).

Skipped where keras_hub is not installed. Every Keras weight that starts at a constant
(biases, LayerNorm gamma/beta) or near one is perturbed first, so that a swapped or misplaced
array shows. Each layer is fed the same (Keras') input on both sides, so its own error is
measured; the whole model runs end to end. The preset tests load what keras_hub's own
save_to_preset wrote in a subprocess that cannot import Keras: the interpreter in
$VIT_FLAX_KERAS_FREE_PYTHON (e.g. a virtual environment without Keras), else this one, with
keras, keras_hub and tensorflow made unimportable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from parity.keras_hub import keras_hub_to_flax  # noqa: E402
from vit_flax.inference import analysis as research  # noqa: E402

# Float32 sums of up to 3,072 products per output, in another order than Keras': measured
# worst 4.3e-6 per block and 2.5e-6 on ViT-B/16's logits (the table printed at the end);
# 1e-4 leaves room for another CPU's kernels and is far below what a misplaced weight gives.
TOLERANCE = 1e-4

CONFIGS = {
    # Every field that differs from the defaults: token pooling and a pre_logits Dense ...
    "small-token": dict(backbone=dict(image_shape=(32, 32, 3), patch_size=8, num_layers=2,
                                      num_heads=2, hidden_dim=16, mlp_dim=32),
                        head=dict(num_classes=5, intermediate_dim=8)),
    # ... no biases, no class token, a non-square image, gap pooling, softmax outputs ...
    "gap-no-bias": dict(backbone=dict(image_shape=(24, 40, 3), patch_size=8, num_layers=3,
                                      num_heads=4, hidden_dim=32, mlp_dim=48,
                                      layer_norm_epsilon=1e-5, use_mha_bias=False,
                                      use_mlp_bias=False, use_class_token=False,
                                      use_patch_bias=False),
                        head=dict(num_classes=7, pooling="gap", activation="softmax")),
    # ... the backbone alone (tokens out), 3 heads ...
    "backbone": dict(backbone=dict(image_shape=(48, 48, 3), patch_size=16, num_layers=2,
                                   num_heads=3, hidden_dim=24, mlp_dim=64), head=None),
    # ... and the real size: ViT-B/16 at 224 with an ImageNet head.
    "vit-b16": dict(backbone=dict(image_shape=(224, 224, 3), patch_size=16, num_layers=12,
                                  num_heads=12, hidden_dim=768, mlp_dim=3072),
                    head=dict(num_classes=1000)),
}


def perturb(model, seed: int = 0):
    """Add N(0, 0.1) to every weight but the kernels (which start random already)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if not variable.path.endswith("kernel"):
            noise = rng.normal(0.0, 0.1, variable.shape).astype(np.float32)
            variable.assign(variable.numpy() + noise)
    return model


def build(name: str, seed: int = 0):
    spec = CONFIGS[name]
    model = keras_hub.models.ViTBackbone(**spec["backbone"])
    if spec["head"] is not None:
        model = keras_hub.models.ViTImageClassifier(backbone=model, **spec["head"])
    return perturb(model, seed)


def images(shape, batch: int = 2, seed: int = 1) -> np.ndarray:
    """Inputs on the scale ViT's converter gives (-1..1)."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, *shape)).astype(np.float32)


def worst(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request):
    keras_model = build(request.param)
    return request.param, keras_model, keras_hub_to_flax(keras_model)


def backbone_of(model):
    return model.backbone if isinstance(model, keras_hub.models.ViTImageClassifier) else model


def test_every_layer_matches(converted, record):
    name, keras_model, flax_model = converted
    keras_backbone, ours = backbone_of(keras_model), flax_model.backbone
    x = images(keras_backbone.image_shape)
    embedding = np.asarray(keras_backbone.get_layer("vit_patching_and_embedding")(x))
    differences = {"embeddings": worst(ours.vit_patching_and_embedding(x), embedding)}
    encoder = keras_backbone.get_layer("vit_encoder")
    tokens = embedding
    for i, (theirs, block) in enumerate(zip(encoder.encoder_layers,
                                            ours.vit_encoder.transformer_blocks, strict=True)):
        normed = np.asarray(theirs.layer_norm_1(tokens))
        _, keras_probabilities = theirs.mha(normed, normed, return_attention_scores=True)
        differences[f"block {i} attention probabilities"] = worst(
            research.attention_probabilities(block.mha, normed), keras_probabilities)
        output = np.asarray(theirs(tokens))
        differences[f"block {i}"] = worst(block(tokens, train=False, rngs=None), output)
        tokens = output
    differences["final LayerNorm"] = worst(ours.vit_encoder.ln(tokens),
                                           encoder.layer_norm(tokens))
    for what, difference in differences.items():
        record(f"{name}: {what}", difference, TOLERANCE)
    assert max(differences.values()) < TOLERANCE, differences


def test_whole_model_matches(converted, record):
    name, keras_model, flax_model = converted
    x = images(backbone_of(keras_model).image_shape, seed=2)
    difference = worst(flax_model(x), keras_model(x))
    record(f"{name}: outputs (logits, probabilities or tokens)", difference, TOLERANCE)
    assert difference < TOLERANCE


def test_features_are_the_pre_logits(converted, record):
    name, keras_model, flax_model = converted
    x = images(backbone_of(keras_model).image_shape, seed=3)
    tokens = backbone_of(keras_model)(x)
    head = keras_model if keras_model is not backbone_of(keras_model) else None
    # A backbone alone has no head: its features are the class token's.
    pooled = tokens.mean(axis=1) if head and head.pooling == "gap" else tokens[:, 0]
    if head and head.intermediate_dim is not None:
        pooled = head.intermediate_layer(pooled)
    difference = worst(research.features(flax_model, x), pooled)
    record(f"{name}: features", difference, TOLERANCE)
    assert difference < TOLERANCE


def test_conversion_does_not_depend_on_auto_names():
    first, second = build("small-token"), build("small-token")
    assert first.name != second.name  # Keras numbered the second model's names.
    second.set_weights(first.get_weights())
    x = images((32, 32, 3), seed=5)
    np.testing.assert_array_equal(keras_hub_to_flax(second)(x), keras_hub_to_flax(first)(x))


# --- presets written by keras_hub, loaded without Keras -----------------------------------------

# A 12-block model: the weights file numbers blocks vi_t_encoder_block, _1, ..., _11.
PRESET_BACKBONE = dict(image_shape=(32, 32, 3), patch_size=8, num_layers=12, num_heads=2,
                       hidden_dim=16, mlp_dim=24)
# Per-channel scale and offset, so that a converter applied wrongly (or not at all) shows.
SCALE, OFFSET = [1 / 255, 2 / 255, 1 / 127.5], [-0.5, -1.0, 0.25]

LOADER = """
import sys
sys.modules.update(keras=None, keras_hub=None, tensorflow=None)  # Importing them fails.
import json
import numpy as np
from vit_flax.inference import analysis as research
from vit_flax.weights.keras_hub import load_pretrained

import jax
from flax import nnx

expected = np.load(sys.argv[2])
model, config = load_pretrained(sys.argv[1])
graphdef, state = nnx.split(model)

@jax.jit  # One compiled program (op by op, the 12 blocks were ~300 small ones, each compiled).
def outputs_and_features(state, x):
    merged = nnx.merge(graphdef, state)
    return {"outputs": merged(x), "features": research.features(merged, x)}

outputs = outputs_and_features(state, expected["images"])
print(json.dumps({"scale": config.scale, "offset": config.offset, **{
    k: float(np.max(np.abs(np.asarray(v) - expected[k]))) for k, v in outputs.items()}}))
"""


def load_without_keras(preset, expected: dict, tmp_path) -> dict:
    np.savez(tmp_path / "expected.npz", **expected)
    python = os.environ.get("VIT_FLAX_KERAS_FREE_PYTHON", sys.executable)
    done = subprocess.run([python, "-c", LOADER, str(preset), str(tmp_path / "expected.npz")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def uint8_images(seed: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


def test_classifier_preset_loads_without_keras(tmp_path, record):
    backbone = keras_hub.models.ViTBackbone(**PRESET_BACKBONE)
    converter = keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=SCALE,
                                                   offset=OFFSET)
    preprocessor = keras_hub.models.ViTImageClassifierPreprocessor(image_converter=converter)
    classifier = perturb(keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=4, intermediate_dim=6, preprocessor=preprocessor))
    classifier.save_to_preset(str(tmp_path / "preset"))
    raw = uint8_images()
    # What the classifier computes from raw pixels: its converter, then the model (as
    # predict() would run them, had this environment the grain or tf.data predict needs).
    scaled = classifier.preprocessor.image_converter(raw)
    features = classifier.intermediate_layer(classifier.backbone(scaled)[:, 0])
    expected = dict(images=raw, outputs=np.asarray(classifier(scaled)),
                    features=np.asarray(features))
    measured = load_without_keras(tmp_path / "preset", expected, tmp_path)
    np.testing.assert_allclose(measured["scale"], SCALE, rtol=1e-15)
    np.testing.assert_allclose(measured["offset"], OFFSET, rtol=1e-15)
    for what in ("outputs", "features"):
        record(f"classifier preset: {what}", measured[what], TOLERANCE)
        assert measured[what] < TOLERANCE


def test_backbone_preset_loads_without_keras(tmp_path, record):
    backbone = perturb(keras_hub.models.ViTBackbone(**PRESET_BACKBONE))
    backbone.save_to_preset(str(tmp_path / "preset"))
    x = images((32, 32, 3), seed=7)  # No converter: the backbone reads these as they are.
    tokens = np.asarray(backbone(x))
    measured = load_without_keras(tmp_path / "preset", dict(
        images=x, outputs=tokens, features=tokens[:, 0]), tmp_path)
    assert measured["scale"] is None and measured["offset"] is None
    for what in ("outputs", "features"):
        record(f"backbone preset: {what}", measured[what], TOLERANCE)
        assert measured[what] < TOLERANCE
