"""A scanner gateway that loses nothing: each scan is kept until the agent confirms it.

The edge broker's PUBACK only says the broker has the scan in memory; Mosquitto writes its
persistence as snapshots, so a broker that acks a scan and crashes before it reaches the
agent can lose it. The agent publishes a receipt on ``iomt/{site}/{device}/accepted``
(JSON ``{"v": 1, "sha256": ...}``) once the scan is committed to its inbox.
``ConfirmingGateway`` keeps every scan until such a receipt names its SHA-256 and publishes
the unconfirmed ones again after every reconnect to the edge broker and when a receipt is
overdue: ``resend_s`` after the first try, the wait doubling per try up to an hour
(``agent.transport.scan_receipts``, shared with the DICOM gateway's spool). A scan sent
twice is processed twice; the consumer drops the second result by its idempotency key
(docs/reliability.md).

``iomt-agent send --confirm`` uses it; so do the fault tests.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

from agent.config import BrokerConfig
from agent.log import get_logger
from agent.transport.mqtt import Connection, Message
from agent.transport.scan_receipts import accepted_digest, resend_delay
from agent.transport.topics import Topics

log = get_logger("agent.confirming_sender")

RESEND_S = 30.0


@dataclass
class _Scan:
    payload: bytes
    due: float  # when to publish it again unconfirmed
    tries: int = 1  # publishes so far


class ConfirmingGateway:
    """Publishes scans to ``topics.scan(source)`` and keeps each until the agent's receipt."""

    def __init__(self, cfg: BrokerConfig, client_id: str, topics: Topics, *,
                 source: str = "gateway", resend_s: float = RESEND_S) -> None:
        self._topic = topics.scan(source)
        self._resend_s = resend_s
        self._cond = threading.Condition()
        self._unconfirmed: dict[str, _Scan] = {}
        self._stop = threading.Event()
        self.sent = 0  # distinct scans handed to send()
        self.resent = 0  # publishes of a scan that had gone out before
        self.conn = Connection(cfg, client_id, name="edge",
                               subscriptions=(topics.accepted_filter(),),
                               on_message=self._on_receipt, on_connected=self._reconnected)
        self._thread = threading.Thread(target=self._resend_loop, name="gateway", daemon=True)

    def start(self, timeout: float = 10.0) -> bool:
        """Connect; whether the broker was reached within ``timeout``."""
        self.conn.start()
        self._thread.start()
        return self.conn.wait_connected(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.conn.stop()

    @property
    def unconfirmed(self) -> int:
        with self._cond:
            return len(self._unconfirmed)

    def send(self, payload: bytes) -> str:
        """Publish one scan (QoS 1); returns its SHA-256, the key of its receipt."""
        digest = hashlib.sha256(payload).hexdigest()
        with self._cond:
            if digest not in self._unconfirmed:
                self.sent += 1
            self._unconfirmed[digest] = _Scan(payload, time.monotonic() + self._resend_s)
        self.conn.publish(self._topic, payload, qos=1)
        return digest

    def wait_confirmed(self, timeout: float) -> bool:
        """Block until every scan sent so far is confirmed (False at ``timeout``)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._unconfirmed, timeout)

    # -- paho's network thread -----------------------------------------------------------
    def _on_receipt(self, msg: Message) -> None:
        digest = accepted_digest(msg.payload)
        if digest is None:
            log.warning("scan_receipt_unreadable", topic=msg.topic, bytes=len(msg.payload))
            return
        with self._cond:
            if self._unconfirmed.pop(digest, None) is not None:
                self._cond.notify_all()

    def _reconnected(self) -> None:
        """The broker may have lost what it acked before: everything unconfirmed is due."""
        now = time.monotonic()
        with self._cond:
            for scan in self._unconfirmed.values():
                scan.due = now
            self._cond.notify_all()

    # -- the resend thread ---------------------------------------------------------------
    def _resend_loop(self) -> None:
        while not self._stop.wait(0.2):
            if not self.conn.connected:
                continue
            now = time.monotonic()
            with self._cond:
                due = [(d, s) for d, s in self._unconfirmed.items() if s.due <= now]
                for _, scan in due:
                    scan.tries += 1
                    scan.due = now + resend_delay(self._resend_s, scan.tries)
            for _, scan in due:
                self.resent += 1
                self.conn.publish(self._topic, scan.payload, qos=1)
            if due:
                log.info("scans_resent", scans=len(due), unconfirmed=self.unconfirmed,
                         note="no receipt from the agent yet; it may process one twice, the "
                         "consumer drops the duplicate result")
