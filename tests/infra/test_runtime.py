"""Process-wide settings: none at import; `run` applies them, and each can be declined."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

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
    step = steps.make_train_step(graphdef, tx)
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
