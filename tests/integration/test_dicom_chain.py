"""The whole chain with real programs: dcmtk's storescu -> `iomt-agent gateway` -> Mosquitto
-> `iomt-agent run` -> Mosquitto -> `iomt-agent receive --stow-url` -> Orthanc (DICOMweb).

Along the way the edge broker is stopped for a while and the gateway is SIGKILLed in the
middle of an association: every instance that storescu got a C-STORE success for must
arrive in Orthanc, once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from tests.conftest import Mosquitto
from tests.integration.harness import REFERENCE_BUNDLE, Proc, cli, spawn
from tests.integration.orthanc import (
    PASSWORD,
    USER,
    Orthanc,
    free_port,
    persistent_broker,
    start_orthanc,
    store_successes,
    storescu,
)
from tests.site import site_uid

pytestmark = pytest.mark.integration

SLICES = 24
CALLING = "MRI-SCANNER-1"


def _config(tmp: Path, edge_url: str, cloud_url: str, port: int) -> Path:
    r = cli("init", str(tmp / "node"), "--edge-url", edge_url, "--cloud-url", cloud_url,
            "--site", "site-a", "--device-id", "node-1", "--bundle", str(REFERENCE_BUNDLE))
    assert r.returncode == 0, r.stderr
    config = tmp / "node" / "agent.toml"
    text = config.read_text().replace('format = "auto"', 'format = "json"')
    text += (f'\n[gateway]\nhost = "127.0.0.1"\nport = {port}\n'
             f'allowed_calling_ae_titles = ["{CALLING}"]\nack_timeout_s = 2.0\n')
    config.write_text(text)
    return config


def _gateway(config: Path, tmp: Path) -> Proc:
    gw = spawn(["gateway", "--config", str(config)], tmp / "gateway.log")
    gw.wait_for('"gateway_listening"', gw.text().count('"gateway_listening"') + 1)
    return gw


def _kill_after(gw: Proc, needle: str, count: int, timeout: float = 30) -> None:
    """SIGKILL the gateway as soon as its log has ``count`` ``needle`` lines."""
    deadline = time.monotonic() + timeout
    while gw.text().count(needle) < count:
        assert time.monotonic() < deadline, gw.text()[-2000:]
        time.sleep(0.002)
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)


def _send(port: int, files: list[Path]) -> tuple[list[str], str]:
    p = storescu(port, files, calling=CALLING)
    out, _ = p.communicate(timeout=60)
    return store_successes(out), out


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    archive = start_orthanc(tmp_path)
    yield archive
    archive.stop()


def test_storescu_to_orthanc_through_gateway_agent_and_stow(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto], orthanc: Orthanc
) -> None:
    edge = persistent_broker(tmp_path, "edge")
    cloud = mosquitto_factory("cloud")
    gw_port = free_port()
    config = _config(tmp_path, edge.url, cloud.url, gw_port)
    assert cli("sample", str(tmp_path / "scans"), "--count", str(SLICES)).returncode == 0
    files = sorted((tmp_path / "scans").glob("*.dcm"))
    (tmp_path / "archive-password").write_text(PASSWORD + "\n")
    procs: list[Proc] = []
    try:
        agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
        procs.append(agent)
        receiver = spawn(["receive", "--config", str(config), "--out", str(tmp_path / "results"),
                          "--count", str(SLICES), "--timeout", "240",
                          "--stow-url", orthanc.dicomweb, "--stow-user", USER,
                          "--stow-password-file", str(tmp_path / "archive-password")],
                         tmp_path / "receiver.log")
        procs.append(receiver)
        agent.wait_for('"mqtt_connected"', 2, timeout=120)
        gw = _gateway(config, tmp_path)
        procs.append(gw)
        started = time.monotonic()

        # 1. broker up: acked by the broker before each success
        ok1, out = _send(gw_port, files[:8])
        assert len(ok1) == 8, out
        # 2. broker stopped: C-STORE goes on, into the gateway's spool
        edge.stop()
        ok2, out = _send(gw_port, files[8:16])
        assert len(ok2) == 8, out
        # 3. still down: the gateway is SIGKILLed in the middle of an association
        # (a modality resending: each file 8 times, so the association lasts long enough)
        resend = files[16:] * 8
        sending = storescu(gw_port, resend, calling=CALLING)
        _kill_after(gw, '"cstore_accepted"', 19)
        out, _ = sending.communicate(timeout=60)
        ok3 = store_successes(out)
        assert len(ok3) < len(resend), f"the kill did not cut the association:\n{out}"
        spooled = gw.text().count('"outcome": "spooled"')
        # 4. broker back, gateway restarted: its spool drains from disk; the modality sends
        # again what it got no success for (here: the whole rest of the series)
        edge.start()
        gw = _gateway(config, tmp_path)
        procs.append(gw)
        ok4, out = _send(gw_port, files[16:])
        assert len(ok4) == SLICES - 16, out

        assert receiver.proc.wait(240) == 0, receiver.text()[-3000:]
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.terminate()
        edge.stop()
    succeeded = {str(Path(f).resolve()) for f in ok1 + ok2 + ok3 + ok4}
    assert len(succeeded) == SLICES
    assert spooled >= 8 + len(ok3)
    assert "left_in_spool" in gw.text() and '"left_in_spool": 0' in gw.text()

    # Orthanc has the one derived series, every source that got a success, once each.
    pseudonym = site_uid(config.parent)
    expected = {pseudonym(str(pydicom.dcmread(f).SOPInstanceUID)) for f in succeeded}
    series_ids = orthanc.get("/series")
    assert isinstance(series_ids, list) and len(series_ids) == 1
    series = orthanc.get(f"/series/{series_ids[0]}")
    assert isinstance(series, dict)
    assert len(series["Instances"]) == SLICES
    tags = series["MainDicomTags"]
    assert tags["Modality"] == "MR"
    assert "NOT FOR DIAGNOSTIC USE" in tags["SeriesDescription"].upper()
    sources, numbers = set(), set()
    for instance in series["Instances"]:
        t = orthanc.get(f"/instances/{instance}/tags?simplify")
        assert isinstance(t, dict)
        assert t["PatientIdentityRemoved"] == "YES"
        assert t["ImageType"].startswith("DERIVED\\SECONDARY")
        sources.add(t["SourceImageSequence"][0]["ReferencedSOPInstanceUID"])
        numbers.add(int(t["InstanceNumber"]))
    assert sources == expected
    assert numbers == set(range(1, SLICES + 1))

    done = receiver.events("stow_done")
    assert done and done[-1]["refused"] == 0 and done[-1]["unreachable"] == 0
    stored = done[-1]["stored"]
    assert isinstance(stored, int) and stored + int(done[-1]["duplicates"]) == SLICES  # type: ignore[call-overload]
    print(f"\nchain: {SLICES} instances sent ({len(ok1 + ok2 + ok3 + ok4)} C-STORE successes, "
          f"{len(ok3)} before the SIGKILL, {spooled} spooled), {len(series['Instances'])} in "
          f"Orthanc, {len(sources)} verified by source; {elapsed:.1f} s, "
          f"{elapsed / SLICES * 1000:.0f} ms per instance")
