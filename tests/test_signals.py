"""agent.signals.StopSignals in this process: a stop signal raises while starting, only
sets the event once ready, and the previous handlers come back."""

from __future__ import annotations

import os
import signal

import pytest

from agent.signals import StopRequested, StopSignals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_raises_while_starting(signum: int) -> None:
    before = signal.getsignal(signum)
    with pytest.raises(StopRequested) as ei, StopSignals() as stop:
        os.kill(os.getpid(), signum)  # CPython runs the handler before os.kill returns
        raise AssertionError("not raised")
    assert ei.value.signal_name == signal.Signals(signum).name
    assert stop.event.is_set()
    assert signal.getsignal(signum) is before


def test_once_ready_a_stop_signal_only_sets_the_event() -> None:
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under nohup &
    with StopSignals() as stop:
        stop.ready()
        assert not stop.event.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.event.wait(5)
        assert stop.interrupted and stop.signal_name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before


def test_a_sighup_while_starting_is_kept_not_fatal() -> None:
    """SIGHUP's default action ends the process: an early `systemctl reload` killed `run`
    (exit 129) and any SIGHUP killed `gateway`, without a log line."""
    import time

    before = signal.getsignal(signal.SIGHUP)
    heard: list[bool] = []
    with StopSignals(on_hup=lambda: heard.append(True)) as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not heard and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.reload_requested and heard == [True]
        assert not stop.event.is_set()  # not a stop
    assert signal.getsignal(signal.SIGHUP) is before  # restored on the way out
