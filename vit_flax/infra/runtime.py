"""Process-wide settings of a training process. Nothing here runs at import: the entry
point that trains (`vit_flax.run`, and so train.py) applies them, and each can be declined.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils


def unroll_threefry_on_cpu() -> bool:
    """Lower JAX's threefry2x32 hash with its rounds unrolled on CPU too, as JAX does on GPU.

    On CPU JAX lowers threefry as a 5-iteration loop (smaller programs), which XLA cannot
    fuse: every iteration copies the whole state of every draw. The seed's train step draws
    ~230M dropout bits; measured on a 2-core CPU, 170M Bernoulli draws take 2.2 s rolled and
    0.6 s unrolled. The bits are the same (the same function, written out), so results do not
    change. This replaces a JAX-internal lowering rule for the whole process (programs
    compiled afterwards use it): where this JAX version has none under the names known
    (jax 0.9 to 0.10 tested), nothing changes and False is returned.
    """
    try:
        from jax._src.interpreters import mlir
    except ImportError:
        return False
    for name in ("jax._src.random.threefry2x32", "jax._src.prng"):  # JAX >= 0.10, older.
        try:
            module = importlib.import_module(name)
            rule, primitive = module._threefry2x32_lowering_rule, module.threefry2x32_p
        except (ImportError, AttributeError):
            continue
        mlir.register_lowering(primitive, rule, platform="cpu", inline=False)
        return True
    return False


# How long JAX's coordination service waits for a silent process (killed, or its host gone)
# before the others are told it is dead (JAX's default: 100 s).
HEARTBEAT_TIMEOUT_SECONDS = 20


def start_distributed(coordinator_address: str, num_processes: int | None,
                      process_id: int | None) -> None:
    """JAX's distributed runtime, for training as one of several processes (or hosts).

    CPU devices of several processes need a cross-process collective implementation (gloo),
    chosen before the backend starts. JAX's coordination client ends every process with a
    fatal log (a C++ abort and its stack) when one of them dies; with recoverable tasks the
    survivors get errors instead, and a watch thread ends each with one line on stderr
    within HEARTBEAT_TIMEOUT_SECONDS (+1 s) of the death.
    """
    global _watch
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    with contextlib.suppress(AttributeError):  # A JAX without the option: fatal logs.
        jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS)
    _watch = _PeerWatch(jax.process_count())
    threading.Thread(target=_watch.run, name="vit_flax-peers", daemon=True).start()


class _PeerWatch:
    """Asks JAX's coordination service every second which processes it still hears from."""

    def __init__(self, count: int):
        self.count, self.stopped = count, threading.Event()

    def dead(self) -> list[int]:
        """Those it no longer hears from (none where this JAX cannot tell, or while the
        service cannot be reached)."""
        from jax._src import distributed

        try:
            live = distributed.global_state.client.get_live_nodes(list(range(self.count)))
        except (AttributeError, jax.errors.JaxRuntimeError):
            return []
        return sorted(set(range(self.count)) - set(live))

    def exit_if_dead(self) -> None:
        # os._exit: the run cannot go on without them, and a normal exit would wait on them
        # (checkpoint barriers, collectives); the last finished epoch's checkpoint is kept.
        dead = self.dead()
        if dead and not self.stopped.is_set():
            print(f"error: process {', '.join(map(str, dead))} of this {self.count}-process "
                  f"run stopped (no heartbeat for {HEARTBEAT_TIMEOUT_SECONDS} s), so this one "
                  f"stops too; start every process again to resume", file=sys.stderr,
                  flush=True)
            os._exit(1)

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            self.exit_if_dead()

    def leave(self, timeout: float = 60.0) -> None:
        """End the run in order: with recoverable tasks JAX's shutdown no longer waits for
        every process, and one that disconnects after process 0 (whose coordination
        service it needs) is gone is aborted. So the others disconnect first and process 0
        waits for them."""
        multihost_utils.sync_global_devices("vit_flax: run finished")
        self.stopped.set()
        if jax.process_index():
            jax.distributed.shutdown()
            return
        deadline = time.monotonic() + timeout
        while len(self.dead()) < self.count - 1 and time.monotonic() < deadline:
            time.sleep(0.2)


_watch: _PeerWatch | None = None  # Set by start_distributed.


@contextlib.contextmanager
def distributed_run():
    """Around the work of a run that may be one of several processes (no-op otherwise).

    A JAX runtime error in such a run is most often a peer's death seen from here (a
    collective whose other end is gone), seconds before the heartbeat verdict: wait for the
    verdict, so that the process ends with the watch's one line rather than a traceback;
    other errors propagate. On success, the processes leave in order (_PeerWatch.leave).
    """
    if _watch is None:
        yield
        return
    try:
        yield
    except (jax.errors.JaxRuntimeError, TimeoutError):
        deadline = time.monotonic() + HEARTBEAT_TIMEOUT_SECONDS + 5
        while time.monotonic() < deadline:
            _watch.exit_if_dead()
            time.sleep(1)
        raise
    _watch.leave()


DEFAULT = "default"  # run(compilation_cache=DEFAULT): default_compilation_cache().


def default_compilation_cache() -> Path:
    """$VIT_FLAX_CACHE, else $XDG_CACHE_HOME/vit_flax/jax, else ~/.cache/vit_flax/jax."""
    if os.environ.get("VIT_FLAX_CACHE"):
        return Path(os.environ["VIT_FLAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "vit_flax" / "jax"


def use_compilation_cache(directory: str | os.PathLike) -> None:
    """JAX's persistent compilation cache in `directory`, for every program this process
    compiles from now on: a second run of the same configuration loads its train step
    instead of compiling it again.

    Every program is kept, however fast it compiled: JAX's default keeps only those that
    took 1 s or more, which the small model's train step does on a loaded 2-core machine
    and not on an idle one, so whether a rerun compiles again would depend on the load.
    """
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
