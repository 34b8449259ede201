"""Export a trained model for inference without vit_flax: `python export.py WORKDIR --format
onnx --output model.onnx`.

The exported program takes raw pixels, float32 (batch, H, W, 3) in 0..255 at the run's
input size (uint8 images: astype(float32)), any batch size, and gives the logits; the
normalization and the resize are inside it (docs/inference.md). Flags only; the work is
vit_flax.inference.export's. Exit status 2 for a model that cannot be loaded or a bad flag.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("onnx", "stablehlo")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class Default(str):
    """A flag's default value, told apart from the same value given on the command line."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0].rstrip() + " ...",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", metavar="WORKDIR_OR_PRESET",
                        help="a train.py --workdir (its best model) or a Keras Hub preset "
                             "directory")
    parser.add_argument("--format", choices=FORMATS, default="onnx",
                        help="onnx: an ONNX model (onnxruntime, ...), input 'images', output "
                             "'logits'; stablehlo: jax.export's serialized bytes, reloaded by "
                             "jax.export.deserialize without vit_flax")
    parser.add_argument("--output", required=True, metavar="PATH",
                        help="the file to write (replaced if it exists)")
    parser.add_argument("--platforms", default=Default("cpu,cuda"),
                        help="stablehlo only: comma-separated platforms it is lowered for "
                             "(cpu, cuda, rocm, tpu); it runs only on those")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "onnx" and not isinstance(args.platforms, Default):  # Given at all.
        parser.error("--platforms is for --format stablehlo; an ONNX model runs wherever its "
                     "runtime does")
    from vit_flax.inference import export  # After parsing: --help needs no JAX.

    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    try:
        path = export.export_run(args.model, args.output, args.format, platforms)
    except (OSError, ValueError) as error:  # ConfigError, CheckpointError, PretrainedError...
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.format}: float32 (batch, H, W, C) pixels 0..255 in, logits "
          f"out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
