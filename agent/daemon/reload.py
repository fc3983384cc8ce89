"""The model reload behind SIGHUP (``systemctl reload``).

A loader thread reads the config again and opens and guards the model it names while the
current model keeps serving. The daemon's main loop asks ``poll`` once a turn; when the
loader is done it swaps the new model in between two scans, or reports the refusal
(``refusal``: the retained status's ``model_refused``, the log, an error report) and goes on
serving the model it has. ``restart_only_changes`` names what else changed in the file:
those sections take effect at the next start.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import Config, ConfigError, load_config
from agent.daemon.pipeline import error_report
from agent.daemon.sealing import Sealer
from agent.errors import AgentError
from agent.log import get_logger
from agent.model.guard import GuardFailed
from agent.model.serving import ServedModel, load_model
from agent.transport.topics import Topics

Loaded = ServedModel | Exception
log = get_logger("agent.daemon.reload")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Reloader:
    """One reload at a time; a SIGHUP while one runs is kept and served after it."""

    def __init__(self, config: Config, config_path: Path | None,
                 wake: threading.Event, fleet_bundle: Callable[[], Path | None] = lambda: None,
                 ) -> None:
        self._config = config
        self._fleet_bundle = fleet_bundle  # the fleet's current bundle overrides model.bundle
        self._asked: tuple[Path, object] | None = None  # a fleet update: (bundle, its tag)
        self._loading: tuple[Path, object] | None = None
        self.done_tag: object = None  # the tag of the load poll just returned (None: SIGHUP)
        self._config_path = config_path
        self._wake = wake
        self._requested = threading.Event()
        self._loader: threading.Thread | None = None
        self._result: Loaded | None = None
        self.what = ""  # the bundle (or config file) the last reload was about

    def request(self) -> None:
        """Ask for a reload (safe in a signal handler)."""
        self._requested.set()
        self._wake.set()

    def request_bundle(self, bundle: Path, tag: object) -> None:
        """Load and guard ``bundle`` with the running [model] settings (a fleet update);
        ``done_tag`` is ``tag`` when ``poll`` returns its result."""
        self._asked = (bundle, tag)
        self._wake.set()

    @property
    def pending(self) -> bool:
        """A reload was asked for and has not started yet."""
        return self._requested.is_set()

    def poll(self) -> Loaded | None:
        """Main loop, once a turn: start the loader when a reload was asked for; return its
        result (the model, or the error that refuses it) once it has finished."""
        if (self._asked is not None or self._requested.is_set()) and self._loader is None:
            self._loading, self._asked = self._asked, None
            if self._loading is None:
                self._requested.clear()
            self._loader = threading.Thread(target=self._load, name="loader", daemon=True)
            self._loader.start()
        if self._loader is not None and not self._loader.is_alive():
            result, self._result, self._loader = self._result, None, None
            self.done_tag = self._loading[1] if self._loading else None
            return result
        return None

    def load_now(self) -> Loaded:
        """The same load on the caller's thread."""
        self._loading = None
        self._load()
        result, self._result = self._result, None
        assert result is not None
        return result

    def close(self) -> None:
        """At shutdown: close a model that was loaded but never swapped in (a loader still
        guarding one is a daemon thread: it goes with the process)."""
        if self._loader is not None and not self._loader.is_alive() and isinstance(
                self._result, ServedModel):
            self._result.close()

    def _load(self) -> None:
        settings = self._config.model
        self.what = str(self._config_path)  # until the config has been read
        try:
            if self._loading is not None:
                settings = settings.model_copy(update={"bundle": self._loading[0]})
            elif self._config_path is not None:
                settings = load_config(self._config_path).model
            if self._loading is None and (fleet := self._fleet_bundle()) is not None:
                settings = settings.model_copy(update={"bundle": fleet})
            self.what = str(settings.bundle)
            model = load_model(settings, self._config.agent.state_dir or Path())
            self._result = model
            refused = sharing_refusal(model, self._config.agent.shared_subscription)
            if refused is not None:
                model.close()
                self._result = refused
        except AgentError as exc:
            self._result = exc
        except Exception as exc:  # a broken bundle must never take the daemon down
            self._result = AgentError(f"cannot load {settings.bundle}: "
                                      f"{type(exc).__name__}: {exc}")
        self._wake.set()


