"""Several processes on one host: train.py as 2 processes x 2 CPU devices, streaming its
data, trains as 1 process x 4 devices does, each process reading only its share of the
files; only process 0 writes files; and a peer's death ends the others with one line
instead of a hang (that run keeps its data in memory: the in-memory path across processes)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_FLAGS, write_image_folder, xla_flags
from test_parallel import assert_same_weights

import vit_flax
from vit_flax.infra import runtime

# Every test here starts processes: left out of the quick tier (pytest -m "not slow").
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# The heartbeat timeout of the tests where a process dies: a death is seen within it, so
# the tests need not wait the default's 20 s (runtime.HEARTBEAT_TIMEOUT_SECONDS).
HEARTBEAT = 5
# Runs train.py (argv[3:]) and prints, last, the files it wrote under the workdir (argv[1])
# from Python (opened for writing, or renamed into place: JSON, figures, TensorBoard events,
# orbax's metadata; orbax's array data is written by TensorStore, not seen here), and each
# time it opened a file under the data folder (argv[2]) for reading.
FILES_LOGGED = """
import json, os, runpy, sys
workdir, data = (os.path.realpath(path) + os.sep for path in sys.argv[1:3])
sys.argv = sys.argv[3:]
written, read = set(), []
def relative(path, root):
    path = os.path.realpath(os.fsdecode(path))
    return os.path.relpath(path, root) if path.startswith(root) else None
def hook(event, args):
    if event == "os.rename" and relative(args[1], workdir):
        written.add(relative(args[1], workdir))
    elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1] or "", args[2] or 0
        if set(mode) & set("wax+") or flags & (os.O_WRONLY | os.O_RDWR):
            if relative(args[0], workdir):
                written.add(relative(args[0], workdir))
        elif relative(args[0], data):
            read.append(relative(args[0], data))
sys.addaudithook(hook)
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("FILES " + json.dumps({"written": sorted(written), "read": read}), flush=True)
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """One image folder for the module's runs (their compilation cache is the session's,
    $VIT_FLAX_CACHE from conftest: the kill test loads the parity test's programs)."""
    root = tmp_path_factory.mktemp("multiprocess")
    return {"images": write_image_folder(root / "images", train_per_class=20,
                                         test_per_class=4)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def start(shared: dict, workdir: Path, devices: int, *extra: str, distributed=None):
    """train.py on the tiny model as one process with `devices` CPU devices;
    distributed=(port, process_id) makes it one of two."""
    flags = [*TINY_FLAGS, "--dataset", "folder", "--data-dir", str(shared["images"]),
             "--workdir", str(workdir), *extra]
    if distributed is not None:
        port, process_id = distributed
        flags += ["--coordinator-address", f"localhost:{port}", "--num-processes", "2",
                  "--process-id", str(process_id)]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(devices))
    return subprocess.Popen([sys.executable, "-c", FILES_LOGGED, str(workdir),
                             str(shared["images"]), str(REPO / "train.py"), *flags], cwd=REPO,
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 900) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


def files(stdout: str) -> dict:
    """FILES_LOGGED's report: "written" and "read"."""
    return json.loads(stdout.strip().splitlines()[-1].removeprefix("FILES "))


def run_files(stdout: str) -> list[str]:
    """What the process wrote besides its part of the orbax checkpoints (which every
    process writes)."""
    return [name for name in files(stdout)["written"]
            if not name.startswith(("run_state", "best_checkpoint"))]


def test_two_streaming_processes_train_as_one_process_each_reading_its_share(shared,
                                                                             tmp_path):
    port = free_port()
    pair = [start(shared, tmp_path / "pair", 2, "--epochs", "2", "--data-in", "stream",
                  distributed=(port, i)) for i in (0, 1)]
    single = start(shared, tmp_path / "single", 4, "--epochs", "2", "--data-in", "stream")
    (out0, _), (out1, _), (single_out, _) = (finish(p) for p in (*pair, single))
    assert "Epoch 2/2" in out0 and "Epoch" not in out1 and "Epoch 2/2" in single_out
    assert "data streamed" in out0 and "data streamed" in single_out
    assert service_processes(port) == []  # Process 0's coordination service ended with it.
    # Process 0 writes the run's files, process 1 none of them.
    assert {".vit_flax-run.json", "config.json", "history.json", "results.json", "loss.png",
            "patches.png"} <= set(run_files(out0))
    assert run_files(out1) == []
    # Each process decodes only its share (of the statistics pass, and its devices' rows of
    # every training, validation and test step): together they open each file exactly as
    # often as the one process does, so neither opened the other's. Process 1 opens a bit
    # less than half: process 0 also draws the figures (5 images), and the last, partial
    # batch of each split is filled from the first devices (process 0's).
    reads = [collections.Counter(files(out)["read"]) for out in (out0, out1, single_out)]
    assert reads[0] + reads[1] == reads[2]
    assert 0.4 < reads[1].total() / reads[2].total() < 0.5  # Measured 90 / 197.
    pair_history, single_history = (
        json.loads((tmp_path / name / "history.json").read_text()) for name in ("pair", "single"))
    # The same program over the same 4 devices; only the all-reduce across the two processes
    # (gloo) adds in another order: measured 1.2e-7 relative (one float32 ulp) at most.
    for a, b in zip(pair_history, single_history, strict=True):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    results = [json.loads((tmp_path / name / "results.json").read_text())
               for name in ("pair", "single")]
    assert [r["devices"] for r in results] == [4, 4]
    assert results[0]["test_loss"] == pytest.approx(results[1]["test_loss"], rel=1e-6)
    assert_same_weights(*(vit_flax.load(tmp_path / name)[0] for name in ("pair", "single")))


