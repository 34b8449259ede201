"""SIGTERM / SIGINT outside the epochs (while a run starts, or after its epochs): one line
saying where it stopped, through Interrupted, instead of an exit without a word."""

from __future__ import annotations

import os
import signal

import pytest

from vit_flax.infra.signals import Interrupted, StartupSignals, StopSignals

BEFORE = "stopped before training started; run the same command to start again"
AFTER = ("stopped after training, before its results were written; the trained epochs are "
         "saved: run the same command to finish")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_a_run_starts_or_ends_is_interrupted_saying_where(sig):
    name = signal.Signals(sig).name
    before = signal.getsignal(sig)
    with StartupSignals():
        with pytest.raises(Interrupted) as stopped:
            os.kill(os.getpid(), sig)
        assert str(stopped.value) == f"{name}: {BEFORE}"
        with StopSignals() as stop:  # The epochs: recorded, for the loop to stop at.
            os.kill(os.getpid(), sig)
        assert stop.requested == name
        with pytest.raises(Interrupted) as stopped:
            os.kill(os.getpid(), sig)
        assert str(stopped.value) == f"{name}: {AFTER}"
    assert signal.getsignal(sig) is before  # The caller's handler, back.


def test_write_json_leaves_no_temporary_when_interrupted(tmp_path, monkeypatch):
    from vit_flax.infra import workdir as layout

    def interrupted(*_args):
        raise Interrupted("SIGTERM: stopped before training started")

    monkeypatch.setattr(layout.os, "replace", interrupted)
    with pytest.raises(Interrupted):
        layout.write_json(tmp_path / "history.json", [])
    assert list(tmp_path.iterdir()) == []
