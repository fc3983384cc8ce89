"""The shipped broker configs and ACLs, proved: Mosquitto runs exactly the files that
``iomt-agent certs init`` wrote, and real MQTT 5 clients with the generated certificates try
every path of the matrix below. Each allowed path is taken (SUBACK QoS 1, PUBACK 0 or 0x10)
and each denied one refused (0x87, not authorized); clients without a valid certificate of
this CA never get a CONNACK.

``ACL_MATRIX`` is the test data; ``render_matrix()`` prints it (docs/security.md holds the
same table, and a test keeps the two equal).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.ops.certs import issue, load_ca, new_ca, write_cert, write_key
from tests.conftest import _free_port
from tests.integration.acl_client import NOT_AUTHORIZED, AclClient
from tests.integration.harness import REPO, cli
from tests.integration.pki_brokers import start_brokers, stop_brokers

pytestmark = pytest.mark.integration

SITE, DEVICE, OTHER_DEVICE, GROUP = "st-marys", "node-1", "node-2", "radiology"
ALLOW, DENY = "allowed", "denied"
IDENTITY_FILES = {  # identity -> client certificate stem under clients/
    DEVICE: f"device-{DEVICE}",
    OTHER_DEVICE: f"device-{OTHER_DEVICE}",
    "scanner-gateway": "gateway",
    "cloud-consumer": "cloud-consumer",
    "fleet-operator": "fleet-operator",
}


@dataclass(frozen=True)
class Path_:
    """One path: ``identity`` on ``broker`` publishes to ``topic``, or reads through a
    subscription to the filter ``topic`` what an identity allowed to write ``probe``
    publishes there."""

    identity: str
    broker: str  # edge | cloud
    action: str  # publish | read
    topic: str
    expected: str
    probe: str = ""

    def __str__(self) -> str:
        return f"{self.identity}-{self.broker}-{self.action}-{self.topic}-{self.probe}"


def _matrix() -> list[Path_]:
    s, d, o, g = SITE, DEVICE, OTHER_DEVICE, GROUP
    scan, fleet_g, fleet_x = f"iomt/{s}/scans/gateway", f"iomt/fleet/{g}/root.json", \
        "iomt/fleet/other-group/root.json"
    rows: list[tuple[str, ...]] = [
        # the device
        (d, "edge", "read", f"iomt/{s}/scans/#", ALLOW, scan),
        (d, "edge", "read", "#", ALLOW, scan),
        (d, "edge", "read", f"$share/{s}/iomt/{s}/scans/#", ALLOW, scan),
        (d, "edge", "read", "#", DENY, f"iomt/{s}/{o}/status"),
        (d, "edge", "publish", scan, DENY),
        (d, "edge", "publish", f"iomt/{s}/{d}/status", ALLOW),
        (d, "edge", "publish", f"iomt/{s}/{o}/status", DENY),
        (d, "edge", "publish", f"iomt/{s}/{d}/accepted", ALLOW),
        (d, "edge", "publish", f"iomt/{s}/{o}/accepted", DENY),
        (d, "cloud", "read", f"iomt/{s}/{d}/receipts", ALLOW, f"iomt/{s}/{d}/receipts"),
        (d, "cloud", "read", f"iomt/{s}/+/receipts", DENY, f"iomt/{s}/{o}/receipts"),
        (d, "cloud", "publish", f"iomt/{s}/{d}/receipts", DENY),
        (d, "cloud", "publish", f"iomt/{s}/{d}/results", ALLOW),
        (d, "cloud", "publish", f"iomt/{s}/{d}/status", ALLOW),
        (d, "cloud", "publish", f"iomt/{s}/{d}/errors", ALLOW),
        (d, "cloud", "publish", f"iomt/{s}/{o}/results", DENY),
        (d, "cloud", "publish", f"iomt/{s}/{o}/status", DENY),
        (d, "cloud", "publish", f"iomt/{s}/{o}/errors", DENY),
        (d, "cloud", "publish", scan, DENY),
        (d, "cloud", "publish", f"iomt/fleet/{g}/targets/model.tar", DENY),
        (d, "cloud", "publish", f"iomt/fleet/{g}/timestamp.json", DENY),
        (d, "cloud", "read", f"iomt/fleet/{g}/#", ALLOW, fleet_g),
        (d, "cloud", "read", "iomt/fleet/#", ALLOW, fleet_g),
        (d, "cloud", "read", "iomt/fleet/#", DENY, fleet_x),
        (d, "cloud", "read", f"iomt/{s}/{o}/results", DENY, f"iomt/{s}/{o}/results"),
        (d, "cloud", "read", f"iomt/{s}/{o}/status", DENY, f"iomt/{s}/{o}/status"),
        (d, "cloud", "read", f"iomt/{s}/+/results", DENY, f"iomt/{s}/{o}/results"),
        (d, "cloud", "read", "#", DENY, f"iomt/{s}/{o}/errors"),
        # the scanner gateway
        ("scanner-gateway", "edge", "publish", scan, ALLOW),
        ("scanner-gateway", "edge", "publish", f"iomt/{s}/scans/ct-2/series-9", ALLOW),
        ("scanner-gateway", "edge", "publish", "iomt/other-site/scans/gateway", DENY),
        ("scanner-gateway", "edge", "publish", f"iomt/{s}/{d}/status", DENY),
        ("scanner-gateway", "edge", "read", f"iomt/{s}/scans/#", DENY, scan),
        ("scanner-gateway", "edge", "read", f"iomt/{s}/+/accepted", ALLOW,
         f"iomt/{s}/{d}/accepted"),
        ("scanner-gateway", "edge", "publish", f"iomt/{s}/{d}/accepted", DENY),
        ("scanner-gateway", "cloud", "publish", f"iomt/{s}/{d}/results", DENY),
        ("scanner-gateway", "cloud", "publish", fleet_g, DENY),
        # the cloud consumer
        ("cloud-consumer", "cloud", "read", f"iomt/{s}/+/results", ALLOW, f"iomt/{s}/{d}/results"),
        ("cloud-consumer", "cloud", "read", f"iomt/{s}/+/status", ALLOW, f"iomt/{s}/{o}/status"),
        ("cloud-consumer", "cloud", "read", f"iomt/{s}/+/errors", ALLOW, f"iomt/{s}/{d}/errors"),
        ("cloud-consumer", "cloud", "read", "iomt/fleet/#", DENY, fleet_g),
        ("cloud-consumer", "cloud", "publish", f"iomt/{s}/{d}/results", DENY),
        ("cloud-consumer", "cloud", "publish", f"iomt/{s}/{d}/receipts", ALLOW),
        ("cloud-consumer", "cloud", "publish", f"iomt/other-site/{d}/receipts", DENY),
        ("cloud-consumer", "edge", "publish", f"iomt/{s}/{d}/receipts", DENY),
        ("cloud-consumer", "cloud", "publish", fleet_g, DENY),
        ("cloud-consumer", "edge", "read", f"iomt/{s}/scans/#", DENY, scan),
        # the fleet operator
        ("fleet-operator", "cloud", "publish", fleet_g, ALLOW),
        ("fleet-operator", "cloud", "publish", "iomt/fleet/other-group/targets/m.tar", ALLOW),
        ("fleet-operator", "cloud", "read", "iomt/+/+/status", ALLOW, f"iomt/{s}/{d}/status"),
        ("fleet-operator", "cloud", "read", f"iomt/{s}/+/results", DENY, f"iomt/{s}/{d}/results"),
        ("fleet-operator", "cloud", "publish", f"iomt/{s}/{d}/results", DENY),
        ("fleet-operator", "cloud", "publish", f"iomt/{s}/{d}/receipts", DENY),
        ("fleet-operator", "edge", "publish", scan, DENY),
        ("fleet-operator", "edge", "publish", fleet_g, DENY),
    ]
    return [Path_(*row) for row in rows]


def writer_for(broker: str, topic: str) -> str:
    """The identity the ACL lets write ``topic`` on ``broker`` (for read probes)."""
    if "/scans/" in topic:
        return "scanner-gateway"
    if topic.startswith("iomt/fleet/"):
        return "fleet-operator"
    if topic.endswith("/receipts"):
        return "cloud-consumer"
    return topic.split("/")[2]  # iomt/{site}/{device}/...: that device


ACL_MATRIX = _matrix()


def render_matrix() -> str:
    """The matrix as a Markdown table (identity x broker x action x topic -> outcome)."""
    lines = ["| identity (certificate CN) | broker | action | topic (read: filter -> message) "
             "| outcome |", "|---|---|---|---|---|"]
    cn = {DEVICE: DEVICE, "scanner-gateway": f"scanner-gateway@{SITE}",
          "cloud-consumer": f"cloud-consumer@{SITE}", "fleet-operator": "fleet-operator@iomt"}
    for p in ACL_MATRIX:
        topic = f"`{p.topic}` -> `{p.probe}`" if p.probe else f"`{p.topic}`"
        lines.append(f"| `{cn[p.identity]}` | {p.broker} | {p.action} | {topic} | "
                     f"{p.expected} |")
    return "\n".join(lines) + "\n"


# -- the brokers, as certs init wrote them ---------------------------------------------------


@dataclass
class Brokers:
    pki: Path
    ports: dict[str, int]
    procs: list[subprocess.Popen[bytes]]

    def client(self, identity: str, broker: str) -> AclClient:
        stem = self.pki / "clients" / IDENTITY_FILES[identity]
        return AclClient.connect(self.ports[broker], self.pki / "ca" / "ca.pem",
                                 stem.with_suffix(".pem"), stem.with_suffix(".key"),
                                 f"{identity}-{broker}")


def make_pki(directory: Path, *extra: str) -> dict[str, int]:
    ports = {"edge": _free_port(), "cloud": _free_port()}
    r = cli("certs", "init", str(directory), "--site", SITE, "--device-id", DEVICE,
            "--device-id", OTHER_DEVICE, "--fleet-group", GROUP,
            "--edge-port", str(ports["edge"]), "--cloud-port", str(ports["cloud"]), *extra)
    assert r.returncode == 0, r.stderr
    return ports


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Brokers]:
    tmp = tmp_path_factory.mktemp("acl")
    ports = make_pki(tmp / "pki")
    procs = start_brokers(tmp / "pki", tmp)
    yield Brokers(tmp / "pki", ports, procs)
    stop_brokers(procs)


# -- every path of the matrix ---------------------------------------------------------------


@pytest.mark.parametrize("path", [p for p in ACL_MATRIX if p.action == "publish"], ids=str)
def test_publish_path(brokers: Brokers, path: Path_) -> None:
    client = brokers.client(path.identity, path.broker)
    try:
        code = client.publish(path.topic)
    finally:
        client.close()
    if path.expected == ALLOW:
        assert code in (0, 0x10), hex(code)  # taken (0x10: nobody subscribed)
    else:
        assert code == NOT_AUTHORIZED, hex(code)


@pytest.mark.parametrize("path", [p for p in ACL_MATRIX if p.action == "read"], ids=str)
def test_read_path(brokers: Brokers, path: Path_) -> None:
    """Mosquitto 2.0's acl_file grants every SUBSCRIBE (SUBACK QoS 1) and checks the read
    grant on each message it would deliver, retained ones included: what a reader gets is
    the proof."""
    reader = brokers.client(path.identity, path.broker)
    writer = brokers.client(writer_for(path.broker, path.probe), path.broker)
    try:
        assert reader.subscribe(path.topic) == 1
        assert writer.publish(path.probe, f"probe {path}".encode()) in (0, 0x10)
        got = reader.wait_message(path.probe, timeout=5 if path.expected == ALLOW else 1.5)
    finally:
        reader.close()
        writer.close()
    assert got == (path.expected == ALLOW)


def test_allowed_paths_carry_messages_and_denied_ones_none(brokers: Brokers) -> None:
    """Subscriptions that were granted deliver what the allowed writers publish; the device
    gets nothing of another device even through the topics it may read."""
    device = brokers.client(DEVICE, "edge")
    device_cloud = brokers.client(DEVICE, "cloud")
    gateway = brokers.client("scanner-gateway", "edge")
    consumer = brokers.client("cloud-consumer", "cloud")
    operator = brokers.client("fleet-operator", "cloud")
    try:
        assert device.subscribe(f"iomt/{SITE}/scans/#") == 1
        assert device_cloud.subscribe(f"iomt/fleet/{GROUP}/#") == 1
        assert consumer.subscribe(f"iomt/{SITE}/+/results") == 1
        assert gateway.publish(f"iomt/{SITE}/scans/gateway", b"scan") == 0
        assert device.wait_message(f"iomt/{SITE}/scans/gateway")
        assert device_cloud.publish(f"iomt/{SITE}/{DEVICE}/results", b"sealed") == 0
        assert consumer.wait_message(f"iomt/{SITE}/{DEVICE}/results")
        assert operator.publish(f"iomt/fleet/{GROUP}/root.json", b"{}") == 0
        assert device_cloud.wait_message(f"iomt/fleet/{GROUP}/root.json")
        # Another group's fleet topic never reaches this device.
        assert operator.publish("iomt/fleet/other-group/root.json", b"{}") in (0, 0x10)
        assert not device_cloud.wait_message("iomt/fleet/other-group/root.json", timeout=1)
    finally:
        for c in (device, device_cloud, gateway, consumer, operator):
            c.close()


@pytest.mark.parametrize("broker", ["edge", "cloud"])
def test_brokers_announce_their_packet_size_limit(brokers: Brokers, broker: str) -> None:
    """max_packet_size is in force: the broker announces it in its MQTT 5 CONNACK."""
    from agent.ops.mosquitto_conf import MAX_PACKET_SIZE

    client = brokers.client(DEVICE, broker)
    client.close()
    assert client.connack.get("MaximumPacketSize") == MAX_PACKET_SIZE


def test_retained_status_reaches_only_those_who_may_read_it(brokers: Brokers) -> None:
    """A retained message is checked against the read grant when a new subscription would
    get it, as live ones are."""
    topic = f"iomt/{SITE}/{OTHER_DEVICE}/status"
    other = brokers.client(OTHER_DEVICE, "cloud")
    try:
        assert other.publish(topic, b'{"state":"online"}', retain=True) in (0, 0x10)
    finally:
        other.close()
    device, consumer = brokers.client(DEVICE, "cloud"), brokers.client("cloud-consumer", "cloud")
    try:
        assert device.subscribe("#") == 1 and consumer.subscribe(f"iomt/{SITE}/+/status") == 1
        assert consumer.wait_message(topic)
        assert not device.wait_message(topic, timeout=1.5)
    finally:
        device.close()
        consumer.close()


# -- who cannot connect at all ------------------------------------------------------------


def _refused(brokers: Brokers, cert: Path | None, key: Path | None, broker: str) -> str:
    with pytest.raises(ConnectionRefusedError) as info:
        client = AclClient.connect(brokers.ports[broker], brokers.pki / "ca" / "ca.pem",
                                   cert, key, "refused", timeout=5)
        client.close()
    return str(info.value)


@pytest.mark.parametrize("broker", ["edge", "cloud"])
def test_client_without_certificate_is_refused(brokers: Brokers, broker: str) -> None:
    _refused(brokers, None, None, broker)


@pytest.mark.parametrize("broker", ["edge", "cloud"])
def test_certificate_from_another_ca_is_refused(brokers: Brokers, broker: str,
                                                tmp_path: Path) -> None:
    ca_key, ca_cert = new_ca("an attacker's CA")
    key, cert = issue(ca_key, ca_cert, DEVICE)  # the right CN, the wrong issuer
    write_key(tmp_path / "rogue.key", key)
    write_cert(tmp_path / "rogue.pem", cert)
    _refused(brokers, tmp_path / "rogue.pem", tmp_path / "rogue.key", broker)


@pytest.mark.parametrize("broker", ["edge", "cloud"])
def test_expired_certificate_is_refused(brokers: Brokers, broker: str, tmp_path: Path) -> None:
    ca_key, ca_cert = load_ca(brokers.pki)
    past = datetime.now(UTC) - timedelta(days=30)
    key, cert = issue(ca_key, ca_cert, DEVICE, not_before=past - timedelta(days=365),
                      not_after=past)
    write_key(tmp_path / "expired.key", key)
    write_cert(tmp_path / "expired.pem", cert)
    _refused(brokers, tmp_path / "expired.pem", tmp_path / "expired.key", broker)
    # The same identity with a current certificate of this CA gets in: the refusal above
    # was the expiry, not the CN.
    key, cert = issue(ca_key, ca_cert, DEVICE)
    write_key(tmp_path / "current.key", key)
    write_cert(tmp_path / "current.pem", cert)
    AclClient.connect(brokers.ports[broker], brokers.pki / "ca" / "ca.pem",
                      tmp_path / "current.pem", tmp_path / "current.key", "current").close()


def test_docs_security_md_holds_this_matrix() -> None:
    doc = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    assert render_matrix() in doc, ("docs/security.md: paste the table printed by "
                                    "`python -m tests.integration.test_broker_acl`")


if __name__ == "__main__":
    print(render_matrix(), end="")
