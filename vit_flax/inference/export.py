"""A trained model for inference outside this code: ONNX (through jax2onnx) or JAX's
serialized StableHLO (`jax.export`), both with a dynamic batch size.

The exported program is the model's inference pass with its preprocessing inside:
the seed's ViT and the standard ViT normalize (the adapted Normalization) and resize to
image_size; a Keras Hub preset's ViTHub applies its converter's scale and offset. So it takes
raw pixels: float32 (batch, H, W, C) in 0..255, H x W the model's input size
(config.input_shape; a uint8 image becomes one by astype(float32)), and gives the logits
(batch, num_classes) that `vit_flax.predict` gives.

jax2onnx and onnxruntime are imported here, when an ONNX export is asked for, not before.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_flax.inference.predict import forward
from vit_flax.infra.runtime import quiet_logger
from vit_flax.infra.workdir import write_whole

FORMATS = ("onnx", "stablehlo")
INPUT_NAME, OUTPUT_NAME = "images", "logits"
BATCH = "batch"  # The symbolic batch dimension's name in both formats.
# StableHLO for both kinds of machine by default: an export made on a CPU runs on a GPU too.
PLATFORMS = ("cpu", "cuda")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # What jax.export lowers for by these names.


def _resize_matrix(old: int, new: int) -> np.ndarray:
    """(new, old) weights of jax.image.resize's bilinear resize (no antialiasing) along one
    axis: the resize of the identity, so x @ M.T is the resize, weight for weight."""
    eye = np.eye(old, dtype=np.float32)
    return np.asarray(jax.image.resize(eye, (new, old), "bilinear", antialias=False))


class ResizeWeights(nnx.Variable):
    """A constant of the exported graph: one axis' resize matrix."""


class ExportPipeline(nnx.Module):
    """The inference half of the seed's DataAugmentation (normalize, then resize to
    image_size) with the resize as two matrix products: jax2onnx's resize cannot take a
    symbolic batch size (its abstract_eval needs every dimension constant)."""

    def __init__(self, pipeline, input_shape: tuple[int, int, int]):
        height, width, _ = input_shape
        size = pipeline.config.image_size
        self.normalization = pipeline.normalization
        self.rows = ResizeWeights(jnp.asarray(_resize_matrix(height, size)))
        self.cols = ResizeWeights(jnp.asarray(_resize_matrix(width, size)))

    def __call__(self, images, *, train: bool, rngs=None, mix=None):
        if train or mix is not None:
            raise ValueError("an exported model is inference only (train=False, no mix)")
        x = self.normalization(images)
        return jnp.einsum("oh,bhwc,pw->bopc", self.rows[...], x, self.cols[...])


def _export_copy(model):
    """A copy of the model whose input pipeline jax2onnx can convert; the model is unchanged.
    A model without the seed's pipeline (a preset's ViTHub: scale and offset only) as is."""
    if not hasattr(model, "data_augmentation"):
        return model
    copy = nnx.merge(*nnx.split(model))
    copy.data_augmentation = ExportPipeline(copy.data_augmentation, model.config.input_shape)
    return copy


def _inference_fn(model):
    """images -> logits with the weights as constants. The state goes through `forward`'s
    jit as an argument: nnx.remat refuses a closure over the model (see predict.forward)."""
    graphdef, state = nnx.split(model)
    return lambda images: forward(graphdef, state, images)


def export_onnx(model, path: str | os.PathLike, opset: int = 23) -> Path:
    """Write the model as ONNX (input "images" float32 (batch, H, W, C), output "logits"),
    checked by onnx.checker and loaded once in onnxruntime."""
    import jax2onnx  # Lazily: only an ONNX export needs it (and it patches flax while used).
    import onnx

    height, width, channels = model.config.input_shape
    # onnx_ir warns once per untyped shape constant it leaves out ("value type ... is not
    # known"), dozens of lines about the converter's internals, not the user's model.
    with quiet_logger("onnx_ir", logging.ERROR):
        proto = jax2onnx.to_onnx(_inference_fn(_export_copy(model)),
                                 inputs=[(BATCH, height, width, channels)], opset=opset,
                                 input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    # jax2onnx leaves the graph's input and output untyped for this model: say what they are,
    # so that tools (and onnxruntime) see float32 (batch, H, W, C) -> (batch, classes).
    _set_type(proto.graph.input[0], [BATCH, height, width, channels])
    _set_type(proto.graph.output[0], [BATCH, model.config.num_classes])
    onnx.checker.check_model(proto)
    path = Path(path)
    write_whole(path, proto.SerializeToString())  # A failed write keeps the old file.
    return path


def _set_type(value, shape) -> None:
    import onnx

    if not value.type.HasField("tensor_type"):
        value.type.CopyFrom(onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, shape))


def export_stablehlo(model, path: str | os.PathLike, platforms=PLATFORMS) -> Path:
    """Write the model as serialized `jax.export.Exported` bytes: float32 (batch, H, W, C)
    in, logits out. Reload without vit_flax: jax.export.deserialize(bytearray(data)).call(x).
    platforms: where it may run (lowered for each; None: this machine's backend only)."""
    if platforms is not None and (not platforms or set(platforms) - set(KNOWN_PLATFORMS)):
        raise ValueError(f"platforms must be some of {', '.join(KNOWN_PLATFORMS)}, got "
                         f"{', '.join(platforms) or 'none'}")
    batch, = jax.export.symbolic_shape(BATCH)
    spec = jax.ShapeDtypeStruct((batch, *model.config.input_shape), jnp.float32)
    exported = jax.export.export(jax.jit(_inference_fn(model)), platforms=platforms)(spec)
    path = Path(path)
    write_whole(path, exported.serialize())
    return path


def export(model, path: str | os.PathLike, fmt: str = "onnx", platforms=PLATFORMS) -> Path:
    """export_onnx or export_stablehlo, by `fmt` ("onnx" or "stablehlo"; platforms: the
    StableHLO's)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if model.config.num_classes is None:
        raise ValueError("this model is a backbone without a classifier head: export a run "
                         "or a preset with a head (task.json)")
    if fmt == "onnx":
        return export_onnx(model, path)
    return export_stablehlo(model, path, platforms)


def export_run(source: str | os.PathLike, output: str | os.PathLike, fmt: str = "onnx",
               platforms=PLATFORMS) -> Path:
    """Export the best model of a vit_flax workdir, or a Keras Hub preset directory."""
    from vit_flax.inference.classify import load_classifier

    model, _, _ = load_classifier(source)
    return export(model, output, fmt, platforms)
