"""Classify images with a trained model: `python predict.py WORKDIR photo.jpg photos/ "*.png"`.

Prints each image's most probable classes with their probabilities. Flags only; the work is
vit_flax.inference.classify's. Exit status: 0 when every image was classified, 1 when some
could not be read (each named in one line; the others are still classified), 2 for a model
that cannot be loaded or a bad flag.
"""

from __future__ import annotations

import argparse
import os
import sys

FORMATS = ("table", "json", "csv")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", metavar="WORKDIR_OR_PRESET",
                        help="a train.py --workdir (its best model and class names) or a Keras "
                             "Hub preset directory (classes named by index)")
    parser.add_argument("images", metavar="IMAGE_OR_FOLDER_OR_GLOB", nargs="+",
                        help="image files, folders (searched recursively) or globs (quote "
                             "them: 'photos/*.jpg'); each image is decoded and resized as the "
                             "training images were")
    parser.add_argument("--top-k", type=positive, default=5,
                        help="how many classes to show per image (at most the model's)")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table: one line per image; json: a list of {image, top, error}; "
                             "csv: image,rank,class,probability,error rows")
    parser.add_argument("--batch-size", type=positive, default=64,
                        help="images decoded and classified at a time")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from vit_flax.inference import classify  # After parsing: --help needs no JAX.

    try:
        model, names, note = classify.load_classifier(args.model)
        predictions = classify.classify(model, args.images, names, top_k=args.top_k,
                                        batch_size=args.batch_size)
    except (OSError, ValueError) as error:  # ConfigError, CheckpointError, PretrainedError...
        print(f"error: {error}", file=sys.stderr)
        return 2
    if note:
        print(f"note: {note}", file=sys.stderr)
    failed = [p for p in predictions if p.error is not None]
    if args.format == "table":  # The table holds classes; the failures go to stderr.
        for p in failed:
            print(f"error: {p.error}", file=sys.stderr)
    text = classify.format_predictions(predictions, args.format)
    if text:
        write_out(text)
    return 1 if failed else 0


def write_out(text: str) -> None:
    """`text` on stdout; a reader that stopped early (`predict.py ... | head`) ends the
    output, not the command with a traceback (the exit status stays the predictions')."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would fail again: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
