"""Process-wide settings of a training process. Nothing here runs at import: the entry
point that trains (`vit_flax.run`, and so train.py) applies them, and each can be declined.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from vit_flax.config import ConfigError


def unroll_threefry_on_cpu() -> bool:
    """Lower JAX's threefry2x32 hash with its rounds unrolled on CPU too, as JAX does on GPU.

    On CPU JAX lowers threefry as a 5-iteration loop (smaller programs), which XLA cannot
    fuse: every iteration copies the whole state of every draw. The seed's train step draws
    ~230M dropout bits; measured on a 2-core CPU, 170M Bernoulli draws take 2.2 s rolled and
    0.6 s unrolled. The random bits are the same (the same function, written out); the
    programs around them fuse differently, so a trained run's float32 results can differ in
    their last bits (measured, a tiny 3-epoch run: epoch losses 9e-8 relative apart). This
    replaces a JAX-internal lowering rule for the whole process (programs compiled afterwards
    use it): where this JAX version has none under the names known (jax 0.9 to 0.10 tested),
    nothing changes and False is returned.
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
# How long each process waits for all of them to connect before it ends with one line
# (JAX's default: 300 s, then a C++ abort).
INITIALIZATION_TIMEOUT_SECONDS = 60


def check_distributed_options(coordinator_address: str | None, num_processes: int | None,
                              process_id: int | None) -> bool:
    """Whether they ask for several processes (False: none of the three is given); a
    one-line ConfigError naming them when some are missing or out of range."""
    if coordinator_address is None and num_processes is None and process_id is None:
        return False
    if coordinator_address is None:
        given = "num_processes" if num_processes is not None else "process_id"
        raise ConfigError(f"{given} needs coordinator_address (HOST:PORT of process 0) to "
                          f"start several processes; give coordinator_address too, or none "
                          f"of them to train as one process")
    if num_processes is None or process_id is None:
        raise ConfigError("coordinator_address needs num_processes and process_id too (how "
                          "many processes, and which one this is)")
    if type(num_processes) is not int or num_processes < 1:
        raise ConfigError(f"num_processes={num_processes}: give how many processes, at least 1")
    if type(process_id) is not int or not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id={process_id} is not one of the num_processes="
                          f"{num_processes} processes: give 0 to {num_processes - 1}")
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"coordinator_address={coordinator_address}: expected HOST:PORT, "
                          f"the address of process 0 and a free port on it (like "
                          f"localhost:12345)")
    return True


def start_distributed(coordinator_address: str | None, num_processes: int | None,
                      process_id: int | None, *,
                      initialization_timeout: float = INITIALIZATION_TIMEOUT_SECONDS,
                      heartbeat_timeout: int = HEARTBEAT_TIMEOUT_SECONDS) -> bool:
    """JAX's distributed runtime, for training as one of several processes (or hosts);
    nothing (False) when none of the three is given (check_distributed_options).

    CPU devices of several processes need a cross-process collective implementation (gloo),
    chosen before the backend starts. JAX's coordination client ends every process with a
    fatal log (a C++ abort and its stack) when one of them dies; with recoverable tasks the
    survivors get errors instead, and a watch thread ends each with one line on stderr
    within `heartbeat_timeout` seconds (+1 s) of the death. Process 0's death too: the
    coordination service it serves runs in a process of its own (SERVICE), which outlives
    it. A process whose peers do not all connect within `initialization_timeout` seconds
    ends with one line (exit status 1).
    """
    if not check_distributed_options(coordinator_address, num_processes, process_id):
        return False
    if type(heartbeat_timeout) is not int or heartbeat_timeout < 1:
        raise ConfigError(f"heartbeat_timeout={heartbeat_timeout}: give whole seconds, at "
                          f"least 1 (default {HEARTBEAT_TIMEOUT_SECONDS})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    recoverable = True
    try:
        jax.config.update("jax_enable_recoverability", True)
    except AttributeError:  # A JAX without the option: fatal logs.
        recoverable = False
    # JAX's own timeout aborts the process (a C++ fatal log): this one comes first.
    alarm = threading.Timer(initialization_timeout, _not_started,
                            (coordinator_address, num_processes, process_id,
                             initialization_timeout))
    alarm.daemon = True
    alarm.start()
    try:
        service = _Service.start(coordinator_address, num_processes, recoverable,
                                 heartbeat_timeout) \
            if process_id == 0 else None
        with _served_by(service):
            jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                       initialization_timeout=int(initialization_timeout) + 60,
                                       heartbeat_timeout_seconds=heartbeat_timeout)
    finally:
        alarm.cancel()
    if service is not None:
        service.tell("started")
    _start_watch(heartbeat_timeout)
    return True


