"""agent.cloud.stow and agent.cloud.export over real HTTP(S) on loopback: a small archive
(http.server) whose answers each test scripts, for what Orthanc cannot be made to do on
demand: a bearer token, a TLS client certificate, 503 then success, 409 duplicates, 400."""

from __future__ import annotations

import http.server
import io
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from agent.cloud.export import Exporter
from agent.cloud.stow import StowClient, StowSettings
from agent.ops.certs import PkiOptions, create_pki

DUPLICATE_BODY = (b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", '
                  b'"Value": [273]}}]}}')  # FailedSOPSequence, FailureReason 0x0111


@dataclass
class Archive:
    port: int
    scheme: str = "http"
    answers: list[tuple[int, bytes]] = field(default_factory=list)  # popped per POST
    seen: list[dict[str, str]] = field(default_factory=list)  # each request's headers
    bodies: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.scheme}://localhost:{self.port}/dicom-web"


@pytest.fixture
def archive_factory() -> Iterator[object]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(tls: ssl.SSLContext | None = None) -> Archive:
        state = Archive(0, "https" if tls else "http")

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                return

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                state.seen.append(dict(self.headers))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    state.bodies.append(self.rfile.read(length))
                else:  # chunked
                    data = b""
                    while (size := int(self.rfile.readline().strip(), 16)) > 0:
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    state.bodies.append(data)
                status, body = state.answers.pop(0) if state.answers else (200, b"{}")
                self._answer(status, body)

            def do_GET(self) -> None:
                state.seen.append(dict(self.headers))
                self._answer(200, b"[]")

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        state.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return state

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _instance(tmp: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    path = tmp / "out" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True)
    ds.save_as(path)
    return path


def _export(settings: StowSettings, out: Path) -> Exporter:
    exporter = Exporter(StowClient(settings), out, attempts=settings.attempts,
                        sleep=lambda _s: None)
    exporter.start()
    assert exporter.drain(30)
    exporter.stop()
    return exporter


def test_bearer_token_and_retry_after_503(tmp_path: Path, archive_factory) -> None:  # type: ignore[no-untyped-def]
    archive = archive_factory()
    archive.answers = [(503, b""), (200, b"{}")]
    path = _instance(tmp_path)
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    done = _export(StowSettings(url=archive.url, token_file=token, attempts=3), tmp_path / "out")
    assert (done.tally.stored, done.tally.unreachable) == (1, 0)
    posts = [h for h in archive.seen if "multipart/related" in h.get("Content-Type", "")]
    assert len(posts) == 2
    assert all(h["Authorization"] == "Bearer tok-123" for h in archive.seen)
    stored = pydicom.dcmread(io.BytesIO(archive.bodies[-1].split(b"\r\n\r\n", 1)[1]))
    assert stored.SOPInstanceUID == path.stem


@pytest.mark.parametrize(("answer", "kind"), [
    ((409, DUPLICATE_BODY), "duplicates"),
    ((200, DUPLICATE_BODY), "duplicates"),
    ((400, b"{}"), "refused"),
])
def test_archive_answers(tmp_path: Path, archive_factory, answer: tuple[int, bytes],  # type: ignore[no-untyped-def]
                         kind: str) -> None:
    archive = archive_factory()
    archive.answers = [answer]
    _instance(tmp_path)
    done = _export(StowSettings(url=archive.url, attempts=2), tmp_path / "out")
    assert getattr(done.tally, kind) == 1
    assert len(archive.bodies) == 1  # not sent again
    assert (done.pending() == []) == (kind == "duplicates")


def test_client_certificate(tmp_path: Path, archive_factory) -> None:  # type: ignore[no-untyped-def]
    pki = tmp_path / "pki"
    create_pki(PkiOptions(directory=pki, site="s1", device_ids=["d1"]))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki / "brokers" / "cloud.pem", pki / "brokers" / "cloud.key")
    tls.load_verify_locations(pki / "ca" / "ca.pem")
    tls.verify_mode = ssl.CERT_REQUIRED
    archive = archive_factory(tls)
    _instance(tmp_path)
    out = tmp_path / "out"
    without = _export(StowSettings(url=archive.url, ca=pki / "ca" / "ca.pem", attempts=1), out)
    assert without.tally.unreachable == 1 and archive.bodies == []
    with_cert = _export(StowSettings(
        url=archive.url, ca=pki / "ca" / "ca.pem", cert=pki / "clients" / "cloud-consumer.pem",
        key=pki / "clients" / "cloud-consumer.key", attempts=1), out)
    assert with_cert.tally.stored == 1 and len(archive.bodies) == 1


def test_flag_problems(tmp_path: Path) -> None:
    assert StowSettings(url="ftp://x").problems()[0].startswith("--stow-url")
    assert any("go together" in p for p in StowSettings(url="http://x", user="u").problems())
    assert any("no such file" in p for p in StowSettings(
        url="http://x", token_file=tmp_path / "missing").problems())


@pytest.mark.parametrize(("url", "says"), [
    ("http://", "no host name"), ("http:///dicom-web", "no host name"),
    ("http://[::1/x", "not a URL (Invalid IPv6 URL)"),
    ("http://127.0.0.1:99999/dicom-web", "not a URL (Port out of range"),
])
def test_a_malformed_archive_url_is_refused_before_any_request(url: str, says: str) -> None:
    """dicomweb-client raised a ValueError traceback for these, or retried six times."""
    [problem] = StowSettings(url=url).problems()
    assert problem.startswith(f"--stow-url {url!r}: {says}")


def test_a_stop_signal_cuts_the_retries_short_and_keeps_the_result_pending(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable archive held Ctrl-C for minutes of backoff; now the stores in flight
    get STOP_DRAIN_S and the result stays in the ledger for the next run."""
    import socket
    import time

    from agent.cloud import export

    monkeypatch.setattr(export, "STOP_DRAIN_S", 0.5)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _instance(tmp_path)
    exporter = Exporter(StowClient(StowSettings(url=f"http://127.0.0.1:{port}/dicom-web")),
                        tmp_path / "out", attempts=6)
    exporter.start()
    stop = threading.Event()
    stop.set()
    began = time.monotonic()
    assert exporter.drain(None, stop) is False
    exporter.stop()
    assert time.monotonic() - began < 3.0
    assert len(exporter.pending()) == 1  # stored by the next run
