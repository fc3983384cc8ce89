"""The node's side of fleet updates: a thread that follows the group's TUF metadata on the
cloud broker and prepares each new target for the daemon's guarded reload.

A check runs on start, whenever the group's timestamp message changes, and every
``fleet.check_interval_s``: python-tuf's ``ngclient`` refreshes the metadata (root chain,
timestamp, snapshot, targets: signatures, thresholds, versions never going back, expiry)
through ``MqttFetcher``; a target that is new, for this group and not refused before is
downloaded into staging (its signed length and sha256 checked), unpacked safely, loaded
with the strict bundle loader, and offered to the daemon (``take_candidate``). The daemon
guards it on its loader thread while the old model serves, then calls ``activated`` (the
new bundle becomes ``current``) or ``refused``. The daemon pulls (``take_candidate``,
``take_reports``) on its main thread; this thread never calls into it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuf.ngclient import Updater

from agent.config import BrokerConfig, FleetSection
from agent.fleet.activation import BundleStore
from agent.fleet.archive import extract_bundle
from agent.fleet.clock import Clock, clock_behind, system_clock
from agent.fleet.fetcher import METADATA_URL, TARGETS_URL, MqttFetcher, RetainedCache
from agent.fleet.repo import TARGET_NAME
from agent.fleet.verdict import UpdateRejected, from_tuf
from agent.log import get_logger
from agent.model.bundle import BundleError, load_bundle
from agent.model.guard import GuardFailed
from agent.transport.mqtt import Connection
from agent.transport.topics import FleetTopics

log = get_logger("agent.fleet.updater")

SETTLE_S = 0.5  # after a timestamp message: let the rest of a burst of metadata land
# MQTT 5: chunks in flight to this node at once, so a broker holds at most this many per
# node (8 x 256 KiB) however many nodes download together.
RECEIVE_MAXIMUM = 8
RETRY_S = 5.0  # after metadata that is not (yet) all on the broker
# Rejections that the target's own bytes cause: that target is never tried again (its key
# goes to fleet/refused.json). Others (a stalled or tampered transfer) are retried at the
# next check.
FINAL_REASONS = frozenset({"wrong_group", "unsafe_archive", "bundle_invalid", "guard_failed",
                           "failure_rate"})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Candidate:
    """A downloaded, unpacked and checked bundle waiting for the guard."""

    bundle: Path
    key: str  # the first 16 hex digits of the target's sha256
    name: str
    version: str


def _bundle_version(bundle: Path | None) -> str | None:
    try:
        return str(json.loads((bundle / "bundle.json").read_text())["version"]) if bundle else None
    except (OSError, ValueError, KeyError):
        return None


class FleetUpdater:
    """One node's update thread for one group."""

    def __init__(self, settings: FleetSection, cloud: BrokerConfig, client_id: str,
                 state_dir: Path, notify: threading.Event | None = None, device: str = "",
                 clock: Clock = system_clock, **fetcher_options: float) -> None:
        self.settings = settings
        self._clock = clock  # checked against agent.fleet.clock's floor before each check
        self.device = device  # "site/device": canary releases name the devices they are for
        self._notify = notify  # set with every change: wakes the daemon's main loop
        self.store = BundleStore(state_dir)
        self.topics = FleetTopics(settings.group)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.cache = RetainedCache(self.topics, on_timestamp=self._wake.set)
        self.conn = Connection(cloud.model_copy(update={"session_expiry_s": 0}), client_id,
                               name="fleet", subscriptions=(self.topics.metadata_filter,),
                               on_message=self.cache.on_message,
                               receive_maximum=RECEIVE_MAXIMUM)
        self.fetcher = MqttFetcher(self.conn, self.cache, **fetcher_options)  # type: ignore[arg-type]
        current = self.store.current
        self._status: dict[str, Any] = {
            "group": settings.group, "state": "active" if current else "idle",
            "version": _bundle_version(current), "reason": None, "at": _now()}
        self._candidate: Candidate | None = None
        self._in_flight: Candidate | None = None
        self._reports: list[tuple[str, str]] = []
        self._refused_file = self.store.root / "refused.json"  # kept across restarts
        self._refused: set[str] = self._load_refused()
        self.changed = threading.Event()  # the status changed: the daemon republishes it
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)

    def _load_refused(self) -> set[str]:
        try:
            return {str(k) for k in json.loads(self._refused_file.read_text())}
        except (OSError, ValueError, TypeError):
            return set()

    def _refuse_key(self, key: str) -> None:
        """Never try this target again (its sha256 prefix), also after a restart."""
        self._refused.add(key)
        tmp = self._refused_file.with_suffix(".new")
        tmp.write_text(json.dumps(sorted(self._refused)))
        tmp.replace(self._refused_file)

    # -- the daemon's side (main thread) -------------------------------------------------
    def start(self) -> None:
        self.store.prepare()
        self.conn.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.conn.stop()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status)

    def take_candidate(self) -> Candidate | None:
        """A bundle to guard and activate, once."""
        with self._lock:
            candidate, self._candidate = self._candidate, None
            return candidate

    def take_reports(self) -> list[tuple[str, str]]:
        """(reason, detail) of each rejection since the last call, for the error topic."""
        with self._lock:
            reports, self._reports = self._reports, []
            return reports

    def activated(self, candidate: Candidate) -> None:
        """The guard passed and the daemon swapped the model: make it ``current``."""
        self.store.activate(candidate.bundle)
        log.info("update_active", group=self.topics.group, bundle=candidate.name,
                 version=candidate.version, key=candidate.key)
        self._set("active", candidate.version)
        self._in_flight = None

    def rolled_back(self, candidate: Candidate, detail: str, *, to_configured: bool) -> None:
        """The daemon swapped the previous model back in after ``candidate`` failed too
        many scans: it is never tried again, and the status says so."""
        self.store.roll_back()
        self._refuse_key(candidate.key)
        log.error("update_rolled_back", group=self.topics.group, version=candidate.version,
                  detail=detail, back_to="model.bundle" if to_configured else "previous")
        with self._lock:
            self._reports.append(("failure_rate", f"{detail}: rolled back"))
        self._set("rolled_back", candidate.version, "failure_rate", detail)

    def refused(self, candidate: Candidate, exc: Exception) -> None:
        """The guard (or the runtime) refused the candidate: the old model keeps serving."""
        reason = ("guard_failed" if isinstance(exc, GuardFailed) else
                  "bundle_invalid" if isinstance(exc, BundleError) else "load_failed")
        self.store.discard(candidate.bundle)
        self._reject(UpdateRejected(reason, str(exc)), candidate.version, candidate.key)
        self._in_flight = None

    # -- the update thread ---------------------------------------------------------------
    def _set(self, state: str, version: str | None, reason: str | None = None,
             detail: str | None = None) -> None:
        with self._lock:
            self._status = {"group": self.topics.group, "state": state, "version": version,
                            "reason": reason, **({"detail": detail} if detail else {}),
                            "at": _now()}
        self.changed.set()
        if self._notify is not None:
            self._notify.set()

    def _reject(self, exc: UpdateRejected, version: str | None, key: str | None) -> None:
        if key is not None and exc.reason in FINAL_REASONS:
            self._refuse_key(key)
        with self._lock:
            last = self._status
        if (last["state"], last["reason"], last["version"], last.get("detail")) == (
                "rejected", exc.reason, version, str(exc)):
            return  # the same metadata checked again: said once already
        log.error("update_rejected", group=self.topics.group, version=version,
                  reason=exc.reason, detail=str(exc))
        with self._lock:
            self._reports.append((exc.reason, f"{exc} (version {version})"))
        self._set("rejected", version, exc.reason, str(exc))

    def _run(self) -> None:
        wait = self.settings.check_interval_s
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.wait(SETTLE_S):
                return
            wait = self.settings.check_interval_s
            if self._in_flight is not None:
                continue  # the daemon is guarding the last one
            if not self.check():
                wait = RETRY_S

    def _tuf(self) -> Updater:
        local_root = self.store.metadata / "root.json"
        bootstrap = None if local_root.exists() else self.settings.root.read_bytes()
        return Updater(str(self.store.metadata), METADATA_URL, str(self.store.staging),
                       TARGETS_URL, self.fetcher, bootstrap=bootstrap)

    def check(self) -> bool:
        """One check: refresh, and prepare a new target if there is one; a rejection goes
        to the status. False: the metadata is not all on the broker yet, or the clock is
        behind what this node has verified (try again soon)."""
        if not self._clock_trusted():
            return False
        try:
            self._check()
        except UpdateRejected as exc:
            if exc.reason == "metadata_unavailable":
                log.info("update_waiting", group=self.topics.group, detail=str(exc))
                return False
            self._reject(exc, None, None)
        except Exception as exc:  # an update must never take the daemon down
            self._reject(UpdateRejected("metadata_invalid", f"{type(exc).__name__}: {exc}"),
                         None, None)
        return True

    def _clock_trusted(self) -> bool:
        """Expiry is evaluated only when the clock is not behind the floor
        (``agent.fleet.clock``); until then the status says ``waiting_for_clock``."""
        behind = clock_behind(self.store.metadata, self._clock())
        state = self.status()["state"]
        if behind is None:
            if state == "waiting_for_clock":
                log.info("update_clock_set", group=self.topics.group)
                current = self.store.current
                self._set("active" if current else "idle", _bundle_version(current))
            return True
        if state != "waiting_for_clock":
            log.warning("update_waiting_for_clock", group=self.topics.group, detail=behind)
            self._set("waiting_for_clock", _bundle_version(self.store.current),
                      "clock_behind", behind)
        return False

    def _check(self) -> None:
        try:
            tuf = self._tuf()
            tuf.refresh()
            info = tuf.get_targetinfo(TARGET_NAME)
        except Exception as exc:
            raise from_tuf(exc, "refreshing the fleet metadata") from exc
        if info is None:
            return
        custom = info.custom if isinstance(info.custom, dict) else {}
        key = info.hashes.get("sha256", "")[:16]
        name, version = str(custom.get("bundle", "?")), str(custom.get("version", "?"))
        if key == self.store.current_key:
            if self.status()["state"] != "active":  # e.g. after a refused replay: all good
                self._set("active", _bundle_version(self.store.current))
            return
        if key in self._refused:
            return
        if custom.get("group") != self.topics.group:
            self._reject(UpdateRejected("wrong_group", f"the signed target is for group "
                         f"{custom.get('group')!r}, this node is in {self.topics.group!r}"),
                         version, key)
            return
        rollout: dict[str, Any] = (custom["rollout"] if isinstance(custom.get("rollout"), dict)
                                   else {})
        if rollout.get("stage") == "canary" and self.device not in rollout.get("devices", []):
            log.info("update_for_canaries", group=self.topics.group, version=version,
                     note="this node takes it once the operator promotes it")
            return
        try:
            self._prepare(tuf, info, key, name, version)
        except UpdateRejected as exc:
            self.store.clear_staging()
            self._reject(exc, version, key)

    def _prepare(self, tuf: Updater, info: Any, key: str, name: str, version: str) -> None:
        self._set("downloading", version)
        self.store.clear_staging()
        tar = self.store.staging / f"{key}.tar"
        try:
            tuf.download_target(info, filepath=str(tar))
        except Exception as exc:
            raise from_tuf(exc, f"downloading {name} {version}") from exc
        self._set("verifying", version)
        unpacked = extract_bundle(tar, self.store.staging / key)
        tar.unlink()
        try:
            load_bundle(unpacked)
        except BundleError as exc:
            raise UpdateRejected("bundle_invalid", f"{name} {version}: {exc}") from None
        candidate = Candidate(self.store.install(unpacked, key), key, name, version)
        self._set("guarding", version)
        with self._lock:
            self._in_flight = self._candidate = candidate
        if self._notify is not None:
            self._notify.set()
