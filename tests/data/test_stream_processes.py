"""StreamFeed in 2 real processes x 2 CPU devices (jax.distributed, gloo): every step's batch,
gathered in jit, holds exactly the examples of its order, and each process opens only the
files of its own devices' columns."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder, xla_flags

from vit_flax.data import sources, stream

pytestmark = pytest.mark.slow  # Starts processes.

REPO = Path(__file__).resolve().parents[2]
# argv: port, process id, image folder. Prints one JSON line: the steps whose gathered
# per-example pixel sums matched the in-memory ones, and the files this process opened.
PROCESS = """
import json, sys
import numpy as np, jax, jax.numpy as jnp
from vit_flax.infra import parallel, runtime
runtime.start_distributed(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
from vit_flax.data import sources, stream
from vit_flax.training import feeds, steps

memory = sources.load_folder(sys.argv[3], 8).train
opened, read = [], sources.read_image
sources.read_image = lambda path, size: (opened.append(path), read(path, size))[1]
mesh = parallel.data_mesh()
feed = feeds.StreamFeed(stream.open_folder(sys.argv[3], 8).train, mesh, workers=0)

@jax.jit
def sums(batch):
    examples = steps.gather(batch, mesh)
    per = examples.images.astype(jnp.int32).sum((-3, -2, -1)) * (examples.mask > 0)
    return jax.lax.with_sharding_constraint(per, parallel.replicated(mesh))

matched = []
for order in (sources.epoch_order(21, 0, 1), np.stack([sources.epoch_order(21, 1, 1),
                                                       sources.epoch_order(21, 2, 1)])):
    rows = stream.step_rows(order, 8)
    for step, batch in enumerate(feed.batches(order, 8)):
        row = rows[step] if order.ndim == 2 else rows[step, 0]
        want = memory.images[np.maximum(row, 0)].astype(np.int64).sum((-3, -2, -1)) * (row >= 0)
        matched.append(bool(np.array_equal(np.asarray(sums(batch)), want)))
print("RESULT " + json.dumps({"matched": matched, "opened": opened}), flush=True)
"""


def test_two_processes_each_decode_only_their_share(tmp_path):
    folder = write_image_folder(tmp_path / "images", train_per_class=7, size=12, suffix=".jpg")
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(2))
    processes = [subprocess.Popen([sys.executable, "-c", PROCESS, str(port), str(pid),
                                   str(folder)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in processes]
    results = []
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        line = next(line for line in output.splitlines() if line.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
    for result in results:  # 3 steps of one run, then 3 of a group of two runs.
        assert result["matched"] == [True] * 6
    # Each process opened the files of its columns (0-3 or 4-7) of every step, once each.
    images = stream.open_folder(folder, 8).train.images
    solo = stream.step_rows(sources.epoch_order(21, 0, 1), 8)
    group = stream.step_rows(np.stack([sources.epoch_order(21, s, 1) for s in (1, 2)]), 8)
    for pid, result in enumerate(results):
        columns = slice(0, 4) if pid == 0 else slice(4, 8)
        keys = [k for rows in (solo, group) for k in rows[:, :, columns].reshape(-1) if k >= 0]
        assert sorted(result["opened"]) == sorted(images.path(k) for k in keys)
    first_epoch = [set(r["opened"][:n]) for r, n in zip(results, (12, 9), strict=True)]
    assert not first_epoch[0] & first_epoch[1] and len(first_epoch[0] | first_epoch[1]) == 21
