"""Train the seed's ViT: `python train.py --epochs 100`. Flags only; the work is vit_flax's.

Every ViTConfig field has its flag (--field-name), generated from the dataclass with its
meaning and default, so a new field cannot be forgotten here.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import re
import signal
import sys
import typing


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def integer(text: str) -> int:
    """An int; whether it is in range is ViTConfig's to say, in one place."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def comma_list(kind, expected: str):
    """A flag type: comma-separated values of `kind`, as a tuple ("none": the empty one)."""
    def parse(text: str) -> tuple:
        if text.strip().lower() == "none":
            return ()
        try:
            return tuple(kind(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return parse


int_list = comma_list(int, "a comma-separated list of integers like 2048,1024, or none")
float_list = comma_list(float, "a number or a comma-separated list like 1e-3,3e-4")


# Fields that take a comma list: the runs are every combination of their values (and of
# --seeds), trained together as one group (vit_flax.training.group).
GRID_FIELDS = {"learning_rate": "learning_rates", "weight_decay": "weight_decays"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per ViTConfig field that has one: type, choices and help from the field.
    The default shown is the keras recipe's (the seed's); --recipe strong changes some."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if not field.metadata.get("flag", True):
            continue
        kind = hints[field.name]
        options = {"default": field.default, "help": field.metadata["help"]}
        if typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        elif kind == tuple[int, ...]:  # A comma list; argparse parses a str default too.
            options.update(type=int_list, default=",".join(map(str, field.default)))
        elif field.name in GRID_FIELDS:
            options.update(type=float_list, default=str(field.default),
                           help=options["help"] + "; a comma list trains one run per value, "
                                                  "together (see --seeds)")
        else:
            options["type"] = {int: integer, float: float}[kind]
        parser.add_argument(flag(field.name), **options)


# run()'s keyword arguments besides the config: flag -> (default, help).
RUN_FLAGS = {
    "seeds": (None, "train one run per seed, together in one program (instead of --seed): "
                    "e.g. 0,1,2,3; with comma lists for --learning-rate / --weight-decay, "
                    "every combination; runs go to WORKDIR/runs/<name>, mean +- std over "
                    "seeds to WORKDIR/summary.json"),
    "dataset": ("cifar100", "{cifar100,cifar10,folder,tfds:NAME}: CIFAR (TFDS copy, Keras' "
                            "archive or a download), an image folder (--data-dir), or a "
                            "prepared TFDS image-classification data set, e.g. "
                            "tfds:imagenette"),
    "data_dir": (None, "where the data is: a CIFAR archive or prepared TFDS copy, or "
                       "PATH/train/<class>/ (and optionally PATH/test/<class>/)"),
    "workdir": ("workdir", "where config, history, checkpoints, results and figures go"),
    "train_examples": (None, "use only the first N training examples"),
    "test_examples": (None, "use only the first N test examples"),
    "keep_checkpoints": (2, "how many epoch-end checkpoints to keep for resuming"),
    "log_every": (0, "also log the running training loss to TensorBoard every N steps "
                     "(0: epochs only)"),
    "checkpoint_every": (0, "also checkpoint every N steps inside an epoch, so that a run "
                            "killed mid-epoch resumes at that step (0: at epoch ends only)"),
    "coordinator_address": (None, "several processes: HOST:PORT of process 0 (starts "
                                  "jax.distributed)"),
    "num_processes": (None, "several processes: how many"),
    "process_id": (None, "several processes: this one's index"),
    "heartbeat_timeout": (20, "several processes: seconds without a peer's heartbeat before "
                              "every process stops with one line (how long a dead peer goes "
                              "unnoticed)"),
    "init_from": (None, "fine-tune: start from a vit_flax workdir (a train.py run: its best "
                        "model) or a Keras Hub preset directory (its config.json, "
                        "model.weights.h5 and image converter; the model's shape flags "
                        "come from it): its weights where they fit, the position embedding "
                        "resampled to --image-size / --patch-size, the classifier new for "
                        "this data set's classes (docs/finetuning.md)"),
    "data_in": ("auto", "{auto,memory,stream}: where the training images live: auto keeps "
                        "them on the devices when they fit and streams them from the host "
                        "otherwise; memory or stream forces one"),
    "compilation_cache": ("default", "where JAX caches compiled programs, so that a rerun "
                                     "skips most of the compile ('default': $VIT_FLAX_CACHE, "
                                     "else $XDG_CACHE_HOME/vit_flax/jax, else "
                                     "~/.cache/vit_flax/jax; 'none': no cache)"),
}
SWITCHES = {
    "overwrite": "delete a vit_flax run of another configuration found in --workdir (only "
                 "vit_flax's own files; anything else there is kept)",
    "allow_non_empty": "train into a --workdir that is not empty and not a vit_flax run "
                       "(nothing of what is there is overwritten)",
    "no_unroll_threefry": "keep JAX's own (rolled) CPU lowering of its random hash: same "
                          "bits, slower steps on CPU, smaller programs",
}
# What a failed write leaves: every finished epoch's checkpoint (saved before the figures
# and TensorBoard events of its end) and the best model, so a rerun resumes.
_RESUME = "; the epochs finished before are saved: {}, then run the same command to resume"
OS_ERROR_HINTS = {errno.ENOSPC: _RESUME.format("free space"),
                  errno.EDQUOT: _RESUME.format("free space"),
                  errno.EACCES: _RESUME.format("fix the permissions"),
                  errno.EROFS: _RESUME.format("make the file system writable")}
CHOICES = {"data_in": ("auto", "memory", "stream")}
INTEGER_FLAGS = {"train_examples", "test_examples", "keep_checkpoints", "log_every",
                 "checkpoint_every",
                 "num_processes", "process_id", "heartbeat_timeout"}


def build_parser(config_class, recipes, models) -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--recipe", choices=tuple(recipes), default="keras",
                        help="keras: the seed's recipe exactly; strong: a measured recipe for "
                             "training from scratch (README). Sets the defaults of the fields "
                             "it changes; a flag given explicitly still wins")
    parser.add_argument("--model", choices=tuple(models), default="seed",
                        help="seed: the Keras example's ViT, as the flags below build it; "
                             "vit-*: a standard ViT of that size (Keras Hub's; --init-from "
                             "a preset of it to fine-tune) at --image-size 224: sets "
                             "--architecture standard, the patch size, depth, heads and width, "
                             "a class-token head and no dropout; a flag given explicitly wins")
    add_config_flags(parser, config_class)
    for name, (default, help_text) in RUN_FLAGS.items():
        kind = int_list if name == "seeds" else integer if name in INTEGER_FLAGS else str
        parser.add_argument(flag(name), default=default, help=help_text, type=kind,
                            choices=CHOICES.get(name))
    for name, help_text in SWITCHES.items():
        parser.add_argument(flag(name), action="store_true", help=help_text)
    return parser


def parse_args(argv, config_class, recipes, models) -> tuple[dict, dict]:
    """(every option's value, the config fields given explicitly on the command line)."""
    parser = build_parser(config_class, recipes, models)
    args = vars(parser.parse_args(argv))
    for action in parser._actions:  # Parse again with no defaults: what was given remains.
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    fields = {f.name for f in dataclasses.fields(config_class) if f.metadata["flag"]}
    return args, {name: value for name, value in given.items() if name in fields}


def configs(args: dict, given: dict, recipe, sweep):
    """The config of the flags; the list of a group's configs (`sweep`) where --seeds or a
    comma list asks for one."""
    grid = {name: given.pop(name) for name in GRID_FIELDS if name in given}
    singles = {name: values[0] for name, values in grid.items() if len(values) == 1}
    config = recipe(args["recipe"], model=args["model"], **given, **singles)
    lists = {GRID_FIELDS[name]: values for name, values in grid.items() if len(values) > 1}
    if args["seeds"] is None and not lists:
        return config
    return sweep(config, seeds=args["seeds"], **lists)


def in_flags(message: str, names, switches=SWITCHES) -> str:
    """A library message in the CLI's words: a config field or run() argument it names
    becomes its flag: `name=value` always (`name=True` of an on/off switch: the bare flag),
    a bare name when it has an underscore (a bare "epochs" or "seed" may be plain English)."""
    alternatives = "|".join(sorted(names, key=len, reverse=True))
    pattern = re.compile(r"(?<![-\w])(" + alternatives + r")(=True\b|=|\b)")

    def replace(match):
        name, equals = match.groups()
        if equals == "=True" and name in switches:
            return flag(name)
        if equals:
            return flag(name) + " " + equals[1:]
        return flag(name) if "_" in name else name

    return pattern.sub(replace, message)


class Stopped(Exception):
    """SIGTERM or SIGINT while vit_flax is imported (seconds), before its own handlers."""


def stop(signum, _frame):
    raise Stopped(f"{signal.Signals(signum).name}: stopped before training started; nothing "
                  f"was written")


def main(argv=None) -> int:
    """train.py; SIGTERM / SIGINT before the epochs end it with one line too (from
    vit_flax.run on, its StartupSignals; in the epochs, the loop stops at the next step)."""
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return cli(argv)
    except Stopped as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cli(argv) -> int:
    import vit_flax
    from vit_flax.infra.signals import StartupSignals

    args, given = parse_args(argv, vit_flax.ViTConfig, vit_flax.config.RECIPES,
                             vit_flax.config.MODELS)
    fields = [f.name for f in dataclasses.fields(vit_flax.ViTConfig) if f.metadata["flag"]]
    names = [*fields, *RUN_FLAGS, "overwrite", "allow_non_empty", "recipe", "model"]
    try:
        if args["init_from"] is not None:  # The model's shape is the source's.
            from vit_flax.weights import finetune

            named = vit_flax.config.MODELS[args["model"]]
            implied = {name: f"model={args['model']}" for name in named if name not in given}
            given.update(finetune.source_fields(args["init_from"], {**named, **given},
                                                implied=implied))
        config = configs(args, given, vit_flax.ViTConfig.recipe, vit_flax.sweep)
        run_options = {name: args[name] for name in RUN_FLAGS if name != "seeds"}
        if run_options["compilation_cache"] == "none":
            run_options["compilation_cache"] = None
        with StartupSignals():
            vit_flax.run(config, **run_options,
                         overwrite=args["overwrite"], allow_non_empty=args["allow_non_empty"],
                         unroll_threefry=not args["no_unroll_threefry"])
    except (vit_flax.ConfigError, vit_flax.DataError, vit_flax.CheckpointError) as error:
        print(f"error: {in_flags(str(error), names)}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"error: {in_flags(str(error), names)}", file=sys.stderr)
        return 1
    except OSError as error:  # A write the library does not wrap: a figure, TensorBoard.
        print(f"error: {error}{OS_ERROR_HINTS.get(error.errno, '')}", file=sys.stderr)
        return 1
    except vit_flax.Interrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
