"""``iomt-agent demo --dicom``: scanner -> archive on one machine, with the real programs.

dcmtk's ``storescu`` plays the scanner, ``iomt-agent gateway`` takes its C-STOREs, two
Mosquitto brokers carry scans and results, ``iomt-agent run`` translates, ``iomt-agent
receive --stow-url`` stores the results in Orthanc (DICOMweb plugin), whose REST API then
says what it holds. Everything listens on free loopback ports; Orthanc's storage is under
the workdir. Needs the Debian packages dcmtk, mosquitto, orthanc and orthanc-dicomweb
(``make dcmtk mosquitto orthanc``).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from agent.cloud.stow import StowClient, StowSettings
from agent.demo.run import DemoError
from agent.ops.scaffold import InitOptions, write_directory

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CALLING_AE = "DEMO-SCANNER"
WAIT_S = 240.0


def _say(text: str) -> None:
    print(text, flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _program(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise DemoError(f"{name} is not installed: apt-get install {package} "
                        "(or make dcmtk mosquitto orthanc)")
    return found


def _listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise DemoError(f"{what} exited {proc.returncode}; see {log}") from None
            time.sleep(0.05)
    raise DemoError(f"{what} did not listen on port {port}; see {log}")


def _wait_log(log: Path, needle: str, count: int, proc: subprocess.Popen[bytes],
              what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if log.exists() and log.read_text(errors="replace").count(needle) >= count:
            return
        if proc.poll() is not None:
            raise DemoError(f"{what} exited {proc.returncode}; see {log}")
        time.sleep(0.1)
    raise DemoError(f"{what} did not log {needle} in time; see {log}")


def run_dicom_demo(workdir: Path, *, slices: int = 24) -> int:
    """The chain; prints each step and what Orthanc holds. 0: every instance arrived."""
    programs = {name: _program(name, pkg) for name, pkg in (
        ("storescu", "dcmtk"), ("mosquitto", "mosquitto"), ("Orthanc", "orthanc"))}
    if not DICOMWEB_PLUGIN.exists():
        raise DemoError("Orthanc's DICOMweb plugin is missing: apt-get install orthanc-dicomweb")
    workdir = workdir / "dicom-chain"  # only this subdirectory is cleared
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as f:
            p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    def agent(*args: str, log: str) -> subprocess.Popen[bytes]:
        return start([sys.executable, "-m", "agent", *args], workdir / log)

    try:
        brokers = {}
        for name in ("edge", "cloud"):
            port = _port()
            p = start([programs["mosquitto"], "-p", str(port)], workdir / f"{name}-broker.log")
            _listening(port, p, f"mosquitto ({name})", workdir / f"{name}-broker.log")
            brokers[name] = f"mqtt://127.0.0.1:{port}"
        _say(f"[1/6] Mosquitto: edge {brokers['edge']}, cloud {brokers['cloud']}")

        http = _port()
        password = secrets.token_hex(12)
        (workdir / "archive.pw").write_text(password + "\n")
        (workdir / "archive.pw").chmod(0o600)
        storage = workdir / "orthanc-storage"
        (workdir / "orthanc.json").write_text(json.dumps({
            "Name": "iomt-demo-archive", "StorageDirectory": str(storage),
            "IndexDirectory": str(storage), "HttpPort": http, "DicomServerEnabled": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {"iomt": password}, "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
        p = start([programs["Orthanc"], str(workdir / "orthanc.json")], workdir / "orthanc.log")
        _listening(http, p, "Orthanc", workdir / "orthanc.log")
        stow_url = f"http://127.0.0.1:{http}/dicom-web"
        _say(f"[2/6] Orthanc (the archive): DICOMweb at {stow_url}, user iomt")

        gw_port = _port()
        config = write_directory(InitOptions(workdir / "node", brokers["edge"],
                                             brokers["cloud"], site="demo-site",
                                             device_id="edge-1", force=True))
        text = config.read_text().replace('format = "auto"', 'format = "json"')
        config.write_text(text + f'\n[gateway]\nhost = "127.0.0.1"\nport = {gw_port}\n'
                          f'allowed_calling_ae_titles = ["{CALLING_AE}"]\n')
        receiver = agent("receive", "--config", str(config), "--out", str(workdir / "results"),
                         "--count", str(slices), "--timeout", str(WAIT_S),
                         "--stow-url", stow_url, "--stow-user", "iomt",
                         "--stow-password-file", str(workdir / "archive.pw"),
                         log="receive.log")
        run = agent("run", "--config", str(config), log="agent.log")
        _wait_log(workdir / "agent.log", '"mqtt_connected"', 2, run, "the agent")
        _say(f"[3/6] agent running ({config}); receive --stow-url waiting for results")
        gw = agent("gateway", "--config", str(config), log="gateway.log")
        _wait_log(workdir / "gateway.log", '"gateway_listening"', 1, gw, "the gateway")
        _say(f"[4/6] gateway: AE title IOMT-GW on 127.0.0.1:{gw_port}, "
             f"allows calling AE {CALLING_AE}")

        scans = workdir / "scans"
        made = subprocess.run([sys.executable, "-m", "agent", "sample", str(scans), "--count",
                               str(slices)], capture_output=True, text=True, check=False)
        if made.returncode != 0:
            raise DemoError(f"sample: {made.stderr.strip()}")
        started = time.monotonic()
        sent = subprocess.run([programs["storescu"], "-v", "-aet", CALLING_AE, "-aec",
                               "IOMT-GW", "127.0.0.1", str(gw_port),
                               *sorted(map(str, scans.glob("*.dcm")))],
                              capture_output=True, text=True, timeout=120, check=False)
        ok = len(re.findall(r"Received Store Response \(Success\)", sent.stdout + sent.stderr))
        _say(f"[5/6] storescu sent {slices} T1w slices: {ok} C-STORE successes")

        try:
            code = receiver.wait(WAIT_S + 30)
        except subprocess.TimeoutExpired:
            code = -1
        elapsed = time.monotonic() - started
        done = _event(workdir / "receive.log", "stow_done")
        _say(f"[6/6] receive: stored {done.get('stored', 0)} in Orthanc "
             f"(refused {done.get('refused', 0)}, unreachable {done.get('unreachable', 0)}); "
             f"{elapsed:.1f} s from the first C-STORE, "
             f"{elapsed / max(slices, 1) * 1000:.0f} ms per instance")
        archive = StowClient(StowSettings(url=stow_url, user="iomt",
                                          password_file=workdir / "archive.pw"))
        by_series: dict[str, list[dict[str, object]]] = {}
        for item in archive.instances():
            by_series.setdefault(_tag(item, "0020000E"), []).append(item)
        count = sum(len(v) for v in by_series.values())
        for items in by_series.values():
            _say(f"      Orthanc (QIDO-RS) series {_tag(items[0], '0008103E')!r}: "
                 f"{len(items)} instances, modality {_tag(items[0], '00080060')}")
        _say(f"      logs and files in {workdir}")
        return 0 if code == 0 and ok == slices and count == slices else 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


def _event(log: Path, name: str) -> dict[str, object]:
    for line in reversed(log.read_text(errors="replace").splitlines() if log.exists() else []):
        if f'"{name}"' in line:
            try:
                found = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(found, dict):
                return found
    return {}


def _tag(item: dict[str, object], tag: str) -> str:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return str(values[0]) if isinstance(values, list) and values else "?"
