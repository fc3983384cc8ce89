"""Broker URLs and a cluster's nodes (``failover_urls``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agent.config import BrokerConfig
from agent.transport.broker_url import Nodes, host_port


def test_a_single_url_stays_valid_and_is_the_only_node() -> None:
    cfg = BrokerConfig(url="mqtt://127.0.0.1:1884")
    assert cfg.urls == ["mqtt://127.0.0.1:1884"]
    nodes = Nodes(cfg.urls)
    assert nodes.advance() is None and nodes.current == "mqtt://127.0.0.1:1884"


def test_failover_urls_are_taken_in_turn_after_url() -> None:
    cfg = BrokerConfig(url="mqtts://a.example", failover_urls=["mqtts://b.example:18883",
                                                               "mqtts://c.example"])
    nodes = Nodes(cfg.urls)
    seen = [nodes.current] + [nodes.advance() for _ in range(3)]
    assert seen == ["mqtts://a.example", "mqtts://b.example:18883", "mqtts://c.example",
                    "mqtts://a.example"]
    assert [host_port(u) for u in cfg.urls] == [("a.example", 8883), ("b.example", 18883),
                                                ("c.example", 8883)]


@pytest.mark.parametrize(("failover", "says"), [
    (["mqtt://b.example"], "differ in scheme"),  # one TLS setting for every node
    (["mqtts://b.example/path"], "failover URL 1"),
    (["mqtts://b.example", "http://c"], "failover URL 2"),
])
def test_bad_failover_urls_say_which(failover: list[str], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        BrokerConfig(url="mqtts://a.example", failover_urls=failover)


def test_a_plaintext_failover_node_off_loopback_needs_allow_plaintext() -> None:
    with pytest.raises(ValidationError, match=r"mqtt://10\.0\.0\.9 is plaintext"):
        BrokerConfig(url="mqtt://127.0.0.1", failover_urls=["mqtt://10.0.0.9"])
    ok = BrokerConfig(url="mqtt://127.0.0.1", failover_urls=["mqtt://10.0.0.9"],
                      allow_plaintext=True)
    assert len(ok.urls) == 2
