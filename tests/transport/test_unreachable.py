"""A broker that cannot be reached: the reason is in ``last_error`` and the log, in words,
and the log does not repeat it at every retry."""

from __future__ import annotations

import socket
import ssl
import time

from structlog.testing import capture_logs

from agent.config import BrokerConfig
from agent.demo.embedded_broker import free_port
from agent.transport.hints import unreachable_reason
from agent.transport.mqtt import Connection


def test_a_closed_port_says_connection_refused_once_across_retries() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    conn = Connection(BrokerConfig(url=url), "t-unreachable", name="edge")
    with capture_logs() as logs:
        conn.start()
        try:
            deadline = time.monotonic() + 10
            # paho's second attempt comes about 3 s after the first
            while time.monotonic() < deadline and (conn._unreachable or ("", 0, 0))[2] < 2:
                time.sleep(0.05)
        finally:
            conn.stop()
    told = [e for e in logs if e["event"] == "mqtt_unreachable"]
    assert conn.last_error == f"cannot reach {url}: connection refused: nothing listens on " \
                              "that port (is the broker running?)"
    assert len(told) == 1, told
    assert told[0]["broker"] == "edge" and told[0]["failed_attempts"] == 1
    assert told[0]["reason"].startswith("connection refused")


def test_each_kind_of_failure_reads_as_what_to_check() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "self-signed certificate"
    cases = {
        verify: "TLS: the broker's certificate was refused (self-signed certificate)",
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"): "TLS handshake",
        socket.gaierror(-2, "Name or service not known"): "host name not found",
        TimeoutError("timed out"): "timed out: a firewall",
        OSError(113, "No route to host"): "no route to host",
        None: "connection failed",
    }
    for exc, start in cases.items():
        assert unreachable_reason(exc).startswith(start), (exc, unreachable_reason(exc))
