"""SIGTERM and SIGINT for the CLI's long-running commands (``run``, ``receive``).

Until a command is ready to stop cleanly (config, keys and model still loading), a stop
signal raises ``StopRequested``, which the command turns into a one-line log and a clean
exit, instead of Python's traceback (SIGINT) or death by signal (SIGTERM, rc -15). Once it
is ready, ``ready()`` makes the signal only set ``event``, for the command's loop to see.

SIGHUP (``systemctl reload``) would end the process by default: within the block it only
sets ``reload_requested`` (``run`` asks for the reload once it can do one; a command that
reloads nothing logs that it ignored it, through ``on_hup``).

Standard library only: installed before anything slow is imported.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal arrived while starting. A BaseException, so that no ``except
    Exception`` on the way (a runtime probe, a loader) mistakes it for a failure."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopSignals:
    """Handlers for SIGTERM and SIGINT, restored on exit (a context manager). Only the main
    thread can install them; elsewhere this does nothing and ``event`` is never set."""

    def __init__(self, on_hup: Callable[[], None] | None = None) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None
        self.reload_requested = False
        self._on_hup = on_hup
        self._raising = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._hup)
        return self

    def _hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True
        if self._on_hup is not None:
            self._on_hup()

    def __exit__(self, _type: type[BaseException] | None, _exc: BaseException | None,
                 _tb: TracebackType | None) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def ready(self) -> None:
        """From now on a stop signal sets ``event`` (and raises nothing)."""
        self._raising = False
        if self.signal_name is not None:
            self.event.set()

    @property
    def interrupted(self) -> bool:
        return self.signal_name == "SIGINT"

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()
        if self._raising:
            raise StopRequested(self.signal_name)
