"""Stopping on request: SIGTERM / SIGINT end a run at a safe point instead of mid-write.

While the run starts (data, model, compiling) and after its epochs (the test set, figures),
StartupSignals turns them into Interrupted, which the caller reports in one line; during the
epochs the loop's StopSignals only records them, and the loop stops at an epoch boundary.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: the run stopped at a safe point; the message says where."""


class _Handlers:
    """Installs `_handle` for SIGNALS within the block, the previous handlers afterwards;
    nothing where signals cannot be caught (not the main thread)."""

    def __init__(self):
        self.previous = {}

    def __enter__(self):
        try:
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # Not the main thread: signals cannot be caught here.
            self.previous.clear()
        return self

    def _handle(self, signum, frame):
        raise NotImplementedError

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class StartupSignals(_Handlers):
    """Within the block, SIGTERM/SIGINT raise Interrupted where the program is, saying
    whether training had started (a StopSignals entered within the block): for the start
    and the end of a run, where stopping anywhere loses nothing that a rerun does not
    redo (a run's files are written whole or not at all)."""

    def __init__(self):
        super().__init__()
        self.trained = False  # Set by the StopSignals of the epochs.

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.trained:
            raise Interrupted(f"{name}: stopped after training, before its results were "
                              f"written; the trained epochs are saved: run the same command "
                              f"to finish")
        raise Interrupted(f"{name}: stopped before training started; run the same command "
                          f"to start again")


class StopSignals(_Handlers):
    """Within the block, SIGTERM/SIGINT only set `requested`; the loop stops at a safe
    point. The previous handlers come back afterwards."""

    SIGNALS = SIGNALS

    def __init__(self):
        super().__init__()
        self.requested = None

    def __enter__(self):
        super().__enter__()
        for handler in self.previous.values():  # Training starts: tell the start's handler.
            if isinstance(getattr(handler, "__self__", None), StartupSignals):
                handler.__self__.trained = True
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
