"""One timed round of the benchmark: flood a contestant with scans and time the results on
the cloud broker (``Sink``), or run the raw backend alone (``raw_round``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agent.backends import ModelRunner
from agent.config import BrokerConfig
from agent.crypto.seal import peek_header
from agent.transport.mqtt import Connection, Message
from agent.transport.topics import Topic


@dataclass
class Stream:
    """Results arriving on one topic: when each distinct result first arrived."""

    key: Callable[[Message], str]  # what makes two results the same one
    arrived: dict[str, float] = field(default_factory=dict)
    order: list[float] = field(default_factory=list)


class Sink:
    """One subscriber on the cloud broker that timestamps every result and status message."""

    def __init__(self, cloud_url: str) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, Stream] = {}
        self._online: dict[str, list[float]] = {}  # status topic -> each "online" received
        self._conn: Connection | None = None
        self._url = cloud_url

    def stream(self, topic: str, key: Callable[[Message], str]) -> None:
        """Count results on ``topic`` (exact name), telling duplicates apart with ``key``."""
        self._streams[topic] = Stream(key)

    def status(self, topic: str) -> None:
        """Watch an agent's status topic for ``online``."""
        self._online[topic] = []

    def start(self) -> None:
        """Subscribe to every stream and status topic registered so far."""
        filters = tuple(Topic(t) for t in (*self._streams, *self._online))
        self._conn = Connection(BrokerConfig(url=self._url), "bench-sink", name="cloud",
                                subscriptions=filters, on_message=self._on_message)
        self._conn.start()
        if not self._conn.wait_connected(10):
            raise SystemExit("the benchmark cannot connect to its cloud broker")

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.stop()

    def _on_message(self, msg: Message) -> None:
        now = time.perf_counter()
        if msg.topic in self._online:
            if json.loads(msg.payload).get("state") == "online":
                with self._lock:
                    self._online[msg.topic].append(now)
            return
        stream = self._streams.get(msg.topic)
        if stream is None:
            return
        key = stream.key(msg)
        with self._lock:
            if key not in stream.arrived:
                stream.arrived[key] = now
                stream.order.append(now)

    def count(self, topic: str) -> int:
        with self._lock:
            return len(self._streams[topic].order)

    def arrivals(self, topic: str) -> list[float]:
        """When each distinct result on ``topic`` arrived, in arrival order."""
        with self._lock:
            return list(self._streams[topic].order)

    def wait(self, topic: str, count: int, timeout: float) -> float:
        """Wait until ``count`` distinct results have arrived on ``topic``; returns when
        the last of them arrived (perf_counter)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                order = self._streams[topic].order
                if len(order) >= count:
                    return order[count - 1]
            time.sleep(0.02)
        raise SystemExit(f"{topic}: only {self.count(topic)} of {count} results arrived")

    def wait_online(self, topic: str, after: float, timeout: float) -> float:
        """When the first status ``online`` on ``topic`` after ``after`` arrived
        (perf_counter)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                later = [t for t in self._online[topic] if t > after]
            if later:
                return later[0]
            time.sleep(0.02)
        raise SystemExit("the agent did not publish status online in time")


def envelope_id(msg: Message) -> str:
    """A sealed result's message id (its idempotency key), from the clear header."""
    return peek_header(msg.payload).message_id


@dataclass(frozen=True)
class Flood:
    """One timed flood: ``n`` scans published as fast as the broker takes them."""

    n: int
    seconds: float  # first publish -> last result received

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def flood(source: Connection, scan_topic: str, payloads: list[bytes], sink: Sink,
          result_topic: str, timeout_per_slice: float = 2.0) -> Flood:
    """Publish every payload (QoS 1) and wait for as many distinct results."""
    target = sink.count(result_topic) + len(payloads)
    t0 = time.perf_counter()
    for p in payloads:
        source.publish(scan_topic, p, qos=1)
    t_end = sink.wait(result_topic, target, timeout=10 + timeout_per_slice * len(payloads))
    return Flood(len(payloads), t_end - t0)


def raw_round(runner: ModelRunner, inputs: list[np.ndarray], n: int) -> Flood:
    """The backend alone, one slice at a time, as the agent calls it."""
    t0 = time.perf_counter()
    for i in range(n):
        runner.run(inputs[i % len(inputs)])
    return Flood(n, time.perf_counter() - t0)
