"""Fleet updates over mutual TLS with the shipped broker files: ``certs init`` makes the PKI
and the brokers' configs and ACLs, Mosquitto runs them as they are, and the node (``init
--certs``) reads its group's fleet topics with its device certificate. ``fleet publish``
with the device's certificate is refused by the ACL (nothing retained, the node takes
nothing); with the fleet operator's it publishes, the node activates the release, and
``fleet status`` (the operator's certificate) shows it. With a CA that did not sign the
broker's certificate, nothing connects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bundles import make_context_bundle
from tests.conftest import _free_port
from tests.integration.harness import cli, spawn
from tests.integration.pki_brokers import start_brokers, stop_brokers

pytestmark = pytest.mark.integration

SITE, DEVICE, GROUP = "st-marys", "node-1", "radiology"


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Path]:
    r = cli("certs", "init", str(tmp_path / "pki"), "--site", SITE, "--device-id", DEVICE,
            "--fleet-group", GROUP, "--edge-port", str(_free_port()),
            "--cloud-port", str(_free_port()))
    assert r.returncode == 0, r.stderr
    procs = start_brokers(tmp_path / "pki", tmp_path)
    yield tmp_path / "pki"
    stop_brokers(procs)


def test_only_the_operator_certificate_publishes_and_the_node_updates_over_mtls(
        tmp_path: Path, pki: Path) -> None:
    repo = tmp_path / "repo"
    assert cli("fleet", "init-repo", str(repo)).returncode == 0
    def bundle(version: str) -> Path:  # the tests' smallest: 32 x 32, fp32, one conv
        root = make_context_bundle(tmp_path / f"bundle-{version}", [2.0], name="test-flat")
        meta = json.loads((root / "bundle.json").read_text())
        meta["version"] = version
        (root / "bundle.json").write_text(json.dumps(meta))
        return root

    r = cli("init", str(tmp_path / "node"), "--certs", str(pki), "--bundle",
            str(bundle("1.0.0")), "--fleet-group", GROUP, "--fleet-root",
            str(repo / "root.json"))
    assert r.returncode == 0, r.stderr
    config = tmp_path / "node" / "agent.toml"
    config.write_text(config.read_text().replace('format = "auto"', 'format = "json"'))
    cloud = f"mqtts://localhost:{json.loads((pki / 'pki.json').read_text())['ports']['cloud']}"
    clients = pki / "clients"

    def tls(who: str) -> list[str]:
        return ["--broker", cloud, "--ca", str(pki / "ca" / "ca.pem"),
                "--cert", str(clients / f"{who}.pem"), "--key", str(clients / f"{who}.key")]

    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 3)  # edge, cloud and fleet: all with the device cert
    publish = ["fleet", "publish", "--repo", str(repo), "--group", GROUP, "--timeout", "20"]

    # The device's certificate: the cloud broker refuses every fleet message (0x87).
    as_device = cli(*publish, "--bundle", str(bundle("6.6.6")),
                    *tls(f"device-{DEVICE}"), timeout=120)
    assert as_device.returncode == 1, as_device.stdout + as_device.stderr
    assert "the broker refused" in as_device.stderr
    assert "Not authorized" in as_device.stderr

    # The operator's certificate, but a CA that did not sign the broker's: no connection.
    wrong_ca = [*tls("fleet-operator")]
    wrong_ca[wrong_ca.index("--ca") + 1] = str(clients / "fleet-operator.pem")
    broker_log = tmp_path / "cloud-broker.log"
    assert "unknown ca" not in broker_log.read_text()
    unverified = cli("fleet", "publish", "--repo", str(repo), "--group", GROUP, "--timeout",
                     "3", "--bundle", str(bundle("6.6.7")), *wrong_ca, timeout=120)
    assert unverified.returncode == 1, unverified.stdout + unverified.stderr
    assert "cannot reach the broker" in unverified.stderr
    # The broker saw the client abort the handshake: our side refused its certificate.
    assert "tlsv1 alert unknown ca" in broker_log.read_text()

    # The operator's: published, and the node verifies and activates it over mTLS.
    as_operator = cli(*publish, "--bundle", str(bundle("2.0.0")),
                      *tls("fleet-operator"), timeout=120)
    assert as_operator.returncode == 0, as_operator.stderr
    agent.wait_for('"update_active"')
    assert agent.events("update_active")[-1]["version"] == "2.0.0"
    table = cli("fleet", "status", "--group", GROUP, "--quiet", "0.5", *tls("fleet-operator"))
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if x.startswith(f"{SITE}/{DEVICE}"))
    assert "2.0.0" in line and "active" in line, table.stdout
    # Nothing of the refused publish reached the node.
    assert "6.6.6" not in agent.text()
    assert agent.terminate() == 0
    assert "plaintext_broker" not in agent.text()