def test_a_dead_peer_ends_the_other_process_with_one_line(shared, tmp_path):
    port = free_port()
    # --heartbeat-timeout 5 (default 20): train.py passes it on; the death is seen as soon.
    pair = [start(shared, tmp_path / "run", 2, "--epochs", "1000", "--heartbeat-timeout",
                  str(HEARTBEAT), distributed=(port, i)) for i in (0, 1)]
    first = pair[0].stdout.readline()
    while first and not first.startswith("Epoch 1/"):
        first = pair[0].stdout.readline()
    if not first:  # Both sides: which of them stopped first, and why.
        pair[1].kill()
        raise AssertionError(f"process 0: {pair[0].stderr.read()[-3000:]}\n"
                             f"process 1: {pair[1].communicate()[1][-3000:]}")
    pair[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = pair[0].communicate(timeout=HEARTBEAT + 60)
    pair[1].wait()
    assert pair[0].returncode == 1
    assert time.monotonic() - killed < HEARTBEAT + 30
    assert stderr.strip().splitlines()[-1] == (
        f"error: process 1 of this 2-process run stopped (no heartbeat for "
        f"{HEARTBEAT} s), so this one stops too; start every process "
        f"again to resume")
    assert "Traceback" not in stderr and "Check failure" not in stderr


# Trains the tiny model for one epoch through vit_flax.run (as train.py does), with the
# default compilation cache ($VIT_FLAX_CACHE), and prints JAX's cache events of the run.
CACHED_RUN = """
import collections, json, sys
import jax.monitoring
import vit_flax
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **_: events.update([event]))
config = vit_flax.ViTConfig(**json.loads(sys.argv[1]))
results = vit_flax.run(config, dataset="folder", data_dir=sys.argv[2], workdir=sys.argv[3],
                       unroll_threefry=False)  # As TINY_FLAGS.
print(json.dumps({"hits": events["/jax/compilation_cache/cache_hits"],
                  "misses": events["/jax/compilation_cache/cache_misses"],
                  "compile_seconds": results["compile_seconds"]}))
"""


def test_a_second_process_loads_its_programs_from_the_compilation_cache(shared, tmp_path):
    from conftest import TINY

    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu", VIT_FLAX_CACHE=str(cache))
    reports, entries = [], []
    for run in ("first", "second"):
        completed = subprocess.run(
            [sys.executable, "-c", CACHED_RUN, json.dumps(dict(TINY, epochs=1)),
             str(shared["images"]), str(tmp_path / run)],
            env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-3000:]
        reports.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        entries.append(sorted(path.name for path in cache.iterdir()))
    first, second = reports
    assert any(name.startswith("jit_train_step-") for name in entries[0])
    assert any(name.startswith("jit_eval_step-") for name in entries[0])
    # Every program the first run compiled is cached (whatever it took to compile); the
    # second compiles none of them again and adds nothing.
    assert first["hits"] == 0 and first["misses"] == len(entries[0])
    assert second["misses"] == 0 and second["hits"] == first["misses"]
    assert entries[1] == entries[0]


# --- Starting: each failure is one line within a bounded time, in every process.

# Starts JAX's distributed runtime as process argv[2] of 2 (coordinator argv[1]), then
# checks the settings twice: alike, then with process 1's seed changed.
STARTED_ALIKE = """
import sys
from vit_flax.config import ConfigError
from vit_flax.infra import runtime
index = int(sys.argv[2])
runtime.start_distributed(sys.argv[1], 2, index)
same = {"config": {"seed": 0, "epochs": 2}, "workdir": "/w", "train_examples": None}
runtime.check_started_alike(same)
print("alike", flush=True)
try:
    runtime.check_started_alike({**same, "config": {"seed": index, "epochs": 2}})
except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
"""


def python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def service_processes(port: int) -> list[int]:
    """The pids of runtime.SERVICE processes serving on `port`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            arguments = cmdline.read_bytes().split(b"\0")
            if runtime.SERVICE.encode() in arguments and str(port).encode() in arguments:
                found.append(int(cmdline.parent.name))
    return found


def test_processes_started_with_other_settings_each_end_with_one_line():
    port = free_port()
    pair = [python(STARTED_ALIKE, f"localhost:{port}", str(index)) for index in (0, 1)]
    for process in pair:
        stdout, stderr = process.communicate(timeout=300)
        # The first check passed in both (gloo may log to stdout afterwards).
        assert (process.returncode, stdout.splitlines()[0]) == (2, "alike"), stderr[-3000:]
        assert stderr.strip().splitlines()[-1] == (
            "error: process 1 was started with other settings than process 0: seed=1 vs 0; "
            "start every process with the same flags")
        assert "Traceback" not in stderr and "Check failure" not in stderr
    # They left in order: process 0's coordination service stopped with it.
    assert service_processes(port) == []


# Process argv[2] of 2, with a heartbeat timeout of HEARTBEAT s; once both are up, process
# 0 is killed (SIGKILL, by itself).
COORDINATOR_KILLED = f"""
import os, sys, time
from vit_flax.infra import runtime
index = int(sys.argv[2])
runtime.start_distributed(sys.argv[1], 2, index, heartbeat_timeout={HEARTBEAT})
print("up", flush=True)
if index == 0:
    time.sleep(2)
    os.kill(os.getpid(), 9)
time.sleep(600)
"""


def test_losing_process_0_ends_the_others_with_one_line():
    port = free_port()
    pair = [python(COORDINATOR_KILLED, f"localhost:{port}", str(index)) for index in (0, 1)]
    _, stderr = pair[1].communicate(timeout=300)
    pair[0].wait(timeout=60)
    assert (pair[0].returncode, pair[1].returncode) == (-signal.SIGKILL, 1), stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: process 0 of this 2-process run stopped (no heartbeat for {HEARTBEAT} s), "
        f"so this one stops too; start every process "
        f"again to resume")
    assert "Traceback" not in stderr and "Check failure" not in stderr
    # Its coordination service outlived it for them (it ends by itself 30 s after their
    # verdict; not waited for here).
    for pid in service_processes(port):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# Process argv[2] of 2 ends its script without distributed_run (as a user's own script
# may); process 0 then spends 3 s in an exit handler that runs before JAX's shutdown (as
# JAX's own shutdown may take, on a loaded machine), by which time process 1 has gone.
ENDED_WITHOUT_LEAVING = """
import atexit, sys, time
import jax
from jax.experimental import multihost_utils
from vit_flax.infra import runtime
index = int(sys.argv[2])
if index == 0:
    atexit.register(time.sleep, 3)  # Before start_distributed: runs after its handler.
runtime.start_distributed(sys.argv[1], 2, index)
multihost_utils.sync_global_devices("both up")
print("done", flush=True)
"""


def test_a_process_whose_peer_ends_first_at_exit_ends_cleanly():
    port = free_port()
    pair = [python(ENDED_WITHOUT_LEAVING, f"localhost:{port}", str(index)) for index in (0, 1)]
    for process in pair:
        stdout, stderr = process.communicate(timeout=120)
        # (gloo may log to stdout before it.)
        assert (process.returncode, "done" in stdout.splitlines()) == (0, True), stderr[-3000:]
        assert "stopped (no heartbeat" not in stderr


# Process 0 of 2 on argv[1], a port in use (a one-line error), then on argv[2], alone.
ALONE = """
import sys
from vit_flax.config import ConfigError
from vit_flax.infra import runtime
try:
    runtime.start_distributed(sys.argv[1], 2, 0)
except ConfigError as error:
    print(f"error: {error}", flush=True)
runtime.start_distributed(sys.argv[2], 2, 0, initialization_timeout=3)
"""


def test_process_0_on_a_busy_port_or_alone_ends_with_one_line():
    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::", 0))
        busy.listen()
        taken, address = f"localhost:{busy.getsockname()[1]}", f"localhost:{free_port()}"
        alone = python(ALONE, taken, address)
        stdout, stderr = alone.communicate(timeout=120)  # Not JAX's 300 s, then an abort.
    assert alone.returncode == 1, stderr[-3000:]
    # Why it cannot serve is the coordination service's own word, which varies (measured:
    # "UNKNOWN: Failed to start RPC server", or no answer before it exited).
    first = stdout.splitlines()[0]
    assert first.startswith(f"error: coordinator_address={taken}: process 0 cannot serve "
                            f"there (") and first.endswith("); give a free port"), first
    assert stderr.strip().splitlines()[-1] == (
        f"error: process 0 of 2 waited 3 s for the others to connect to {address}, and not "
        f"all of them did; start all 2 processes with the same coordinator address and "
        f"number of processes")
    assert "Traceback" not in stderr and "Check failure" not in stderr