def _start_watch(heartbeat_timeout: int) -> None:
    """The peer watch (_PeerWatch) of this process, in a thread of its own."""
    global _watch
    _watch = _PeerWatch(jax.process_count(), heartbeat_timeout)
    # Registered after JAX's own exit handler, so run before it: once this process ends
    # (its script done, without distributed_run), the peers that end first, or its own
    # disconnection in JAX's shutdown, are no verdict (they were: exit status 1).
    atexit.register(_watch.exiting.set)
    threading.Thread(target=_watch.run, name="vit_flax-peers", daemon=True).start()


# JAX's coordination service, which process 0 runs for all, in a process of its own: run
# inside process 0 (JAX's way), its end with process 0 aborts every other process at once
# (a C++ fatal log, which no watch can precede). Apart, it outlives a killed process 0 long
# enough for the others to learn of the death from its missing heartbeats (and end with
# the watch's one line), then ends: at once when process 0 ends a run in order (or died
# before every process had connected), else after the heartbeat timeout + 30 s.
SERVICE = """
import os, sys, time
from jaxlib import _jax
count, heartbeat, recoverable = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
address = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", "[::]:" + sys.argv[1])
try:
    service = _jax.get_distributed_runtime_service(
        address, count, heartbeat_timeout=heartbeat, recoverable=recoverable)
except Exception as error:
    print((str(error).splitlines() or [type(error).__name__])[0], flush=True)
    sys.exit(1)
print("ready", flush=True)
started = False
for line in sys.stdin:  # Until process 0 says stop, or is gone (end of file).
    started = started or line.strip() == "started"
    if line.strip() == "stop":
        break
else:
    if started:
        time.sleep(heartbeat + 30)
service.shutdown()
"""


class _Service:
    """The coordination service's process (SERVICE), as JAX's in-process one is used:
    JAX's shutdown stops it (once the run ended in order; else it outlives this process)."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    @classmethod
    def start(cls, address: str, count: int, recoverable: bool,
              heartbeat_timeout: int = HEARTBEAT_TIMEOUT_SECONDS) -> _Service | None:
        """The service's process, ready (None where JAX cannot be given it: then JAX starts
        its own); a one-line ConfigError when it cannot serve."""
        from jax._src import distributed

        if not hasattr(distributed._jax, "get_distributed_runtime_service"):
            return None
        process = subprocess.Popen(
            [sys.executable, "-c", SERVICE, address.rpartition(":")[2], str(count),
             str(heartbeat_timeout), str(int(recoverable))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True)  # Not stopped with this process's group.
        answer = process.stdout.readline().strip()
        process.stdout.close()
        if answer != "ready":
            process.wait()
            raise ConfigError(f"coordinator_address={address}: process 0 cannot serve there "
                              f"({answer or 'its service did not start'}); give a free port")
        return cls(process)

    def tell(self, line: str) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()

    def shutdown(self) -> None:
        """Called by JAX's shutdown. After a run that ended in order (every process left,
        _PeerWatch.leave), at once; else the others may still need it: left running."""
        if _watch is not None and _watch.stopped.is_set():
            self.tell("stop")
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        if _watch is not None and _watch.stopped.is_set():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)


@contextlib.contextmanager
def _served_by(service: _Service | None):
    """Within the block, JAX's initialize takes `service` for the one it would start."""
    from jax._src import distributed

    if service is None:
        yield
        return
    start = distributed._jax.get_distributed_runtime_service
    distributed._jax.get_distributed_runtime_service = lambda *args, **kwargs: service
    try:
        yield
    finally:
        distributed._jax.get_distributed_runtime_service = start


def _not_started(address: str, count: int, index: int, seconds: float) -> None:
    # os._exit: the main thread is inside JAX's connect, which nothing else interrupts.
    print(f"error: process {index} of {count} waited {seconds:g} s for the others to connect "
          f"to {address}, and not all of them did; start all {count} processes with the same "
          f"coordinator address and number of processes", file=sys.stderr, flush=True)
    os._exit(1)


