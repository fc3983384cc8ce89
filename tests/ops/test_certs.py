"""``iomt-agent certs init`` (agent.ops.certs, agent.ops.mosquitto_conf) and
``iomt-agent init --certs``; the doctor's plaintext warning."""

from __future__ import annotations

import ipaddress
import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.cli import main
from agent.config import BrokerConfig, load_config
from agent.ops.check_files import check_broker_files
from tests.bundles import make_scale_bundle

SITE = "st-marys"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scale_bundle(tmp_path_factory.mktemp("bundle") / "scale")


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    rc = main(["certs", "init", str(tmp_path / "pki"), "--site", SITE, "--device-id", "node-1",
               "--device-id", "node-2", "--hostname", "edge.hospital.example",
               "--hostname", "10.1.2.3", "--edge-port", "18883", "--cloud-port", "18884",
               "--fleet-group", "radiology"])
    assert rc == 0
    return tmp_path / "pki"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_every_private_key_is_0600_and_every_certificate_chains_to_the_ca(pki: Path) -> None:
    keys = sorted(pki.rglob("*.key"))
    assert len(keys) == 1 + 2 + 5  # CA, two brokers, two devices + gateway, cloud, operator
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = _cert(pki / "ca" / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.now(UTC)
    for pem in [*pki.glob("brokers/*.pem"), *pki.glob("clients/*.pem")]:
        cert = _cert(pem)
        cert.verify_directly_issued_by(ca)
        assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_broker_certificates_name_loopback_and_each_hostname(pki: Path) -> None:
    for broker in ("edge", "cloud"):
        cert = _cert(pki / "brokers" / f"{broker}.pem")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["localhost", "edge.hospital.example"]
        assert san.get_values_for_type(x509.IPAddress) == [
            ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
            ipaddress.ip_address("10.1.2.3")]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_client_certificates_carry_the_identity_as_cn(pki: Path) -> None:
    cns = {p.stem: _cn(_cert(p)) for p in pki.glob("clients/*.pem")}
    assert cns == {"device-node-1": "node-1", "device-node-2": "node-2",
                   "gateway": f"scanner-gateway@{SITE}",
                   "cloud-consumer": f"cloud-consumer@{SITE}",
                   "fleet-operator": "fleet-operator@iomt"}
    eku = _cert(pki / "clients" / "gateway.pem").extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_mosquitto_configs_require_certificates_and_use_the_acl(pki: Path) -> None:
    for broker, port in (("edge", 18883), ("cloud", 18884)):
        conf = (pki / "mosquitto" / f"{broker}.conf").read_text()
        for line in ("allow_anonymous false", "require_certificate true",
                     "use_identity_as_username true", "tls_version tlsv1.2",
                     "persistence true", f"acl_file {pki.resolve()}/mosquitto/{broker}.acl",
                     f"persistence_location {pki.resolve()}/mosquitto/{broker}-data/",
                     f"listener {port}\n", "max_packet_size ", "max_queued_messages ",
                     "max_queued_bytes "):
            assert line in conf, (broker, line)
        assert (pki / "mosquitto" / f"{broker}-data").is_dir()
    edge_acl = (pki / "mosquitto" / "edge.acl").read_text()
    assert f"user node-1\ntopic read iomt/{SITE}/scans/#\n" in edge_acl
    assert f"user scanner-gateway@{SITE}\ntopic write iomt/{SITE}/scans/#\n" in edge_acl
    assert "cloud-consumer" not in edge_acl and "fleet-operator" not in edge_acl
    cloud_acl = (pki / "mosquitto" / "cloud.acl").read_text()
    assert "topic read iomt/fleet/radiology/#" in cloud_acl
    assert "scanner-gateway" not in cloud_acl


def test_loopback_only_pki_listens_on_loopback_only(tmp_path: Path) -> None:
    assert main(["certs", "init", str(tmp_path / "p"), "--site", SITE,
                 "--device-id", "n1"]) == 0
    assert "listener 8883 127.0.0.1\n" in (tmp_path / "p/mosquitto/edge.conf").read_text()


@pytest.mark.parametrize(("flags", "needle"), [
    (["--site", "a/b", "--device-id", "n"], "--site"),
    (["--site", "s", "--device-id", "n+"], "--device-id"),
    (["--site", "s", "--device-id", "n", "--device-id", "n"], "each device once"),
    (["--site", "s", "--device-id", "n", "--edge-port", "9", "--cloud-port", "9"], "differ"),
    (["--site", "s", "--device-id", "n", "--edge-port", "70000"], "--edge-port"),
    (["--site", "s", "--device-id", "n", "--fleet-group", "#"], "--fleet-group"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path: Path, flags: list[str], needle: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", str(tmp_path / "p"), *flags]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # nothing written for a bad flag


def test_existing_pki_is_kept_unless_forced(pki: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ca = (pki / "ca" / "ca.pem").read_bytes()
    assert main(["certs", "init", str(pki), "--site", SITE, "--device-id", "node-1"]) == 1
    assert "--force" in capsys.readouterr().err
    assert (pki / "ca" / "ca.pem").read_bytes() == ca
    assert main(["certs", "init", str(pki), "--site", SITE, "--device-id", "node-1",
                 "--force"]) == 0
    assert (pki / "ca" / "ca.pem").read_bytes() != ca


def test_init_with_certs_writes_a_mutual_tls_config(pki: Path, bundle: Path,
                                                    tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "node"), "--certs", str(pki), "--device-id", "node-2",
                 "--bundle", str(bundle)]) == 0
    config = load_config(tmp_path / "node" / "agent.toml")
    assert (config.agent.site, config.agent.device_id) == (SITE, "node-2")
    assert config.edge.url == "mqtts://localhost:18883"
    assert config.cloud.url == "mqtts://localhost:18884"
    for broker in (config.edge, config.cloud):
        assert broker.tls and not broker.allow_plaintext
        assert broker.ca_file == (pki / "ca" / "ca.pem").resolve()
        assert broker.cert_file == (pki / "clients" / "device-node-2.pem").resolve()
        assert broker.key_file == (pki / "clients" / "device-node-2.key").resolve()
    manifest = json.loads((pki / "pki.json").read_text())
    assert manifest["devices"] == ["node-1", "node-2"]


@pytest.mark.parametrize(("flags", "needle"), [
    (["--device-id", "node-9"], "node-1, node-2"),
    (["--site", "elsewhere"], "is for site st-marys"),
    (["--edge-url", "mqtt://localhost:1883"], "use mqtts://"),
])
def test_init_with_certs_refuses_what_the_pki_does_not_cover(
        pki: Path, bundle: Path, tmp_path: Path, flags: list[str], needle: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "node"), "--certs", str(pki), "--bundle",
                 str(bundle), *flags]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "node" / "agent.toml").exists()


def test_init_with_a_directory_that_is_not_a_pki(tmp_path: Path, bundle: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "node"), "--certs", str(tmp_path), "--bundle",
                 str(bundle)]) == 2
    assert "certs init" in capsys.readouterr().err


def test_doctor_warns_about_allowed_plaintext_off_loopback() -> None:
    now = datetime.now(UTC)
    found = check_broker_files("edge", BrokerConfig(url="mqtt://gw.hospital:1883",
                                                    allow_plaintext=True), now)
    assert [(f.verdict, f.subject) for f in found] == [("warn", "edge.url")]
    assert "unencrypted" in found[0].detail and "mqtts://" in found[0].fix
    assert check_broker_files("edge", BrokerConfig(url="mqtt://127.0.0.1:1883"), now) == []


@pytest.mark.parametrize(("command", "flags", "needle"), [
    ("send", ["--key", "k.pem", "x.dcm"], "--key needs --cert"),
    ("send", ["--cert", "c.pem", "x.dcm"], "edge.url is not mqtts://"),
    ("receive", ["--out", "out", "--cert", "c.pem"], "cloud.url is not mqtts://"),
])
def test_identity_flags_refuse_what_would_be_ignored(
        tmp_path: Path, bundle: Path, command: str, flags: list[str], needle: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "node"), "--edge-url", "mqtt://127.0.0.1:1",
                 "--cloud-url", "mqtt://127.0.0.1:2", "--bundle", str(bundle)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(tmp_path / "node" / "agent.toml"), *flags])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
