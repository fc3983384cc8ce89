"""The outbox publisher: queued results and error reports to the cloud broker.

A row is deleted only when the broker's PUBACK says it was delivered. Two answers keep it:

* **unclaimed** (MQTT 5 reason 0x10, "No matching subscribers"): the broker took the message
  but had no subscription for it and discarded it, because no consumer has subscribed yet (a
  consumer's persistent session, once created, makes the broker queue for it). The row is
  kept and published again after a delay that doubles per try, from 1 s up to 30 s; as soon
  as a row of the same topic is delivered, every unclaimed row of that topic is due at once.
  ``result_unclaimed`` is logged once when the first row is held, ``results_claimed`` when
  the last one went out; ``unclaimed`` counts the rows held now (status:
  ``results_unclaimed``).
* **refused** (reason >= 0x80, e.g. not authorized): logged, retried with the same backoff.

MQTT 3.1.1 has no reason codes: a PUBACK there always reads as delivered, so without
receipts a result that no subscriber took is lost (docs/protocol.md).

**Receipts** (``receipt_timeout_s`` set: ``delivery.receipts = true``, recommended): a PUBACK only
means the broker has the message in memory, and Mosquitto writes its persistence as
snapshots, so a broker that acks and then crashes can lose it. With receipts a delivered
row stays in the store, *awaiting* the consumer's receipt (``on_receipt``, which deletes
every row of that message id); after every reconnect to the cloud broker (``reconnected``)
the awaiting rows go out again at once, and one whose receipt is ``receipt_timeout_s``
overdue goes out again too (the timeout doubling per try, up to 1 h). The consumer drops
the duplicates by message id (docs/reliability.md).

Rows waiting for a retry do not hold up the others: new rows go out as they come, up to
``window`` in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.daemon.store import DiskFull, OutboxItem, Store
from agent.log import get_logger
from agent.thread_names import name_thread
from agent.transport.mqtt import Connection, Delivery, PublishDone, Verdict

log = get_logger("agent.daemon.outbox")

WINDOW = 32  # rows in flight to the cloud broker at once
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0
MAX_RECEIPT_WAIT_S = 3600.0
RECEIPT_GRACE_ON_STOP_S = 2.0  # on stop: how long to wait for receipts still on their way
DOWN_BEFORE_STOP_S = 10.0  # on stop: a cloud broker down this long already is not waited for


def retry_delay(tries: int) -> float:
    """Seconds before try ``tries + 1`` of a row that was not delivered ``tries`` times."""
    return min(MAX_RETRY_S, FIRST_RETRY_S * 2.0 ** max(0, tries - 1))


@dataclass
class _Held:
    """A row that the broker did not deliver: when to try it again."""

    topic: str
    tries: int
    due: float
    unclaimed: bool
    awaiting: bool = False  # the broker took it; waiting for the consumer's receipt
    reconnect: bool = False  # due now because the broker connection is new


class OutboxPublisher:
    """Publishes outbox rows on ``cloud``; its ``run`` is the body of the outbox thread."""

    def __init__(self, store: Store, cloud: Connection, *, kick: threading.Event,
                 stop: threading.Event, space: threading.Condition,
                 window: int = WINDOW, receipt_timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock  # seconds, monotonic: due times, the stop grace, episode length
        self._cloud = cloud
        self._kick = kick  # set: new rows, a verdict or a reconnect
        self._stop = stop
        self._space = space  # notified when a row is gone (the outbox has room again)
        self._window = window
        self._receipt_timeout_s = receipt_timeout_s  # None: a PUBACK deletes the row
        self._stop_seen: float | None = None
        self._down_since: float | None = None  # the cloud broker not connected since then
        self._receipted_in_flight: set[int] = set()  # confirmed before their PUBACK came
        self._lock = threading.Lock()
        self._inflight: set[int] = set()
        self._held: dict[int, _Held] = {}
        self._claimed_topics: set[str] = set()  # delivered since their last unclaimed row
        self._episode_start: float | None = None  # since when rows have been unclaimed
        self._claimed_in_episode = 0
        self._last_id = 0  # rows up to here have been published at least once by this process
        self.drain_deadline = float("inf")  # set on stop (on the clock): deliver until then

    @property
    def unclaimed(self) -> int:
        """Rows the broker last answered "no matching subscribers" for."""
        with self._lock:
            return sum(1 for h in self._held.values() if h.unclaimed)

    @property
    def awaiting_receipt(self) -> int:
        """Rows the broker took that the consumer has not confirmed yet."""
        with self._lock:
            return sum(1 for h in self._held.values() if h.awaiting)

    def receipt_delay(self, tries: int) -> float:
        """Seconds after try ``tries``'s PUBACK before the row goes out again unconfirmed."""
        assert self._receipt_timeout_s is not None
        return min(MAX_RECEIPT_WAIT_S, self._receipt_timeout_s * 2.0 ** max(0, tries - 1))

    def on_receipt(self, message_id: str) -> int:
        """The consumer filed ``message_id``: its rows are gone for good. Any thread."""
        try:
            ids = self._store.receipted(message_id)
        except DiskFull:  # kept: sent again later, and the consumer confirms it again
            log.warning("receipt_not_applied", message_id=message_id, reason="disk full")
            return 0
        if ids:
            with self._lock:
                for row_id in ids:
                    self._held.pop(row_id, None)
                    if row_id in self._inflight:
                        self._receipted_in_flight.add(row_id)
            with self._space:
                self._space.notify_all()
            self._kick.set()
        return len(ids)

    def on_receipt_message(self, topic: str, payload: bytes) -> None:
        """A message on the receipts topic: JSON ``{"v": 1, "message_id": "..."}``."""
        try:
            message_id = json.loads(payload)["message_id"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            message_id = None
        if not isinstance(message_id, str):
            log.warning("receipt_unreadable", topic=topic, bytes=len(payload),
                        fix='a receipt is JSON {"v": 1, "message_id": "..."}')
            return
        self.on_receipt(message_id)

    def reconnected(self) -> None:
        """A new connection to the cloud broker (paho's thread): the broker may have lost
        what it acked before (a crash between snapshots), so awaiting rows go out now."""
        now = self._clock()
        with self._lock:
            awaiting = [h for h in self._held.values() if h.awaiting]
            for h in awaiting:
                h.due, h.reconnect = now, True
        if awaiting:
            log.info("results_resent_after_reconnect", rows=len(awaiting),
                     note="not yet confirmed by the consumer; it drops the duplicates")
        self._kick.set()

    # -- the thread ----------------------------------------------------------------------
    def run(self) -> None:
        """Rounds until stopped and drained: each waits for a kick or the next due retry."""
        name_thread("outbox")
        while True:
            self._kick.wait(self.wait_s())
            self._kick.clear()
            if self.pump():
                return

    def pump(self) -> bool:
        """One round: publish what is due (retries first, then rows not yet sent, up to the
        window). True when stopped and there is nothing left to do."""
        if not self._cloud.connected:
            now = self._clock()
            self._down_since = now if self._down_since is None else self._down_since
            # On stop: wait for it only with rows to deliver, and only when it was up lately.
            return self._stop.is_set() and (
                self.drain_deadline < now or now - self._down_since >= DOWN_BEFORE_STOP_S
                or self._store.depths()[1] == 0)
        self._down_since = None
        self._last_id = self._publish(self._last_id)
        return self._stop.is_set() and self._drained()

    def wait_s(self) -> float:
        """How long the thread may sleep before the next retry is due (at most 1 s)."""
        with self._lock:
            due = min((h.due for i, h in self._held.items() if i not in self._inflight),
                      default=None)
        if due is None:
            return 1.0
        return min(1.0, max(0.05, due - self._clock()))

    def _drained(self) -> bool:
        """On stop: nothing left that could still go out now."""
        if self._clock() > self.drain_deadline:
            return True
        _, depth = self._store.depths()
        now = self._clock()
        if self._stop_seen is None:
            self._stop_seen = now
        with self._lock:
            awaiting = sum(1 for h in self._held.values() if h.awaiting)
            waiting_for_a_consumer = (not self._inflight and depth == awaiting + sum(
                1 for h in self._held.values() if h.unclaimed))
        if waiting_for_a_consumer and awaiting:  # receipts may still be on their way
            return now - self._stop_seen > RECEIPT_GRACE_ON_STOP_S
        return depth == 0 or waiting_for_a_consumer  # kept for the next start

    def _publish(self, last_id: int) -> int:
        now = self._clock()
        with self._lock:
            room = self._window - len(self._inflight)
            due = sorted(i for i, h in self._held.items()
                         if h.due <= now and i not in self._inflight)[:max(0, room)]
        rows = self._store.outbox_rows(due)
        with self._lock:
            for gone in set(due) - {r.id for r in rows}:
                self._forget(gone)
            overdue = sum(1 for h in (self._held.get(r.id) for r in rows)
                          if h is not None and h.awaiting and not h.reconnect)
        if overdue:
            log.warning("receipt_overdue", rows=overdue, fix="is `iomt-agent receive` "
                        "running, and may it publish on the receipts topic (the cloud "
                        "broker's ACL)? The rows go out again; the consumer drops duplicates")
        for row in rows:
            self._send(row)
        room -= len(rows)
        if room > 0:
            for row in self._store.outbox(after_id=last_id, limit=room):
                last_id = row.id
                with self._lock:
                    if row.id in self._inflight or row.id in self._held:
                        continue
                self._send(row)
        return last_id

    def _send(self, row: OutboxItem) -> None:
        with self._lock:
            self._inflight.add(row.id)
        self._cloud.publish(row.topic, row.payload, qos=1, on_done=self._verdict(row))

    # -- verdicts (paho's network thread) ------------------------------------------------
    def _verdict(self, row: OutboxItem) -> PublishDone:
        def done(verdict: Verdict) -> None:
            if verdict.delivery is Delivery.DELIVERED and self._receipt_timeout_s is not None:
                with self._lock:  # kept until the consumer's receipt
                    self._inflight.discard(row.id)
                    self._awaiting(row)
                self._kick.set()
                return
            if verdict.delivery is Delivery.DELIVERED:
                try:
                    self._store.delivered(row.id)  # before it leaves _inflight: never sent twice
                except DiskFull:  # not deleted: sent again later (the consumer drops the copy)
                    verdict = Verdict(Delivery.REFUSED, "delivered, but the disk is full")
            if verdict.delivery is Delivery.DELIVERED:
                with self._lock:
                    self._inflight.discard(row.id)
                    self._delivered(row)
                with self._space:
                    self._space.notify_all()
            else:
                with self._lock:
                    self._inflight.discard(row.id)
                    self._hold(row, verdict)
            self._kick.set()

        return done

    def _delivered(self, row: OutboxItem) -> None:
        """A consumer takes this topic now: its unclaimed rows need not wait."""
        held = self._held.pop(row.id, None)
        now = self._clock()
        if row.topic not in self._claimed_topics:  # once, not for each row of a backlog
            self._claimed_topics.add(row.topic)
            for h in self._held.values():
                if h.unclaimed and h.topic == row.topic:
                    h.due = now
        if held is not None and held.unclaimed:
            self._claimed_in_episode += 1
            self._end_episode_if_over(now)

    def _awaiting(self, row: OutboxItem) -> None:
        """The broker took the row: keep it until the consumer's receipt."""
        if row.id in self._receipted_in_flight:  # the receipt beat the PUBACK: gone
            self._receipted_in_flight.discard(row.id)
            self._delivered(row)
            return
        held = self._held.get(row.id)
        tries = held.tries + 1 if held else 1
        self._delivered(row)
        self._held[row.id] = _Held(row.topic, tries,
                                   self._clock() + self.receipt_delay(tries), False, True)

    def _hold(self, row: OutboxItem, verdict: Verdict) -> None:
        held = self._held.get(row.id)
        tries = held.tries + 1 if held else 1
        unclaimed = verdict.delivery is Delivery.UNCLAIMED
        self._held[row.id] = _Held(row.topic, tries, self._clock() + retry_delay(tries),
                                   unclaimed)
        if unclaimed:
            self._claimed_topics.discard(row.topic)
            if self._episode_start is None:
                self._episode_start = self._clock()
                self._claimed_in_episode = 0
                log.warning("result_unclaimed", kind=row.kind, topic=row.topic,
                            message_id=row.message_id, reason=verdict.reason,
                            fix="no consumer has subscribed to this topic on the cloud broker "
                            "yet: start `iomt-agent receive` (its first start creates its "
                            "persistent session); the agent keeps the rows and retries every "
                            f"{FIRST_RETRY_S:.0f} to {MAX_RETRY_S:.0f} s")
        else:
            log.warning("cloud_refused_result", outbox_id=row.id, reason=verdict.reason,
                        retry_in_s=retry_delay(tries),
                        fix="check the cloud broker's ACL for the results topic")
            if held is not None and held.unclaimed:
                self._end_episode_if_over(self._clock())

    def _forget(self, row_id: int) -> None:
        """A held row left the store (a receipt that came another way). ``on_receipt`` may
        have dropped it already."""
        self._held.pop(row_id, None)
        self._end_episode_if_over(self._clock())

    def _end_episode_if_over(self, now: float) -> None:
        if self._episode_start is None or any(h.unclaimed for h in self._held.values()):
            return
        log.info("results_claimed", rows=self._claimed_in_episode,
                 unclaimed_for_s=round(now - self._episode_start, 1))
        self._episode_start = None
