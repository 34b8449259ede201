"""Train the Keras reference and vit_flax side by side on real images; print both curves.

For each seed: the Keras model is built (keras.utils.set_random_seed(seed)), its Normalization
adapted on all the training images (as the seed adapts on x_train), and vit_flax starts from
those very weights (parity.keras_to_flax). Both then follow the seed's recipe -- AdamW,
sparse cross-entropy, validation on the last 10% of the arrays, dropout and random
augmentation on -- Keras through `fit`, vit_flax through its own epoch loop
(`trainer.train_epoch`, the one `vit_flax.train` runs).
Their randomness (shuffles, dropout masks, augmentation draws) is not shared, so the curves
cannot coincide; two seeds of each show how far apart seed-to-seed noise alone puts them.

Finally Keras' best checkpoint (ModelCheckpoint(save_weights_only=True), as the seed) is read
by `parity.load_keras_weights` and evaluated by vit_flax: the same accuracy as Keras' own.

    python -m parity.compare_training                 # defaults: ~15 min on 2 CPU cores
    python -m parity.compare_training --per-class 20 --epochs 2 --seeds 0   # a smoke test
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import parity  # noqa: E402
from parity import keras_reference  # noqa: E402
from vit_flax import ViT, ViTConfig  # noqa: E402
from vit_flax.data import sources as data_lib  # noqa: E402
from vit_flax.infra import parallel
from vit_flax.training import feeds, steps
from vit_flax.training import loop as trainer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg-train.tar.gz"
SHUFFLE_SEED = 1337  # One fixed order, so the last-10% validation split holds every class.


def read_tarball(path: Path, per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first `per_class` images (by file name) of every train/<class>/ in the tarball."""
    with tarfile.open(path) as tar:
        by_class = defaultdict(list)
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 2:
                by_class[parts[-2]].append(member)
        classes = sorted(by_class)
        images, labels = [], []
        for label, name in enumerate(classes):
            for member in sorted(by_class[name], key=lambda m: m.name)[:per_class]:
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                    images.append(np.asarray(image.convert("RGB"), np.uint8))
                labels.append(label)
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(images))
    return np.stack(images)[order], np.asarray(labels, np.int32)[order], classes


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- Keras ------------------------------------------------------------------------------------

def train_keras(model: keras.Model, config: ViTConfig, images, labels, checkpoint: Path):
    """The seed's run_experiment fit; returns per-epoch validation metrics."""
    keras_reference.compile_like_seed(model, config)
    progress = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: log(
        f"  keras    epoch {epoch + 1}: val_accuracy {logs['val_accuracy']:.4f} "
        f"val_loss {logs['val_loss']:.4f}"))
    best = keras.callbacks.ModelCheckpoint(str(checkpoint), monitor="val_accuracy",
                                           save_best_only=True, save_weights_only=True)
    history = model.fit(images, labels, batch_size=config.batch_size, epochs=config.epochs,
                        validation_split=config.validation_split, callbacks=[best, progress],
                        verbose=0)
    return [{"val_accuracy": a, "val_loss": v, "accuracy": t}
            for a, v, t in zip(history.history["val_accuracy"], history.history["val_loss"],
                               history.history["accuracy"], strict=True)]


# --- vit_flax ---------------------------------------------------------------------------------

def train_flax(model: ViT, config: ViTConfig, train, validation) -> list[dict]:
    """vit_flax's own epochs (trainer.prepare_fit / train_epoch, as vit_flax.train runs
    them) on one device, without a workdir."""
    member = trainer.Member(config, Path("unused"))  # Nothing is written.
    fit, state = trainer.prepare_fit([member], [model], train, validation, one_device())
    history = []
    for epoch in range(1, config.epochs + 1):
        state, (row,) = trainer.train_epoch(fit, state, epoch)
        if row["first_nonfinite_step"] >= 0:
            raise FloatingPointError(f"vit_flax's loss became non-finite at step "
                                     f"{row['first_nonfinite_step']} (epoch {epoch})")
        history.append({"val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"],
                        "accuracy": row["accuracy"]})
        log(f"  vit_flax epoch {epoch}: val_accuracy {row['val_accuracy']:.4f} "
            f"val_loss {row['val_loss']:.4f}")
    return history


def one_device():
    return parallel.data_mesh(jax.devices()[:1])


def evaluate_checkpoint(path: Path, config: ViTConfig, validation) -> dict[str, float]:
    """Keras' best checkpoint, read by parity.load_keras_weights, evaluated by vit_flax."""
    model = parity.load_keras_weights(path, config)
    graphdef, params, statistics = steps.split_model(model)
    mesh = one_device()
    eval_step = steps.make_eval_step(graphdef, mesh, loss=steps.LossOptions.of(config))
    return trainer.evaluate(eval_step, params, statistics,
                            feeds.make_feed(validation, mesh), config.batch_size)


# --- one seed, the table ----------------------------------------------------------------------

