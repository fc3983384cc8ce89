"""``iomt-agent doctor``: each check against real files, a real model bundle and real
Mosquitto brokers (plain, with passwords, with TLS)."""

from __future__ import annotations

import io
import ipaddress
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import load_config
from agent.ops import doctor
from agent.ops.scaffold import InitOptions, write_directory
from tests.bundles import make_scale_bundle
from tests.conftest import Mosquitto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _closed_url() -> str:
    return f"mqtt://127.0.0.1:{_free_port()}"  # nothing listens there


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_scale_bundle(tmp_path / "bundle")


def make_node(tmp_path: Path, bundle: Path, edge: str, cloud: str, extra: str = "") -> Path:
    """An `iomt-agent init` directory with small caps (so free disk is never the issue)."""
    config = write_directory(InitOptions(directory=tmp_path / "node", edge_url=edge,
                                         cloud_url=cloud, bundle=bundle, force=True))
    text = config.read_text()
    text = text.replace("inbox_max_bytes = 2147483648", "inbox_max_bytes = 16777216")
    text = text.replace("outbox_max_bytes = 2147483648", "outbox_max_bytes = 16777216")
    for section, lines in _sections(extra).items():
        header = re.search(rf"^\[{section}\][^\n]*\n", text, re.M)
        assert header is not None, section
        text = text[:header.end()] + lines + text[header.end():]
    config.write_text(text)
    (tmp_path / "node" / "state").chmod(0o700)
    return config


def _sections(extra: str) -> dict[str, str]:
    out: dict[str, str] = {}
    section = ""
    for line in extra.strip().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line.strip():
            out[section] = out.get(section, "") + line.strip() + "\n"
    return out


def run(config: Path, timeout: float = 3.0) -> tuple[int, list[doctor.Finding], str]:
    findings, readable = doctor.run_checks(config, timeout=timeout)
    out = io.StringIO()
    doctor.render(findings, out)
    return doctor.exit_code(findings, readable), findings, out.getvalue()


def failed(findings: list[doctor.Finding]) -> list[doctor.Finding]:
    return [f for f in findings if f.verdict == "fail"]


# -- without brokers ---------------------------------------------------------------------


def test_invalid_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('[agent]\nsite = "a/b"\n')
    out = io.StringIO()
    assert doctor.main(bad, out=out) == 2
    text = out.getvalue()
    assert "FAIL" in text and "agent.site" in text and "edge: required key is missing" in text
    assert "-> fix the key named here" in text


def test_offline_node_lists_every_check(tmp_path: Path, bundle: Path) -> None:
    config = make_node(tmp_path, bundle, _closed_url(), _closed_url())
    code, findings, text = run(config)
    assert code == 1
    by_check = {f.check for f in findings}
    assert by_check == {"config", "key", "broker", "model", "disk", "deid", "security"}
    brokers = [f for f in findings if f.check == "broker"]
    assert [f.verdict for f in brokers] == ["fail", "fail"]
    assert "cannot connect to 127.0.0.1" in brokers[0].detail
    assert "check edge.url" in brokers[0].fix
    assert all(f.verdict == "ok" for f in findings if f.check != "broker"), text
    assert text.splitlines()[-1] == f"{len(findings) - 2} ok, 0 warnings, 2 failures"
    assert "-> check cloud.url" in text


def test_private_key_permissions(tmp_path: Path, bundle: Path) -> None:
    config = make_node(tmp_path, bundle, _closed_url(), _closed_url())
    key = load_config(config).seal.device_signing_key
    key.chmod(0o644)
    found = doctor.check_seal_keys(load_config(config))
    assert found[0].verdict == "fail"
    assert "group/others" in found[0].detail
    assert found[0].fix == f"chmod 600 {key}"
    key.chmod(0o600)
    assert doctor.check_seal_keys(load_config(config))[0].verdict == "ok"
    key.write_text("not a key")
    assert "PKCS#8" in doctor.check_seal_keys(load_config(config))[0].fix
    key.unlink()
    assert "not found" in doctor.check_seal_keys(load_config(config))[0].detail


def test_the_seal_cipher_is_named_with_its_reason(tmp_path: Path, bundle: Path) -> None:
    config = make_node(tmp_path, bundle, _closed_url(), _closed_url())
    [cipher] = [f for f in doctor.check_seal_keys(load_config(config))
                if f.subject == "seal.aead"]
    assert cipher.verdict == "ok" and cipher.detail.startswith("envelopes sealed with ")
    assert "seal.aead = auto: " in cipher.detail  # init leaves it at auto: why, for this CPU


def test_world_writable_config_fails(tmp_path: Path, bundle: Path) -> None:
    config = make_node(tmp_path, bundle, _closed_url(), _closed_url())
    config.chmod(0o666)
    _, found = doctor.check_config(config)
    assert found[1].verdict == "fail" and found[1].fix == f"chmod 640 {config}"


