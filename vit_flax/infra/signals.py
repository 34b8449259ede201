"""Stopping on request: SIGTERM / SIGINT end a run at a safe point instead of mid-write."""

from __future__ import annotations

import signal


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: the run stopped at an epoch boundary, saved."""


class StopSignals:
    """Within the block, SIGTERM/SIGINT only set `requested`; the loop stops at a safe
    point. The previous handlers come back afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None
        self.previous = {}

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # Not the main thread: signals cannot be caught here.
            self.previous.clear()
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
