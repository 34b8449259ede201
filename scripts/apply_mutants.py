"""Re-apply the mutation pass: each mutant (a plausible bug) is applied to a fresh clone of
this repository's HEAD, and the test named for it must fail (KILLED); a mutant whose test
passes (SURVIVED) is a case no test pins down.

    python scripts/apply_mutants.py                 # all of them (~4 minutes on 2 cores)
    python scripts/apply_mutants.py pace_never_waits adamw_epsilon

Exit status 1 when a mutant survives. docs/testing.md lists the last run's results.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

MUTANTS = [
    # (name, file in the repository, its text (exactly once), the mutant text, [tests])

    # --- A. one mutant per test in tests/test_mutations.py ------------------------------------
    # Keras' in_top_k is "fewer than 5 logits strictly above the label's"; `<= 5` admits the 6th.
    ("top5_admits_sixth", "vit_flax/training/steps.py",
     "(jnp.sum(logits > label_logits, -1) < 5)",
     "(jnp.sum(logits > label_logits, -1) <= 5)",
     ["tests/test_mutations.py::test_top5_counts_a_label_only_when_at_most_four_logits_beat_it"]),
    # Every epoch trains on epoch 1's permutation (the trainer's order ignores the epoch).
    ("same_order_every_epoch", "vit_flax/training/loop.py",
     "data_lib.epoch_order(fit.train_feed.size, m.config.seed, epoch)",
     "data_lib.epoch_order(fit.train_feed.size, m.config.seed, 1)",
     ["tests/test_mutations.py::test_each_epoch_trains_on_its_own_permutation"]),
    # The train step draws its augmentation/dropout keys for step 0 at every step.
    ("step_keys_fixed", "vit_flax/training/steps.py",
     "        rngs = step_rngs(state.rng, state.step, index)",
     "        rngs = step_rngs(state.rng, 0, index)",
     ["tests/test_mutations.py::test_each_step_draws_its_own_augmentation_and_dropout"]),
    # The head's first Dropout (on the flattened tokens) at config.dropout, not head_dropout
    # (its MLP keeps head_dropout).
    ("head_dropout_rate_is_block_dropout", "vit_flax/models/seed_vit.py",
     "        self.dropout_rate = config.head_dropout",
     "        self.dropout_rate = config.dropout",
     ["tests/test_mutations.py::test_the_head_drops_its_flattened_tokens_at_head_dropout"]),
    # AdamW decays after the Adam step: var -> (var - lr*d) * (1 - lr*wd) (the decay applied
    # to the updated value instead of the old one). One replacement of the chain's tail.
    ("adamw_decay_after_step", "vit_flax/training/optim.py",
     "scale_by_keras_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay),\n"
     "                       step_size)",
     "scale_by_keras_adam(b1, b2, eps), step_size, optax.stateless(\n"
     "        lambda u, p: jax.tree.map(lambda a, b: a - (b + a) * weight_decay * (\n"
     "            learning_rate(0) if callable(learning_rate) else learning_rate), u, p)))",
     ["tests/test_mutations.py::test_adamw_decays_the_old_value_before_the_adam_step"]),
    # The config's default LayerNorm epsilon is not the seed's 1e-6 (all three layer norms).
    ("layer_norm_epsilon_1e-5", "vit_flax/config.py",
     "layer_norm_epsilon: float = _field(1e-6,",
     "layer_norm_epsilon: float = _field(1e-5,",
     ["tests/test_mutations.py::test_layer_norms_use_the_seeds_epsilon"]),
    # The train step's loss ignores label_smoothing (the eval step keeps it; the test's train
    # assertion, its last, must catch it).
    ("train_step_ignores_label_smoothing", "vit_flax/training/steps.py",
     "        per_example = per_example_metrics(logits, micro.labels, loss.label_smoothing)",
     "        per_example = per_example_metrics(logits, micro.labels)",
     ["tests/test_mutations.py::test_the_train_and_eval_steps_compute_the_label_smoothed_loss"]),
    # The strong recipe's random crop is never taken.
    ("crop_never_taken", "vit_flax/models/seed_vit.py",
     "        if train and config.crop_padding:",
     "        if False:",
     ["tests/test_mutations.py::test_the_strong_recipes_crop_is_taken_in_training"]),
    # The stop flag read only when the epoch's batches have run out (the end of the epoch),
    # not before each step: the step loop's check moves into the `batch is None` branch.
    # One replacement; the file stays importable and a stop still ends the run (at the
    # epoch end, with the same Interrupted message).
    ("sigterm_only_at_epoch_end", "vit_flax/training/loop.py",
     "            if batch is None:\n"
     "                break\n"
     "            if fit.stop is not None and fit.stop.requested:\n"
     "                return state, None\n",
     "            if batch is None:\n"
     "                if fit.stop is not None and fit.stop.requested:\n"
     "                    return state, None\n"
     "                break\n",
     ["tests/test_mutations.py::test_sigterm_is_honoured_at_the_next_step_not_at_the_end_of_the_epoch"]),

    # --- B. additional mutants ----------------------------------------------------------------
    ("group_first_runs_hyperparams", "vit_flax/training/setup.py",
     "group.group_optimizer(c, steps_per_epoch)",
     "group.group_optimizer(first, steps_per_epoch)",
     ["tests/training/test_group.py::test_each_run_starts_with_its_own_learning_rate_and_weight_decay"]),
    ("heartbeat_flag_not_passed_on", "vit_flax/training/run.py",
     "heartbeat_timeout=processes.heartbeat_timeout",
     "heartbeat_timeout=20",
     ["tests/infra/test_multiprocess.py::test_a_dead_peer_ends_the_other_process_with_one_line"]),
    ("padding_rows_not_zero", "vit_flax/training/feeds.py",
     "np.zeros((rows - len(images), *images.shape[1:]),",
     "np.ones((rows - len(images), *images.shape[1:]),",
     ["tests/data/test_stream.py::test_a_split_goes_to_the_devices_padded_to_its_stored_rows"]),
    ("stored_rows_wrong_unit", "vit_flax/training/feeds.py",
     "unit = max(256, 2 ** max(count.bit_length() - 4, 0))",
     "unit = max(256, 2 ** max(count.bit_length() - 1, 0))",
     ["tests/data/test_stream.py::test_a_split_goes_to_the_devices_padded_to_its_stored_rows"]),
    # Killer changed from the brief's test_each_run_is_its_solo_run: that test compares
    # history.json only, which _best_models never touches. The best model feeds the
    # test_* results; the test below compares each run's own checkpoint's accuracy on the
    # 9 test images with its results.json. It kills the mutant only if the two seeds' best
    # models differ in test accuracy (multiples of 1/9): it may SURVIVE by coincidence.
    ("best_model_of_first_member", "vit_flax/training/loop.py",
     "    return [restore_model(m.directory / layout.BEST_CHECKPOINT, m.config)",
     "    return [restore_model(fit.members[0].directory / layout.BEST_CHECKPOINT, m.config)",
     ["tests/training/test_group.py::test_each_run_directory_is_a_run_and_the_summary_averages_over_seeds"]),
    ("pace_never_waits", "vit_flax/training/feeds.py",
     "        if len(self.pending) > self.ahead:",
     "        if False:",
     ["tests/data/test_stream.py::test_pace_keeps_the_host_at_most_ahead_steps_in_front_of_the_devices"]),
    # `eps: float = 1e-7` occurs twice in optim.py (scale_by_keras_adam and keras_adamw):
    # keras_adamw's default, the one for_config's optimizer uses, is mutated.
    ("adamw_epsilon", "vit_flax/training/optim.py",
     "b2: float = 0.999, eps: float = 1e-7)",
     "b2: float = 0.999, eps: float = 1e-6)",
     ["tests/training/test_recipe.py::test_the_keras_recipe_trains_bit_for_bit_as_before_the_recipes"]),
    ("indivisible_batch_accepted", "vit_flax/infra/parallel.py",
     "        if size % mesh.size:",
     "        if False:",
     ["tests/infra/test_parallel.py::test_four_devices_train_like_one"]),
    ("process_reads_every_file", "vit_flax/data/stream.py",
     "mine = np.arange(len(images))[share::shares]",
     "mine = np.arange(len(images))",
     ["tests/data/test_stream.py::test_the_processes_shares_of_the_sums_add_up_to_the_whole"]),
]

def apply(name: str, path: str, old: str, new: str, tests: list[str], root: pathlib.Path) -> bool:
    """Whether the mutant's tests fail on a clone of HEAD with it applied."""
    copy = root / name
    subprocess.run(["git", "clone", "-q", str(REPO), str(copy)], check=True)
    file = copy / path
    text = file.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{name}: expected its text once in {path}, found it "
                         f"{text.count(old)} times: update the mutant to today's code")
    file.write_text(text.replace(old, new))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p",
                           "no:cacheprovider", *tests], cwd=copy, capture_output=True, text=True)
    summary = [line for line in done.stdout.splitlines()
               if " passed" in line or " failed" in line or " error" in line]
    killed = done.returncode != 0
    print(f"{name}: {'KILLED' if killed else 'SURVIVED'} by {' '.join(tests)} "
          f"({summary[-1] if summary else done.stdout[-300:]})", flush=True)
    shutil.rmtree(copy, ignore_errors=True)
    return killed


def main(names: list[str]) -> int:
    unknown = set(names) - {m[0] for m in MUTANTS}
    if unknown:
        raise SystemExit(f"no mutant named {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="vit_flax-mutants-") as root:
        results = [apply(*mutant, pathlib.Path(root)) for mutant in MUTANTS
                   if not names or mutant[0] in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