def check_started_alike(settings: dict, timeout: float = INITIALIZATION_TIMEOUT_SECONDS) -> None:
    """In a run of several processes, a ConfigError in every process when they were not
    started with the same `settings` (JSON-able: dicts and lists of them compared item by
    item), naming the first process and setting (its innermost key) that differ from
    process 0's. Nothing in one process. Each process publishes its settings in JAX's
    coordination service (key-value store) and reads every other's, waiting at most
    `timeout` seconds for each."""
    if _watch is None or jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    key = f"vit_flax/settings/{_watch.settings_round}/"
    _watch.settings_round += 1
    client.key_value_set(key + str(jax.process_index()),
                         json.dumps(settings, sort_keys=True, default=str))
    first = None
    for index in range(jax.process_count()):
        try:
            theirs = json.loads(client.blocking_key_value_get(key + str(index),
                                                              int(timeout * 1000)))
        except jax.errors.JaxRuntimeError:
            _watch.wait_for_verdict()  # A dead peer: ends the process with the watch's line.
            raise ConfigError(f"process {index} did not publish its settings within "
                              f"{timeout:g} s; start every process with the same flags") from None
        first = theirs if first is None else first
        difference = _difference(theirs, first)
        if difference:  # Every process sees it: they leave together, then each says it.
            _watch.leave()
            name, value, expected = difference
            raise ConfigError(f"process {index} was started with other settings than process "
                              f"0: {name}={_shown(value)} vs {_shown(expected)}; start every "
                              f"process with the same flags")


def _difference(value, expected, name: str = "settings"):
    """(innermost key, value, expected) of the first difference (keys sorted), or None."""
    if isinstance(value, dict) and isinstance(expected, dict):
        for key in sorted(value.keys() | expected.keys()):
            found = _difference(value.get(key), expected.get(key), key)
            if found:
                return found
        return None
    if isinstance(value, list) and isinstance(expected, list) and len(value) == len(expected):
        return next(filter(None, map(_difference, value, expected, [name] * len(value))), None)
    return None if value == expected else (name, value, expected)


def _shown(value) -> str:
    """A setting as a flag's value: a string bare, None (not given) as "none"."""
    return value if isinstance(value, str) else "none" if value is None else json.dumps(value)


class _PeerWatch:
    """Asks JAX's coordination service every second which processes it still hears from."""

    def __init__(self, count: int, heartbeat_timeout: int = HEARTBEAT_TIMEOUT_SECONDS):
        self.count, self.stopped = count, threading.Event()  # Set when the run ended in order.
        self.exiting = threading.Event()  # Set when this process's interpreter exits.
        self.heartbeat_timeout = heartbeat_timeout
        self.ending = threading.Lock()  # Held by the thread that says a peer died, and exits.
        self.settings_round = 0  # check_started_alike's calls so far: each its own keys.

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
        # The watch thread and a thread waiting for a verdict (wait_for_verdict) may both
        # find the death at once: one of them says it, in one write, and ends the process
        # (seen without the lock: the two lines run together into one).
        dead = self.dead()
        if dead and not (self.stopped.is_set() or self.exiting.is_set()):
            with self.ending:
                sys.stderr.write(self.verdict(dead, jax.process_index()) + "\n")
                sys.stderr.flush()
                os._exit(1)

    def verdict(self, dead: list[int], me: int) -> str:
        """The line that ends this process (`me`) when the service no longer hears from
        `dead`. It includes `me` where this process was not heard from (paused or starved
        past the timeout): then the others judged it dead and stopped."""
        if me in dead:
            return (f"error: process {me} (this one) of this {self.count}-process run was not "
                    f"heard from for {self.heartbeat_timeout} s (no heartbeat: paused or "
                    f"starved?), so the run stopped; start every process again to resume")
        return (f"error: process {', '.join(map(str, dead))} of this {self.count}-process run "
                f"stopped (no heartbeat for {self.heartbeat_timeout} s), so this one stops "
                f"too; start every process again to resume")

    def wait_for_verdict(self) -> None:
        """Up to the heartbeat timeout (+5 s): ends the process if a peer is found dead."""
        deadline = time.monotonic() + self.heartbeat_timeout + 5
        while time.monotonic() < deadline:
            self.exit_if_dead()
            time.sleep(1)

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
        _watch.wait_for_verdict()
        raise
    _watch.leave()


@contextlib.contextmanager
def quiet_logger(name: str, level: int):
    """Within the block, the logger `name` drops records below `level` (its level after)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


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
