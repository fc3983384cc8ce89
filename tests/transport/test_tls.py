"""agent.transport.tls: the one TLS client context (TLS >= 1.2, server certificate and host
name verified, client certificate for mutual TLS), against a real TLS server socket."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import BrokerConfig
from agent.ops.certs import issue, new_ca, write_cert, write_key
from agent.transport.tls import TLSFilesError, client_context


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca_key, ca = new_ca("test CA")
    write_cert(tmp_path / "ca.pem", ca)
    for name, names in (("server", ["localhost", "127.0.0.1"]), ("other", ["other.example"])):
        key, cert = issue(ca_key, ca, name, server_names=names)
        write_key(tmp_path / f"{name}.key", key)
        write_cert(tmp_path / f"{name}.pem", cert)
    key, cert = issue(ca_key, ca, "node-1")
    write_key(tmp_path / "client.key", key)
    write_cert(tmp_path / "client.pem", cert)
    return tmp_path


def _serve(pki: Path, server: str, seen: list[str]) -> Iterator[int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / f"{server}.pem", pki / f"{server}.key")
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert() or {}
                seen.append(dict(x[0] for x in peer.get("subject", ()))["commonName"])
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    listener.close()
    thread.join(5)


def test_context_is_tls12_or_newer_and_verifies_the_server(pki: Path) -> None:
    ctx = client_context(BrokerConfig(url="mqtts://localhost", ca_file=pki / "ca.pem"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_mutual_tls_handshake_presents_the_client_certificate(pki: Path) -> None:
    seen: list[str] = []
    for port in _serve(pki, "server", seen):
        cfg = BrokerConfig(url=f"mqtts://localhost:{port}", ca_file=pki / "ca.pem",
                           cert_file=pki / "client.pem", key_file=pki / "client.key")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
                client_context(cfg).wrap_socket(sock, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(b"x")
    assert seen == ["node-1"]


def test_a_server_certificate_for_another_name_is_refused(pki: Path) -> None:
    for port in _serve(pki, "other", []):
        cfg = BrokerConfig(url=f"mqtts://localhost:{port}", ca_file=pki / "ca.pem",
                           cert_file=pki / "client.pem", key_file=pki / "client.key")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
                pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            client_context(cfg).wrap_socket(sock, server_hostname="localhost")


def test_a_server_certificate_from_another_ca_is_refused(pki: Path, tmp_path: Path) -> None:
    _, rogue = new_ca("rogue CA")
    write_cert(tmp_path / "rogue-ca.pem", rogue)
    for port in _serve(pki, "server", []):
        cfg = BrokerConfig(url=f"mqtts://localhost:{port}", ca_file=tmp_path / "rogue-ca.pem")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
                pytest.raises(ssl.SSLCertVerificationError):
            client_context(cfg).wrap_socket(sock, server_hostname="localhost")


@pytest.mark.parametrize(("files", "expected"), [
    ({"ca_file": "junk.pem"}, "edge.ca_file {d}/junk.pem: holds no PEM CA certificate"),
    ({"ca_file": "missing.pem"}, "edge.ca_file {d}/missing.pem: no such file"),
    ({"ca_file": "ca.pem", "cert_file": "junk.pem", "key_file": "client.key"},
     "edge.cert_file {d}/junk.pem / key_file {d}/client.key: is not a PEM certificate and "
     "key, or the key is missing (set key_file)"),
    ({"ca_file": "ca.pem", "cert_file": "client.pem"},
     "edge.cert_file {d}/client.pem: is not a PEM certificate and key, or the key is missing "
     "(set key_file)"),
    ({"ca_file": "ca.pem", "cert_file": "client.pem", "key_file": "server.key"},
     "edge.cert_file {d}/client.pem / key_file {d}/server.key: the key in key_file does not "
     "belong to the certificate in cert_file"),
    ({"ca_file": "ca.pem", "cert_file": "client.pem", "key_file": "missing.key"},
     "edge.key_file {d}/missing.key: no such file"),
])
def test_an_unusable_file_names_its_config_key_the_file_and_what_is_wrong(
        pki: Path, files: dict[str, str], expected: str) -> None:
    """OpenSSL says "PEM lib" or KEY_VALUES_MISMATCH; the site engineer reads which key of
    which section, which file, and what to fix."""
    (pki / "junk.pem").write_text("not a certificate\n")
    cfg = BrokerConfig(url="mqtts://localhost:8883",
                       **{k: pki / v for k, v in files.items()})  # type: ignore[arg-type]
    with pytest.raises(TLSFilesError) as err:
        client_context(cfg, "edge")
    assert str(err.value) == expected.format(d=pki)
