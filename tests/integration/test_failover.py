"""``failover_urls`` with two real Mosquitto brokers standing in for a cluster's nodes: the
connection moves to the next node when its broker dies, and a publish made while no node is
reachable is delivered there (paho sends it again after the reconnect)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from agent.config import BrokerConfig
from agent.transport.mqtt import Connection, Verdict
from agent.transport.topics import Topic
from tests.conftest import Mosquitto
from tests.integration.harness import Recorder

pytestmark = pytest.mark.integration


def test_the_connection_fails_over_to_the_next_node(
    mosquitto_factory: Callable[[str], Mosquitto]
) -> None:
    a, b = mosquitto_factory("node-a"), mosquitto_factory("node-b")
    on_b = Recorder.start(b.url, "b", "t/#")
    conn = Connection(BrokerConfig(url=a.url, failover_urls=[b.url]), "failover-test",
                      name="cloud")
    conn.start()
    try:
        assert conn.wait_connected(10) and conn.url == a.url
        a.proc.kill()
        a.proc.wait(5)
        verdicts: list[Verdict] = []
        done = threading.Event()

        def got(v: Verdict) -> None:
            verdicts.append(v)
            done.set()

        conn.publish(Topic("t/1"), b"after the kill", on_done=got)  # queued while down
        assert done.wait(20), "the publish was never acknowledged"
        assert verdicts[0].ok and conn.url == b.url and conn.connected
        assert [m.payload for m in on_b.wait("t/1", 1)] == [b"after the kill"]
    finally:
        conn.stop()
        on_b.stop()
