"""``iomt-agent fleet status``: the retained status of every device of a group, as a table.

Reads ``iomt/+/+/status`` on the cloud broker (retained: what each device said last) until
no new message came for ``quiet_s``, and keeps the devices whose ``update.group`` is the
group."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from agent.config import BrokerConfig
from agent.fleet.publish import PublishError, unreachable
from agent.transport.mqtt import Connection, Message
from agent.transport.topics import check_level, every_status

COLUMNS = ("device", "online", "model", "update", "last error")


def collect(broker: BrokerConfig, group: str, *, quiet_s: float = 1.0,
            timeout: float = 15.0) -> list[dict[str, Any]]:
    """The statuses of ``group``'s devices, sorted by site and device."""
    check_level(group, "group")
    found: dict[str, dict[str, Any]] = {}
    last = [time.monotonic()]
    lock = threading.Lock()

    def on_message(msg: Message) -> None:
        try:
            status = json.loads(msg.payload)
        except ValueError:
            return
        with lock:
            if isinstance(status, dict):
                found[msg.topic] = status
            last[0] = time.monotonic()

    conn = Connection(broker, f"iomt-fleet-status-{time.monotonic_ns()}", name="cloud",
                      subscriptions=(every_status(),), on_message=on_message)
    conn.start()
    try:
        if not conn.wait_connected(timeout):
            raise PublishError(unreachable(broker, conn.last_error))
        last[0] = time.monotonic()
        while time.monotonic() - last[0] < quiet_s:
            time.sleep(0.1)
    finally:
        conn.stop()
    mine = [s for s in found.values()
            if isinstance(s.get("update"), dict) and s["update"].get("group") == group]
    return sorted(mine, key=lambda s: (str(s.get("site")), str(s.get("device_id"))))


def row(status: dict[str, Any]) -> tuple[str, ...]:
    model: dict[str, Any] = status["model"] if isinstance(status.get("model"), dict) else {}
    update = status.get("update") or {}
    error = ""
    if update.get("state") == "rejected":
        error = f"{update.get('reason')}: {update.get('detail', '')}"
    elif isinstance(status.get("model_refused"), dict):
        error = f"model_refused: {status['model_refused'].get('reason', '')}"
    version = f" {update['version']}" if update.get("version") else ""
    return (f"{status.get('site')}/{status.get('device_id')}",
            "yes" if status.get("state") == "online" else "no",
            f"{model.get('name', '?')} {model.get('version', '?')}",
            f"{update.get('state', '?')}{version}",
            error if len(error) <= 80 else error[:77] + "...")  # the whole: its status


def render(statuses: list[dict[str, Any]]) -> str:
    rows = [COLUMNS, *(row(s) for s in statuses)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
