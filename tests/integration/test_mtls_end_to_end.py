"""The agent end to end over mutual TLS: ``certs init`` makes the PKI and both brokers'
configs, Mosquitto runs them as they are, ``init --certs`` writes the node's config, and
scans sent as the scanner gateway come back through ``receive`` as the cloud consumer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _free_port
from tests.integration.harness import REFERENCE_BUNDLE, cli, spawn
from tests.integration.pki_brokers import start_brokers, stop_brokers
from tests.integration.test_end_to_end import _series

pytestmark = pytest.mark.integration

SITE, DEVICE = "st-marys", "node-1"


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Path]:
    edge, cloud = _free_port(), _free_port()
    r = cli("certs", "init", str(tmp_path / "pki"), "--site", SITE, "--device-id", DEVICE,
            "--edge-port", str(edge), "--cloud-port", str(cloud))
    assert r.returncode == 0, r.stderr
    procs = start_brokers(tmp_path / "pki", tmp_path)
    yield tmp_path / "pki"
    stop_brokers(procs)


def test_scans_in_and_results_out_over_mutual_tls(tmp_path: Path, pki: Path) -> None:
    r = cli("init", str(tmp_path / "node"), "--certs", str(pki), "--bundle",
            str(REFERENCE_BUNDLE))
    assert r.returncode == 0, r.stderr
    config = tmp_path / "node" / "agent.toml"
    config.write_text(config.read_text().replace('format = "auto"', 'format = "json"'))
    clients = pki / "clients"
    doctor = cli("doctor", "--config", str(config), "--timeout", "10", timeout=120)
    assert "MQTT 5 CONNECT accepted with the client certificate" in doctor.stdout, doctor.stdout

    consumer = ["--cert", str(clients / "cloud-consumer.pem"),
                "--key", str(clients / "cloud-consumer.key")]
    receiver = spawn(["receive", "--config", str(config), "--out", str(tmp_path / "results"),
                      "--count", "3", "--timeout", "180", *consumer], tmp_path / "receiver.log")
    receiver.wait_for('"mqtt_connected"')
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    scans = _series(tmp_path, 3)

    # As the device, send is refused: only the gateway may publish scans (PUBACK 0x87).
    as_device = cli("send", "--config", str(config), "--timeout", "10", str(scans))
    assert as_device.returncode == 1, as_device.stdout + as_device.stderr
    assert '"scans_refused"' in as_device.stderr and "Not authorized" in as_device.stderr

    sent = cli("send", "--config", str(config), "--cert", str(clients / "gateway.pem"),
               "--key", str(clients / "gateway.key"), str(scans))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert receiver.proc.wait(180) == 0, receiver.text()
    assert len(receiver.events("result_received")) == 3
    assert len(list((tmp_path / "results").rglob("*.dcm"))) == 3
    assert agent.terminate() == 0
    assert "plaintext_broker" not in agent.text()