def test_model_bundle_tampered_and_golden_floor(tmp_path: Path, bundle: Path) -> None:
    config = make_node(tmp_path, bundle, _closed_url(), _closed_url())
    cfg = load_config(config)
    # a golden set the (x * 0.5) model meets, then one it misses
    x = np.random.default_rng(1).random((2, 1, 256, 256), dtype=np.float32)
    _add_golden(bundle, x, x * 0.5, floor=40.0)
    assert cfg.model.backend == "auto"  # as init writes it: the doctor says what it picks
    pinned = cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"backend": "onnxruntime"})})
    found = doctor.check_model(cfg)
    assert [f.verdict for f in found] == ["ok", "ok", "ok", "ok"]
    assert found[1].subject == "backend auto"
    assert found[1].detail.startswith("would serve onnxruntime fp32: fp32 on onnxruntime")
    assert "PSNR inf dB" in found[3].detail
    found = doctor.check_model(pinned)
    assert [f.verdict for f in found] == ["ok", "ok", "ok"]
    assert "PSNR inf dB" in found[2].detail
    _add_golden(bundle, x, x * 0.6, floor=40.0)
    for c in (cfg, pinned):
        golden = doctor.check_model(c)[-1]
        assert golden.verdict == "fail" and golden.fix.startswith("rebuild the bundle")
        assert "PSNR 20.31 dB" in golden.detail  # two decimals, as everywhere for people
        assert "does not match the golden set" in golden.detail  # an fp32 file: not the CPU
    (bundle / "model.int8.onnx").write_bytes(b"tampered")
    found = doctor.check_model(cfg)
    assert len(found) == 1 and found[0].verdict == "fail"
    assert "sha256" in found[0].detail


def _add_golden(bundle: Path, x: np.ndarray, ref: np.ndarray, floor: float) -> None:
    import hashlib
    import json

    np.savez(bundle / "golden.npz", input=x, reference_output=ref)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["golden"] = {"path": "golden.npz", "min_psnr_db": floor,
                      "sha256": hashlib.sha256((bundle / "golden.npz").read_bytes()).hexdigest()}
    (bundle / "bundle.json").write_text(json.dumps(meta))


def test_disk_caps_larger_than_free_space_warn(tmp_path: Path, bundle: Path) -> None:
    config = make_node(tmp_path, bundle, _closed_url(), _closed_url())
    text = config.read_text().replace("inbox_max_bytes = 16777216",
                                      "inbox_max_bytes = 1152921504606846976")  # 1 EiB
    config.write_text(text)
    (tmp_path / "node" / "state").chmod(0o755)
    found = doctor.check_disk(load_config(config))
    assert found[0].verdict == "warn" and "PHI" in found[0].fix
    assert found[1].verdict == "warn" and "limits.inbox_max_bytes" in found[1].fix
    shutil.rmtree(tmp_path / "node" / "state")
    assert "does not exist yet" in doctor.check_disk(load_config(config))[0].detail


# -- certificates ------------------------------------------------------------------------