def run_seed(seed: int, config: ViTConfig, images, labels, workdir: Path) -> dict:
    config = config.replace(seed=seed)
    train, validation = data_lib.validation_split(data_lib.Dataset(images, labels),
                                                  config.validation_split)
    keras.utils.set_random_seed(seed)
    keras_model = keras_reference.build_keras_vit(config, adapt_images=images)
    flax_model = parity.keras_to_flax(keras_model, config)  # Same initial weights.

    log(f"seed {seed}: vit_flax ({len(train)} train / {len(validation)} validation images)")
    started = time.perf_counter()
    flax_history = train_flax(flax_model, config, train, validation)
    flax_seconds = time.perf_counter() - started

    log(f"seed {seed}: Keras")
    checkpoint = workdir / f"keras_seed{seed}.weights.h5"
    started = time.perf_counter()
    keras_history = train_keras(keras_model, config, images, labels, checkpoint)
    keras_seconds = time.perf_counter() - started

    best_epoch = int(np.argmax([h["val_accuracy"] for h in keras_history]))  # First maximum.
    cross = evaluate_checkpoint(checkpoint, config, validation)
    return {"seed": seed, "keras": keras_history, "vit_flax": flax_history,
            "keras_seconds": keras_seconds, "vit_flax_seconds": flax_seconds,
            "keras_best_epoch": best_epoch + 1,
            "keras_best_val_accuracy": keras_history[best_epoch]["val_accuracy"],
            "keras_checkpoint_by_vit_flax": cross}


def print_table(runs: list[dict], metric: str) -> None:
    columns = [(f"keras s{r['seed']}", r["keras"]) for r in runs] + \
              [(f"flax s{r['seed']}", r["vit_flax"]) for r in runs]
    print(f"\nvalidation {metric} per epoch")
    print("epoch " + " ".join(f"{name:>10}" for name, _ in columns))
    for epoch in range(len(runs[0]["keras"])):
        print(f"{epoch + 1:5d} " + " ".join(f"{history[epoch][metric]:10.4f}"
                                           for _, history in columns))


def print_summary(runs: list[dict]) -> None:
    def final(side):
        return [r[side][-1]["val_accuracy"] for r in runs]

    keras_final, flax_final = final("keras"), final("vit_flax")
    print("\nfinal val_accuracy  keras: " + ", ".join(f"{a:.4f}" for a in keras_final)
          + "  vit_flax: " + ", ".join(f"{a:.4f}" for a in flax_final))
    if len(runs) > 1:
        print(f"seed-to-seed spread  keras: {np.ptp(keras_final):.4f}  "
              f"vit_flax: {np.ptp(flax_final):.4f}")

    def curve(run, side):
        return np.array([h["val_accuracy"] for h in run[side]])

    def mean_gap(pairs):
        return np.mean([np.abs(a - b).mean() for a, b in pairs])

    # Mean |difference| of two val_accuracy curves over the epochs: between the frameworks
    # (same seed: same initial weights) and, for scale, between seeds of one framework.
    same_seed = mean_gap([(curve(r, "keras"), curve(r, "vit_flax")) for r in runs])
    line = f"mean |gap| between curves  keras vs vit_flax (same seed): {same_seed:.4f}"
    if len(runs) > 1:
        pairs = list(zip(runs, runs[1:], strict=False))
        for side in ("keras", "vit_flax"):
            gap = mean_gap([(curve(a, side), curve(b, side)) for a, b in pairs])
            line += f"; {side} seed vs seed: {gap:.4f}"
    print(line)
    print(f"keras - vit_flax, mean over seeds: {np.mean(keras_final) - np.mean(flax_final):+.4f}")
    for r in runs:
        print(f"seed {r['seed']}: Keras best checkpoint (epoch {r['keras_best_epoch']}) "
              f"val_accuracy by Keras {r['keras_best_val_accuracy']:.4f}, by vit_flax after "
              f"load_keras_weights {r['keras_checkpoint_by_vit_flax']['accuracy']:.4f}; "
              f"time Keras {r['keras_seconds']:.0f}s, vit_flax {r['vit_flax_seconds']:.0f}s")


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    add = parser.add_argument
    add("--data", type=Path, default=DEFAULT_DATA, help="train/<class>/*.jpg tarball")
    add("--per-class", type=int, default=500, help="images per class (10%% validate)")
    add("--seeds", type=int_list, default=(0, 1), help="comma list; two show the noise")
    add("--epochs", type=int, default=15)
    add("--batch-size", type=int, default=64)
    add("--image-size", type=int, default=32, help="the seed resizes to 72")
    add("--patch-size", type=int, default=4)
    add("--projection-dim", type=int, default=32)
    add("--num-heads", type=int, default=2)
    add("--transformer-layers", type=int, default=2)
    add("--mlp-head-units", type=int_list, default=(128, 64))
    add("--out", type=Path, default=None, help="write the curves as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    images, labels, classes = read_tarball(args.data, args.per_class)
    config = ViTConfig(
        num_classes=len(classes), input_size=images.shape[1], image_size=args.image_size,
        patch_size=args.patch_size, projection_dim=args.projection_dim,
        num_heads=args.num_heads, transformer_layers=args.transformer_layers,
        mlp_head_units=args.mlp_head_units, batch_size=args.batch_size, epochs=args.epochs)
    log(f"{len(images)} images of {len(classes)} classes from {args.data.name}; {config}")
    with tempfile.TemporaryDirectory() as workdir:
        runs = [run_seed(seed, config, images, labels, Path(workdir)) for seed in args.seeds]
    print_table(runs, "val_accuracy")
    print_table(runs, "val_loss")
    print_summary(runs)
    if args.out:
        args.out.write_text(json.dumps({"config": json.loads(config.to_json()), "runs": runs},
                                       indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
