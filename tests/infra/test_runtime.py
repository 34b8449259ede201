"""Process-wide settings: none at import; `run` applies them, and each can be declined."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from vit_flax.config import ConfigError
from vit_flax.infra import runtime

# Imports vit_flax, builds a model and compiles its train step, and reports whether the
# matplotlib backend and JAX's CPU lowering of threefry are what they were before.
UNTOUCHED = textwrap.dedent("""
    import json, sys
    import matplotlib
    matplotlib.use("svg")  # A notebook's or a user's choice, not Agg.
    from jax._src.interpreters import mlir
    from jax._src.random.threefry2x32 import threefry2x32_p
    rules = mlir._platform_specific_lowerings["cpu"]
    before = rules.get(threefry2x32_p)
    import vit_flax
    from vit_flax.training import optim
    from vit_flax.training import steps
    config = vit_flax.ViTConfig(**json.loads(sys.argv[1]))
    graphdef, params, statistics = steps.split_model(vit_flax.create_model(config))
    tx = optim.keras_adamw(1e-3, 1e-4)
    state = steps.TrainState.create(params, tx, config)
    step = steps.make_train_step(graphdef, tx, loss=steps.LossOptions.of(config))
    import jax.numpy as jnp
    images = jnp.zeros((8, 8, 8, 3), jnp.uint8)
    step.lower(state, statistics, steps.Totals.zero(), images, jnp.zeros(8, jnp.int32),
               jnp.arange(8)).compile()
    after_train_step = rules.get(threefry2x32_p)
    vit_flax.infra.runtime.unroll_threefry_on_cpu()  # What run() does, by choice.
    print(json.dumps({"backend": matplotlib.get_backend(),
                      "rule_unchanged": after_train_step is before,
                      "rule_replaced_by_run": rules.get(threefry2x32_p) is not before}))
