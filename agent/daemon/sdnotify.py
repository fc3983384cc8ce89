"""systemd integration, spoken directly: sd_notify (READY, STATUS, WATCHDOG, STOPPING) and
journald log levels.

The notify protocol (sd_notify(3)) is one datagram per message to the AF_UNIX socket named
by ``$NOTIFY_SOCKET``, holding newline-separated ``VARIABLE=value`` assignments. A socket
name that starts with ``@`` lives in Linux's abstract namespace (the ``@`` stands for a
leading NUL byte). Without ``$NOTIFY_SOCKET`` (not started by systemd, or not
``Type=notify``) every call is a cheap no-op, so the agent runs the same by hand.

The watchdog is fed by ``ServiceNotifier.beat`` from the loop that does the work, never from
a timer thread: when the processing loop hangs the pings stop and systemd restarts the
service (``WatchdogSec=`` with ``Restart=on-failure``). Until ``READY=1`` the same beats
extend the start timeout (``EXTEND_TIMEOUT_USEC``), so waiting for an unreachable broker is
allowed for as long as the loop is alive, while a loop that hangs during start-up is still
killed. The one exception is the model's first load (``ServiceNotifier.loading``): no loop
turns yet, and ``backend = "auto"`` guards and times every candidate, which on a slow board
can outlast ``TimeoutStartSec``; a timer thread extends the start timeout then, for at most
``LOAD_EXTEND_LIMIT_S``, so a load that hangs is still killed.

This module imports only the standard library (``agent.log`` uses it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

DEFAULT_BEAT_S = 10.0  # beat period without WATCHDOG_USEC (start-up extensions only)
STATUS_MIN_INTERVAL_S = 5.0  # a STATUS= line is recomputed at most this often
MAX_STATUS_CHARS = 400
# The model's first load may extend the start timeout this long, beyond TimeoutStartSec:
# a Pi 4's first auto selection of the full bundle is estimated at 1-2 minutes.
LOAD_EXTEND_LIMIT_S = 900.0


def socket_address(name: str) -> str | bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None when unsupported.

    ``/run/systemd/notify`` is a path; ``@name`` is ``\\0name`` in the abstract namespace.
    (``vsock:`` addresses of newer systemd versions are not used on an edge node.)
    """
    if name.startswith("/"):
        return name
    if name.startswith("@") and len(name) > 1:
        return b"\0" + os.fsencode(name[1:])
    return None


def _clean(value: str) -> str:
    """One line: an assignment ends at a newline."""
    return " ".join(value.split())[:MAX_STATUS_CHARS]


class Notifier:
    """Sends sd_notify messages. Safe to call from any thread; never raises."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._target = socket_address(address) if address else None
        self._sock: socket.socket | None = None
        self.last_error: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, *assignments: str) -> bool:
        """Send ``VAR=value`` assignments in one datagram. True when the datagram was sent."""
        if self._target is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace") + b"\n"
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self._target)
        except OSError as exc:  # systemd gone or the socket not reachable: not our failure
            self.last_error = f"{self.address}: {exc.strerror or exc}"
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={_clean(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_clean(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={_clean(status)}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC ties the reload to this moment (systemd 253's notify-reload).
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_timeout(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """``WATCHDOG_USEC`` in seconds when the watchdog is meant for this process, else None.

    Like sd_watchdog_enabled(3): ``WATCHDOG_PID``, when set, must name this process.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


