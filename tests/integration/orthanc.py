"""Real peers of the DICOM bridges for the integration tests: Orthanc (Debian's `orthanc`
with `orthanc-dicomweb`) as the archive, dcmtk's `storescu` as the modality, and a
Mosquitto whose persistence survives a stop (the broker-outage test)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import mosquitto_binary

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "iomt", "archive-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"{log.name}: exited {proc.returncode}:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
    pytest.fail(f"nothing listens on {port}:\n{log.read_text()[-2000:]}")


def need(program: str, package: str) -> str:
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.fail(f"{program} is not installed: run `make test` (it installs {package}) "
                    f"or `apt-get install {package}`")
    return found


@dataclass
class Orthanc:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def get(self, path: str) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as r:  # loopback only
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_orthanc(tmp: Path) -> Orthanc:
    binary = need("Orthanc", "orthanc")
    if not DICOMWEB_PLUGIN.exists():
        pytest.fail("Orthanc's DICOMweb plugin is missing: run `make test` (it installs "
                    "orthanc-dicomweb) or `apt-get install orthanc-dicomweb`")
    port = free_port()
    storage = tmp / "orthanc-db"
    config = tmp / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "iomt-test-archive", "StorageDirectory": str(storage),
        "IndexDirectory": str(storage), "HttpPort": port, "DicomServerEnabled": False,
        "DicomPort": free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD}, "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "SaveJobs": False,
        "HttpDescribeErrors": True,
    }))
    log = tmp / "orthanc.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([binary, str(config)], stdout=f, stderr=subprocess.STDOUT)
    wait_port(port, proc, log)
    return Orthanc(port, proc, log)


@dataclass
class PersistentBroker:
    """A Mosquitto with persistence on: a stop (SIGTERM) saves its sessions and queued
    messages, a start on the same port restores them, as a production broker does."""

    port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as f:
            self.proc = subprocess.Popen([str(mosquitto_binary()), "-c", str(self.conf)],
                                         stdout=f, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def persistent_broker(tmp: Path, name: str) -> PersistentBroker:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run `make test`")
    port = free_port()
    store = tmp / f"{name}-persist"
    store.mkdir()
    conf = tmp / f"{name}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"
                    f"persistence true\npersistence_location {store}/\n"
                    "max_queued_messages 100000\nlog_dest stderr\n"
                    "log_type error\nlog_type warning\n")
    broker = PersistentBroker(port, conf, tmp / f"{name}.log")
    broker.start()
    return broker


def storescu(port: int, files: list[Path], *, calling: str, called: str = "IOMT-GW",
             timeout: float = 60) -> subprocess.Popen[str]:
    """dcmtk's storescu, verbose (it names each file and each store response)."""
    binary = need("storescu", "dcmtk")
    return subprocess.Popen([binary, "-v", "-aet", calling, "-aec", called, "127.0.0.1",
                             str(port), *map(str, files)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


_SENDING = re.compile(r"Sending file: (\S+)")
_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


def store_successes(output: str) -> list[str]:
    """The files storescu got a C-STORE success for (its -v output, in order)."""
    ok, current = [], None
    for line in output.splitlines():
        if m := _SENDING.search(line):
            current = m.group(1)
        elif (m := _RESPONSE.search(line)) and current is not None:
            if m.group(1) == "Success":
                ok.append(current)
            current = None
    return ok