""")


@pytest.mark.slow
def test_importing_and_building_change_nothing_process_wide():
    from conftest import TINY

    completed = subprocess.run([sys.executable, "-c", UNTOUCHED, json.dumps(TINY)],
                               capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report == {"backend": "svg", "rule_unchanged": True, "rule_replaced_by_run": True}


def test_unrolled_threefry_hash_keeps_its_known_answers():
    from jax.extend.random import threefry_2x32

    assert runtime.unroll_threefry_on_cpu()
    hash_pair = jax.jit(lambda key, count: threefry_2x32(key, count))
    # Threefry-2x32 (20 rounds) known-answer vectors of Random123, as in JAX's own tests.
    known = {(0, 0, 0, 0): (0x6B200159, 0x99BA4EFE),
             (2**32 - 1,) * 4: (0x1CB996FC, 0xBB002BE7),
             (0x13198A2E, 0x03707344, 0x243F6A88, 0x85A308D3): (0xC4923A9C, 0x483DF7A0)}
    for (*key, c0, c1), expected in known.items():
        key, count = np.uint32(key), np.uint32([c0, c1])
        assert tuple(int(x) for x in hash_pair(key, count)) == expected
        if jax.default_backend() == "cpu":  # The rounds are written out: no loop left.
            assert "while" not in hash_pair.lower(key, count).as_text()


ADDRESS = "localhost:12345"


@pytest.mark.parametrize("address, count, index, message", [
    (ADDRESS, 2, 5, "process_id=5 is not one of the num_processes=2 processes: give 0 to 1"),
    (ADDRESS, 2, -1, "process_id=-1 is not one of the num_processes=2 processes: give 0 to 1"),
    (ADDRESS, 0, 0, "num_processes=0: give how many processes, at least 1"),
    ("localhost", 2, 0, "coordinator_address=localhost: expected HOST:PORT, the address of "
                        "process 0 and a free port on it (like localhost:12345)"),
    ("localhost:http", 2, 0, "coordinator_address=localhost:http: expected HOST:PORT, the "
                             "address of process 0 and a free port on it (like "
                             "localhost:12345)"),
    (None, 2, None, "num_processes needs coordinator_address (HOST:PORT of process 0) to start "
                    "several processes; give coordinator_address too, or none of them to "
                    "train as one process"),
    (None, None, 1, "process_id needs coordinator_address (HOST:PORT of process 0) to start "
                    "several processes; give coordinator_address too, or none of them to "
                    "train as one process"),
    (ADDRESS, None, None, "coordinator_address needs num_processes and process_id too (how "
                          "many processes, and which one this is)"),
    (ADDRESS, 2, None, "coordinator_address needs num_processes and process_id too (how many "
                       "processes, and which one this is)"),
], ids=["id-too-big", "id-negative", "no-processes", "no-port", "named-port",
        "count-alone", "id-alone", "address-alone", "no-id"])
def test_a_wrong_multi_process_start_is_a_one_line_error_naming_the_options(
        address, count, index, message):
    # Checked before JAX is touched: nothing starts, and the process stays a single one.
    with pytest.raises(ConfigError) as refused:
        runtime.start_distributed(address, count, index)
    assert str(refused.value) == message
    assert runtime._watch is None


@pytest.mark.parametrize("seconds", [0, -5, 2.5, "20"])
def test_a_heartbeat_timeout_that_is_not_whole_positive_seconds_is_refused(seconds):
    with pytest.raises(ConfigError) as refused:
        runtime.start_distributed(ADDRESS, 2, 1, heartbeat_timeout=seconds)
    assert str(refused.value) == (f"heartbeat_timeout={seconds}: give whole seconds, at "
                                  f"least 1 (default 20)")
    assert runtime._watch is None
    # One default: run()'s (and so train.py's, tests/test_cli.py) is start_distributed's.
    from vit_flax.training.options import Processes

    assert Processes().heartbeat_timeout == runtime.HEARTBEAT_TIMEOUT_SECONDS == 20


def test_no_multi_process_option_starts_nothing():
    assert runtime.check_distributed_options(None, None, None) is False
    assert runtime.start_distributed(None, None, None) is False
    assert runtime.check_distributed_options(ADDRESS, 2, 1) is True


def test_the_first_differing_setting_is_named_by_its_innermost_key():
    # A group's configs are a list of dicts: the run's field is named, not the list.
    started = {"configs": [{"seed": 0, "learning_rate": 0.001}, {"seed": 1}], "workdir": "/w"}
    assert runtime._difference(started, started) is None
    other = {"configs": [{"seed": 0, "learning_rate": 0.001}, {"seed": 2}], "workdir": "/v"}
    assert runtime._difference(other, started) == ("seed", 2, 1)
    assert runtime._difference({"init_from": None}, {"init_from": "/a"}) == (
        "init_from", None, "/a")
    assert runtime._shown(None) == "none" and runtime._shown("/a") == "/a"


# Many threads find the same dead peer at once (as the watch thread and a thread waiting
# for a verdict can): the process must say so in one line and end. (A race: without the
# lock, print's two writes ran together in 4 of 5 runs of this test, and once in the
# suite's dead-peer test under load.)
DEATH_SEEN_AT_ONCE = textwrap.dedent("""
    import threading
    from vit_flax.infra import runtime
    watch = runtime._PeerWatch(2, heartbeat_timeout=7)
    watch.dead = lambda: [1]
    start = threading.Barrier(32)
    def find():
        start.wait()
        watch.exit_if_dead()
    threads = [threading.Thread(target=find) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
""")


def test_a_dead_peer_seen_by_several_threads_is_said_once():
    completed = subprocess.run([sys.executable, "-c", DEATH_SEEN_AT_ONCE], capture_output=True,
                               text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert completed.returncode == 1
    assert completed.stderr == (
        "error: process 1 of this 2-process run stopped (no heartbeat for 7 s), so this one "
        "stops too; start every process again to resume\n")



def test_the_verdict_names_the_dead_peers_or_this_process_when_it_went_unheard():
    watch = runtime._PeerWatch(3, heartbeat_timeout=7)
    assert watch.verdict([1, 2], 0) == (
        "error: process 1, 2 of this 3-process run stopped (no heartbeat for 7 s), so this "
        "one stops too; start every process again to resume")
    # Measured: a process SIGSTOPped past the timeout, then continued, finds itself among
    # the dead (and its peers, who judged it so and stopped).
    assert watch.verdict([0, 1, 2], 1) == (
        "error: process 1 (this one) of this 3-process run was not heard from for 7 s (no "
        "heartbeat: paused or starved?), so the run stopped; start every process again to "
        "resume")