class ServiceNotifier:
    """The agent's side of ``Type=notify``: call ``beat`` from every turn of the processing
    loop, ``stopping`` on shutdown. ``beat`` sends:

    * ``WATCHDOG=1`` at most every ``interval`` seconds (a quarter of ``WATCHDOG_USEC``, so
      with a loop that turns at least once a second the pings stay below half of it);
    * ``READY=1`` the first time it is told ``ready=True``;
    * ``STATUS=`` when the text changed, recomputed at most every ``STATUS_MIN_INTERVAL_S``;
    * before READY, ``EXTEND_TIMEOUT_USEC`` with each ping, so start-up may wait for brokers
      as long as the loop lives.
    """

    def __init__(
        self,
        notifier: Notifier,
        watchdog_s: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        status_interval_s: float = STATUS_MIN_INTERVAL_S,
    ) -> None:
        self.notifier = notifier
        self.watchdog_s = watchdog_s
        self.interval = watchdog_s / 4 if watchdog_s else DEFAULT_BEAT_S
        # A start-up extension covers a few missed beats but not a hung loop for long.
        self.extend_s = max(3 * self.interval, 15.0)
        self._clock = clock
        self._status_interval = status_interval_s
        self._last_ping = float("-inf")
        self._last_status_at = float("-inf")
        self._last_status = ""
        self.is_ready = False
        self.is_stopping = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ServiceNotifier:
        return cls(Notifier.from_environ(environ), watchdog_timeout(environ))

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def beat(self, *, ready: bool = True, status: str | Callable[[], str] | None = None) -> None:
        """One turn of the processing loop. ``status`` may be a callable: it is only called
        when a STATUS= line is due, so a costly summary is not built on every turn."""
        if not self.notifier.enabled or self.is_stopping:
            return
        now = self._clock()
        lines: list[str] = []
        if ready and not self.is_ready:
            self.is_ready = True
            lines.append("READY=1")
        due = bool(lines) or now - self._last_status_at >= self._status_interval
        if status is not None and due:
            text = _clean(status() if callable(status) else status)
            self._last_status_at = now
            if text != self._last_status or lines:
                self._last_status = text
                lines.append(f"STATUS={text}")
        if now - self._last_ping >= self.interval:
            self._last_ping = now
            if self.watchdog_s:
                lines.append("WATCHDOG=1")
            if not self.is_ready:
                lines.append(f"EXTEND_TIMEOUT_USEC={int(self.extend_s * 1_000_000)}")
        if lines:
            self.notifier.send(*lines)

    @contextlib.contextmanager
    def loading(self, limit_s: float = LOAD_EXTEND_LIMIT_S) -> Iterator[None]:
        """Before READY, extend the start timeout every ``interval`` from a timer thread
        while the body runs (the first model load, before any loop turns), for at most
        ``limit_s`` seconds; ``WATCHDOG=1`` with it where the watchdog is on. The last
        extension runs out ``extend_s`` after that: a load still running then is stopped by
        systemd about ``limit_s + extend_s`` after it began."""
        if not self.notifier.enabled or self.is_ready:
            yield
            return
        done = threading.Event()
        deadline = self._clock() + limit_s
        lines = [f"EXTEND_TIMEOUT_USEC={int(self.extend_s * 1_000_000)}"]
        if self.watchdog_s:
            lines.append("WATCHDOG=1")

        def extend() -> None:
            while self._clock() < deadline and not self.is_stopping:
                self.notifier.send(*lines)
                if done.wait(self.interval):
                    return

        pinger = threading.Thread(target=extend, name="sd-loading", daemon=True)
        pinger.start()
        try:
            yield
        finally:
            done.set()
            pinger.join()

    def status(self, text: str) -> None:
        """A STATUS= line now (start-up phases, shutdown progress)."""
        text = _clean(text)
        self._last_status = text
        self._last_status_at = self._clock()
        self.notifier.status(text)

    def reloading(self) -> None:
        """``RELOADING=1``: a ``systemctl reload`` is being handled."""
        if self.notifier.enabled and not self.is_stopping:
            self.notifier.reloading()

    def reloaded(self) -> None:
        """``READY=1`` after a reload, whatever its outcome (the service keeps serving)."""
        if self.notifier.enabled and not self.is_stopping and self.is_ready:
            self.notifier.ready()

    def stopping(self, status: str = "stopping") -> None:
        """``STOPPING=1`` once (later calls only update STATUS=); beats stop."""
        if self.is_stopping:
            self.status(status)
            return
        self.is_stopping = True
        self._last_status = _clean(status)
        self.notifier.stopping(status)


# -- STATUS= text --------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerState:
    name: str  # "edge" | "cloud"
    url: str
    connected: bool
    error: str | None = None


def status_line(
    *,
    brokers: Iterable[BrokerState],
    inbox: int,
    outbox: int,
    processed: int,
    failed: int,
    last_latency_ms: float | None = None,
    ready: bool = True,
    unclaimed: int = 0,
) -> str:
    """The human STATUS= line of a running agent (see docs/deploy.md, "Status lines").

    ``waiting for brokers: ...`` before the first time both are connected,
    ``degraded: ...`` when one dropped later, ``ok: ...`` otherwise; then the counters.
    """
    down = [b for b in brokers if not b.connected]
    counters = f"processed {processed}, rejected {failed}, inbox {inbox}, outbox {outbox}"
    if unclaimed:
        counters += f" ({unclaimed} waiting for a consumer to subscribe)"
    if last_latency_ms is not None:
        counters += f", last {last_latency_ms:.0f} ms"
    if not down:
        return f"ok: {counters}"
    what = "; ".join(
        f"{b.name} broker {b.url} not connected" + (f" ({b.error})" if b.error else "")
        for b in down
    )
    return f"{'degraded' if ready else 'waiting for brokers'}: {what}; {counters}"


# -- journald levels ----------------------------------------------------------------------

# sd-daemon(3) prefixes: journald reads "<N>" at the start of a stdout/stderr line as the
# syslog priority (SyslogLevelPrefix=yes, the default) and strips it from MESSAGE.
SYSLOG_PRIORITY = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journald stream systemd connected (``$JOURNAL_STREAM``
    holds its ``device:inode``), so level prefixes are understood and not shown."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def add_syslog_prefix(_logger: Any, method: str, rendered: Any) -> Any:
    """structlog processor placed after the renderer: ``<N>`` + the rendered line."""
    if isinstance(rendered, str):
        return f"<{SYSLOG_PRIORITY.get(method, 6)}>{rendered}"
    return rendered


def syslog_prefix_processors(stream: TextIO) -> list[Callable[[Any, str, Any], Any]]:
    """``[add_syslog_prefix]`` when logging to journald, else ``[]`` (for ``log.configure``)."""
    return [add_syslog_prefix] if stream_is_journal(stream) else []


__all__ = [
    "BrokerState",
    "Notifier",
    "ServiceNotifier",
    "add_syslog_prefix",
    "socket_address",
    "status_line",
    "stream_is_journal",
    "syslog_prefix_processors",
    "watchdog_timeout",
]
