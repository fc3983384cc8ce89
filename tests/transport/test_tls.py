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
from agent.transport.tls import client_context


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