class Pki:
    """A throw-away CA with a server certificate for 127.0.0.1 and client certificates."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = self._cert("Test CA", self.ca_key.public_key(), ca=True)
        self.ca_file = self._write("ca.pem", self.ca)
        self.server_cert, self.server_key = self.issue("server", server=True)

    def _cert(self, cn: str, public: ec.EllipticCurvePublicKey, *, ca: bool = False,
              server: bool = False, days: tuple[int, int] = (-1, 365)) -> x509.Certificate:
        now = datetime.now(UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer = name if ca else self.ca.subject
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer)
                   .public_key(public).serial_number(x509.random_serial_number())
                   .not_valid_before(now + timedelta(days=days[0]))
                   .not_valid_after(now + timedelta(days=days[1]))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
        return builder.sign(self.ca_key, hashes.SHA256())

    def _write(self, name: str, cert: x509.Certificate) -> Path:
        path = self.root / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, cn: str, *, server: bool = False,
              days: tuple[int, int] = (-1, 365)) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._write(f"{cn}.pem", self._cert(cn, key.public_key(), server=server,
                                                   days=days))
        key_path = self.root / f"{cn}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert, key_path


def test_certificate_validity_expiry_and_key_match(tmp_path: Path, bundle: Path) -> None:
    pki = Pki(tmp_path / "pki")
    good_cert, good_key = pki.issue("node")
    old_cert, old_key = pki.issue("old", days=(-400, -35))
    soon_cert, soon_key = pki.issue("soon", days=(-300, 10))
    config = make_node(tmp_path, bundle, _closed_url(), _closed_url())
    cfg = load_config(config)
    now = datetime.now(UTC)

    def files(**kw: object) -> list[doctor.Finding]:
        broker = cfg.edge.model_copy(update={"url": "mqtts://127.0.0.1:8883", **kw})
        return doctor.check_broker_files("edge", broker, now)

    found = files(ca_file=pki.ca_file, cert_file=good_cert, key_file=good_key)
    assert [f.verdict for f in found] == ["ok", "ok", "ok"], found
    assert "'Test CA' valid until" in found[0].detail
    assert "matches the client certificate" in found[2].detail

    expired = files(cert_file=old_cert, key_file=old_key)[0]
    assert expired.verdict == "fail" and "expired on" in expired.detail
    assert "renew" in expired.fix
    expiring = files(cert_file=soon_cert, key_file=soon_key)[0]
    assert expiring.verdict == "warn" and "in 9 days" in expiring.detail
    mismatch = files(cert_file=good_cert, key_file=old_key)[1]
    assert mismatch.verdict == "fail" and "does not belong" in mismatch.detail
    good_key.chmod(0o640)
    loose = files(cert_file=good_cert, key_file=good_key)[1]
    assert loose.verdict == "fail" and loose.fix == f"chmod 600 {good_key}"
    missing = files(ca_file=tmp_path / "nope.pem")[0]
    assert missing.verdict == "fail" and "not found" in missing.detail
    plain = doctor.check_broker_files(
        "edge", cfg.edge.model_copy(update={"ca_file": pki.ca_file}), now)
    assert plain[0].verdict == "warn" and "mqtts://" in plain[0].fix


# -- real brokers ------------------------------------------------------------------------


@pytest.fixture
def broker_with(mosquitto_factory: Callable[..., Mosquitto]) -> Callable[[str, str], Mosquitto]:
    """Mosquitto with extra listener settings (passwords, TLS)."""
    return lambda name, settings: mosquitto_factory(name, settings)


@pytest.mark.integration
def test_healthy_node_passes(tmp_path: Path, bundle: Path,
                             mosquitto_factory: Callable[[str], Mosquitto]) -> None:
    edge, cloud = mosquitto_factory("edge"), mosquitto_factory("cloud")
    config = make_node(tmp_path, bundle, edge.url, cloud.url)
    code, findings, text = run(config)
    assert code == 0, text
    assert all(f.verdict == "ok" for f in findings), text
    assert "MQTT 5 CONNECT accepted anonymously" in text


@pytest.mark.integration
def test_each_node_of_a_cluster_is_checked(tmp_path: Path, bundle: Path,
                                           mosquitto_factory: Callable[[str], Mosquitto]) -> None:
    edge, cloud = mosquitto_factory("edge"), mosquitto_factory("cloud")
    down = _closed_url()
    config = make_node(tmp_path, bundle, edge.url, cloud.url,
                       f'[cloud]\nfailover_urls = ["{down}"]\n')
    code, findings, text = run(config)
    cloud_checks = [f for f in findings if f.check == "broker" and f.subject.startswith("cloud")]
    assert [f.subject for f in cloud_checks] == [f"cloud {cloud.url}", f"cloud {down}"], text
    assert [f.verdict for f in cloud_checks] == ["ok", "fail"] and code == 1


@pytest.mark.integration
def test_broker_credentials(tmp_path: Path, bundle: Path,
                            broker_with: Callable[[str, str], Mosquitto]) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "node-1", "right"],
                   check=True, capture_output=True)
    passwd.chmod(0o644)  # mosquitto runs as this user in the test
    broker = broker_with("auth", f"allow_anonymous false\npassword_file {passwd}")
    secret = tmp_path / "edge.password"
    secret.write_text("wrong\n")
    secret.chmod(0o600)
    extra = f'[edge]\nusername = "node-1"\npassword_file = "{secret}"\n'
    config = make_node(tmp_path, bundle, broker.url, broker.url, extra)
    started = time.monotonic()
    code, findings, text = run(config, timeout=10)
    assert time.monotonic() - started < 5  # a refusal is reported at once, not at the timeout
    edge = next(f for f in findings if f.check == "broker" and f.subject.startswith("edge"))
    assert code == 1
    assert edge.verdict == "fail" and "CONNECT as 'node-1'" in edge.detail, text
    assert "password_file" in edge.fix
    cloud = next(f for f in findings if f.check == "broker" and f.subject.startswith("cloud"))
    assert cloud.verdict == "fail" and "anonymously" in cloud.detail  # anonymous refused
    secret.write_text("right\n")
    findings, _ = doctor.run_checks(config, timeout=3)
    edge = next(f for f in findings if f.check == "broker" and f.subject.startswith("edge"))
    assert edge.verdict == "ok" and "accepted as 'node-1'" in edge.detail


@pytest.mark.integration
def test_broker_tls_verification(tmp_path: Path, bundle: Path,
                                 broker_with: Callable[[str, str], Mosquitto]) -> None:
    pki = Pki(tmp_path / "pki")
    broker = broker_with("tls", f"allow_anonymous true\ncafile {pki.ca_file}\n"
                         f"certfile {pki.server_cert}\nkeyfile {pki.server_key}")
    url = f"mqtts://127.0.0.1:{broker.port}"
    config = make_node(tmp_path, bundle, url, url, f'[edge]\nca_file = "{pki.ca_file}"\n')
    findings, _ = doctor.run_checks(config, timeout=3)
    brokers = {f.subject.split()[0]: f for f in findings if f.check == "broker"}
    assert brokers["edge"].verdict == "ok", brokers
    assert "TLSv1.3" in brokers["edge"].detail
    # the cloud side has no ca_file: the system store does not know our test CA
    assert brokers["cloud"].verdict == "fail"
    assert "does not verify" in brokers["cloud"].detail
    assert "cloud.ca_file" in brokers["cloud"].fix