def sharing_refusal(model: ServedModel, shared: bool) -> AgentError | None:
    """Why ``model`` cannot serve a shared subscription, or None. A 2.5D model needs every
    slice of a series on one agent, and a shared subscription deals a series' slices to the
    site's agents in turn (docs/reliability.md, "Scale-out on one site")."""
    if not shared or model.context == 0:
        return None
    return AgentError(
        f"model {model.bundle.name} is 2.5D (context_slices = {model.context}) and "
        "agent.shared_subscription = true: the site's agents would each get only some "
        "slices of a series and none would have all the neighbours; set "
        "agent.shared_subscription = false (one agent serves a 2.5D model at a site)")


def refusal(exc: Exception, what: str, serving: ServedModel,
            topics: Topics) -> tuple[dict[str, Any], tuple[str, str, str, bytes]]:
    """What a refused reload leaves behind: the status's ``model_refused`` and the error
    report's outbox row. A config that does not parse names the config file, not a
    bundle."""
    config_broken = isinstance(exc, ConfigError)
    reason = (exc.report.reason if isinstance(exc, GuardFailed)
              else f"the config cannot be read: {exc}" if config_broken else str(exc))
    figures = exc.report.summary() if isinstance(exc, GuardFailed) else {}
    refused = {("config" if config_broken else "bundle"): what, "reason": reason,
               "at": now_iso(), **({"guard": figures} if figures else {})}
    try:
        marker = (Path(what) if config_broken else Path(what) / "bundle.json").read_bytes()
    except OSError:
        marker = what.encode()
    mid, body = error_report(
        device_id=topics.device, reason="model_refused",
        detail=f"{reason} (still serving {serving.bundle.name} {serving.bundle.version})",
        payload_sha256=hashlib.sha256(marker).hexdigest(), source_topic="model")
    return refused, ("error", mid, str(topics.errors), body)


def update_report(topics: Topics, reason: str, detail: str) -> tuple[str, str, str, bytes]:
    """The error report's outbox row for a rejected fleet update (``reason``: the
    status's ``update.reason``)."""
    mid, body = error_report(
        device_id=topics.device, reason="update_rejected", detail=f"{reason}: {detail}",
        payload_sha256=hashlib.sha256(detail.encode()).hexdigest(), source_topic="fleet")
    return ("error", mid, str(topics.errors), body)


RELOADED_SECTIONS = frozenset({"model", "seal"})
OTHER_PROGRAMS = frozenset({"gateway", "receiver"})  # read by `gateway` and `receive` only


def restart_only_changes(running: Config, read: Config) -> list[str]:
    """The sections of ``read`` (the file now) that differ from the ``running`` config
    and that only a restart of the agent applies."""
    return [name for name in type(running).model_fields
            if name not in RELOADED_SECTIONS | OTHER_PROGRAMS
            and getattr(running, name) != getattr(read, name)]


def reread_config(config_path: Path, running: Config, sealer: Sealer) -> bool:
    """SIGHUP, main thread: the keys of ``[seal]`` swapped in (True: new keys seal now),
    the sections that only a restart applies named in the log. A file that does not parse
    changes nothing: the model reload reports it, naming the file."""
    try:
        read = load_config(config_path)
    except ConfigError:
        return False
    swapped = sealer.reload(read.seal)
    if changed := restart_only_changes(running, read):
        log.warning("reload_needs_restart", sections=changed, fix="`systemctl restart "
                    "iomt-agent` applies them; until then the running values stay")
    return swapped
