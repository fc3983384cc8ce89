"""Plaintext MQTT to a host that is not loopback: refused by the config unless the section
says ``allow_plaintext = true``; then the agent warns loudly at start and the doctor warns."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mosquitto, _free_port
from tests.integration.harness import REFERENCE_BUNDLE, cli, spawn

pytestmark = pytest.mark.integration


def _own_address() -> str | None:
    """An address of this machine that is not loopback (no packet is sent)."""
    for target in ("10.255.255.255", "192.0.2.255"):  # any route out names the address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))
            except OSError:
                continue
            address = str(s.getsockname()[0])
            if not address.startswith("127."):
                return address
    return None


def test_plaintext_off_loopback_needs_allow_plaintext_and_is_warned_about(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> None:
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no address other than loopback")
    port = _free_port()
    # the edge broker, on an address that is not loopback
    mosquitto_factory("edge", f"allow_anonymous true\nlistener {port} {address}")
    cloud = mosquitto_factory("cloud")
    plain = f"mqtt://{address}:{port}"
    node = tmp_path / "node"
    r = cli("init", str(node), "--edge-url", plain, "--cloud-url", cloud.url,
            "--bundle", str(REFERENCE_BUNDLE))
    assert r.returncode == 2
    assert "not loopback" in r.stderr and "pass --allow-plaintext" in r.stderr

    r = cli("init", str(node), "--edge-url", plain, "--cloud-url", cloud.url,
            "--bundle", str(REFERENCE_BUNDLE), "--allow-plaintext")
    assert r.returncode == 0, r.stderr
    config = node / "agent.toml"
    text = config.read_text()
    assert text.count("allow_plaintext = true") == 1  # the edge's: the cloud is loopback
    config.write_text(text.replace('format = "auto"', 'format = "json"'))
    doctor = cli("doctor", "--config", str(config), "--timeout", "5", timeout=120)
    assert "WARN  broker" in doctor.stdout and "plaintext MQTT off loopback" in doctor.stdout
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    try:
        agent.wait_for('"mqtt_connected"', 2)
        (warning,) = agent.events("plaintext_broker")
        assert (warning["level"], warning["broker"], warning["url"]) == ("warning", "edge", plain)
    finally:
        assert agent.terminate() == 0
