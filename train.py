"""Train the seed's ViT: `python train.py --epochs 100`. Flags only; the work is vit_flax's."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def integer(text: str) -> int:
    """An int; whether it is in range is ViTConfig's to say, in one place."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of integers like 2048,1024, got {text!r}") from None


def parse_args(argv, defaults):
    parser = OneLineParser(description=__doc__)
    add = parser.add_argument
    add("--epochs", type=integer, default=defaults.epochs)
    add("--batch-size", type=integer, default=defaults.batch_size)
    add("--microbatch-size", type=integer, default=defaults.microbatch_size,
        help="examples per forward/backward pass; one optimizer step per batch either way")
    add("--learning-rate", type=float, default=defaults.learning_rate)
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--input-size", type=integer, default=defaults.input_size,
        help="side of the images fed to the model; folder images are resized to it")
    add("--image-size", type=integer, default=defaults.image_size,
        help="side the images are resized to inside the model")
    add("--patch-size", type=integer, default=defaults.patch_size)
    add("--projection-dim", type=integer, default=defaults.projection_dim)
    add("--num-heads", type=integer, default=defaults.num_heads)
    add("--transformer-layers", type=integer, default=defaults.transformer_layers)
    add("--mlp-head-units", type=int_list, default=defaults.mlp_head_units,
        help="comma list, e.g. 2048,1024")
    add("--head", default=defaults.head, help="flatten (the seed), gap or cls")
    add("--dtype", default=defaults.dtype,
        help="float32 (default) or bfloat16: bf16 matmuls, float32 weights and optimizer")
    add("--dataset", default="cifar100", help="cifar100, cifar10 or folder")
    add("--data-dir", default=None,
        help="where the data is: a CIFAR archive or prepared TFDS copy, or PATH/train/<class>/")
    add("--workdir", default="workdir", help="where history, checkpoint and figures go")
    add("--seed", type=int, default=defaults.seed)
    add("--validation-split", type=float, default=defaults.validation_split)
    add("--train-examples", type=integer, default=None, help="use only the first N")
    add("--test-examples", type=integer, default=None, help="use only the first N")
    add("--overwrite", action="store_true",
        help="delete a run of another configuration found in --workdir (else: an error)")
    add("--keep-checkpoints", type=integer, default=2,
        help="how many epoch-end checkpoints to keep for resuming")
    add("--log-every", type=integer, default=0,
        help="also log the running training loss to TensorBoard every N steps (0: epochs only)")
    add("--coordinator-address", default=None,
        help="several hosts: HOST:PORT of process 0 (starts jax.distributed)")
    add("--num-processes", type=integer, default=None, help="several hosts: how many")
    add("--process-id", type=integer, default=None, help="several hosts: this one's index")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import vit_flax
    from vit_flax.data import DataError
    from vit_flax.resume import Interrupted

    args = parse_args(argv, vit_flax.ViTConfig())
    try:
        config = vit_flax.ViTConfig(
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
            weight_decay=args.weight_decay, input_size=args.input_size,
            image_size=args.image_size, patch_size=args.patch_size,
            projection_dim=args.projection_dim, num_heads=args.num_heads,
            transformer_layers=args.transformer_layers, mlp_head_units=args.mlp_head_units,
            head=args.head, dtype=args.dtype, seed=args.seed,
            microbatch_size=args.microbatch_size,
            validation_split=args.validation_split)
        vit_flax.run(config, dataset=args.dataset, data_dir=args.data_dir, workdir=args.workdir,
                     train_examples=args.train_examples, test_examples=args.test_examples,
                     coordinator_address=args.coordinator_address,
                     num_processes=args.num_processes, process_id=args.process_id,
                     overwrite=args.overwrite, keep_checkpoints=args.keep_checkpoints,
                     log_every=args.log_every)
    except (vit_flax.ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Interrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
