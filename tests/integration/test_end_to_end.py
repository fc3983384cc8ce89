"""The agent end to end between two real Mosquitto brokers, as subprocesses."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from agent.demo.sample_series import build_series, load_demo_slab
from tests.conftest import Mosquitto
from tests.integration.harness import REFERENCE_BUNDLE, Recorder, cli, spawn
from tests.site import site_uid

pytestmark = pytest.mark.integration

SECRET_NAME = "SECRETNAME^PHITEST"


def BUNDLE_NAME() -> str:
    return str(json.loads((REFERENCE_BUNDLE / "bundle.json").read_text())["name"])
SECRET_ID = "PHI-ID-998877"


@pytest.fixture
def brokers(mosquitto_factory: Callable[[str], Mosquitto]) -> tuple[Mosquitto, Mosquitto]:
    return mosquitto_factory("edge"), mosquitto_factory("cloud")


def _init(tmp: Path, edge: Mosquitto, cloud: Mosquitto, protocol: str = "5") -> Path:
    assert (REFERENCE_BUNDLE / "bundle.json").is_file(), "reference bundle missing: make models"
    r = cli("init", str(tmp / "node"), "--edge-url", edge.url, "--cloud-url", cloud.url,
            "--site", "site-a", "--device-id", "node-1", "--protocol", protocol,
            "--bundle", str(REFERENCE_BUNDLE))
    assert r.returncode == 0, r.stderr
    config = tmp / "node" / "agent.toml"
    text = config.read_text().replace('format = "auto"', 'format = "json"')
    config.write_text(text)
    return config


def _series(tmp: Path, n: int, **kwargs: object) -> Path:
    slab = load_demo_slab()
    reps = -(-n // slab.t1.shape[0])
    vol = np.concatenate([slab.t1] * reps)[:n]
    out = tmp / "scans"
    out.mkdir(exist_ok=True)
    for i, payload in enumerate(build_series(vol, **kwargs)):  # type: ignore[arg-type]
        (out / f"{i:03d}.dcm").write_bytes(payload)
    return out


def _receive(config: Path, tmp: Path, count: int, timeout: float = 120):  # type: ignore[no-untyped-def]
    proc = spawn(["receive", "--config", str(config), "--out", str(tmp / "results"),
                  "--count", str(count), "--timeout", str(timeout)], tmp / "receiver.log")
    proc.wait_for('"mqtt_connected"')
    time.sleep(0.5)
    return proc


def _derived(tmp: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted((tmp / "results").rglob("*.dcm"))]


def test_twenty_slices_in_twenty_verified_results_out(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    scans = _series(tmp_path, 20)
    status = Recorder.start(cloud.url, "status", "iomt/site-a/node-1/status")
    receiver = _receive(config, tmp_path, 20)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    sent = cli("send", "--config", str(config), str(scans))
    assert sent.returncode == 0, sent.stderr
    assert receiver.proc.wait(120) == 0, receiver.text()
    assert len(receiver.events("result_received")) == 20

    pseudonym = site_uid(config.parent)  # results are de-identified (the default)
    sources = {pseudonym(str(pydicom.dcmread(p).SOPInstanceUID)): pydicom.dcmread(p)
               for p in scans.iterdir()}
    out = _derived(tmp_path)
    assert len(out) == 20
    assert len({ds.SeriesInstanceUID for ds in out}) == 1
    for ds in out:
        src_uid = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        src = sources[src_uid]
        assert ds.SOPInstanceUID != src.SOPInstanceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert ds.StudyInstanceUID == pseudonym(src.StudyInstanceUID)
        assert ds.PatientIdentityRemoved == "YES"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription.upper()
        assert "SYNTHETIC" in ds.SeriesDescription.upper()
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == src_uid
        assert BUNDLE_NAME() in ds.DerivationDescription
        assert "sha256:" in ds.DerivationDescription
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 0)
        assert ds.Rows == src.Rows and ds.Columns == src.Columns
        assert list(ds.ImagePositionPatient) == list(src.ImagePositionPatient)
        assert float(ds.WindowWidth) > 0
        assert ds.pixel_array.max() > 0

    # Each of the daemon's own threads carries its name for the OS (top -H, the benchmarks'
    # per-thread CPU); only the runtime's native pool threads keep the process name.
    names = {t.read_text().strip() for t in Path(f"/proc/{agent.proc.pid}/task").glob("*/comm")}
    assert {"model", "finisher", "outbox", "mqtt-edge", "mqtt-cloud"} <= names, names

    # Retained status reflects the work; a clean stop says offline.
    assert agent.terminate() == 0
    last = json.loads(status.wait("status", 1)[-1].payload)
    assert last["state"] == "offline"
    assert last["processed"] == 20 and last["failed"] == 0
    assert last["model"]["name"] == BUNDLE_NAME()
    assert last["inbox_depth"] == 0 and last["outbox_depth"] == 0
    status.stop()
    # One log event per slice with stage timings.
    events = agent.events("slice_processed")
    assert len(events) == 20
    assert {"decode", "preprocess", "infer", "derive", "seal"} <= set(events[0]["stages_ms"])  # type: ignore[arg-type]


def test_sigkill_mid_stream_loses_nothing(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    n = 60  # enough that the kill lands mid-stream even with a fast model
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    scans = _series(tmp_path, n)
    receiver = _receive(config, tmp_path, n, timeout=240)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    assert cli("send", "--config", str(config), str(scans)).returncode == 0
    agent.wait_for('"slice_processed"', 1)
    agent.kill()  # SIGKILL: no chance to flush anything
    processed_before = len(agent.events("slice_processed"))
    assert processed_before < n, "the kill came too late to test anything"
    agent2 = spawn(["run", "--config", str(config)], tmp_path / "agent2.log")
    assert receiver.proc.wait(240) == 0, receiver.text()
    assert len({ds.SOPInstanceUID for ds in _derived(tmp_path)}) == n
    assert agent2.terminate() == 0


def _bad_payloads(tmp: Path) -> dict[str, bytes]:
    good = build_series(load_demo_slab().t1[:1])[0]
    ds = pydicom.dcmread(io.BytesIO(good))

    def encode(d: pydicom.Dataset) -> bytes:
        buf = io.BytesIO()
        d.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    no_pixels = pydicom.dcmread(io.BytesIO(good))
    del no_pixels.PixelData
    ct = pydicom.dcmread(io.BytesIO(good))
    ct.Modality = "CT"
    huge = pydicom.dcmread(io.BytesIO(good))
    huge.Rows, huge.Columns = 60000, 60000
    rng = np.random.default_rng(7)
    return {
        "not_dicom": rng.bytes(5000),
        "truncated": good[: len(good) // 3],
        "no_pixel_data": encode(no_pixels),
        "wrong_modality": encode(ct),
        "pixel_budget_exceeded": encode(huge),
        "_good": encode(ds),
    }


def test_a_full_inbox_holds_scans_with_the_broker_and_loses_none(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    """Scans queued for the agent's session while it was stopped arrive in a burst at the
    next start; a 1 MiB inbox takes about seven. The rest wait unacked with the broker
    (paho's network thread is never blocked: the connection stays up) and all 40 results
    come out."""
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    config.write_text(config.read_text().replace("inbox_max_bytes = 2147483648",
                                                 "inbox_max_bytes = 1048576"))
    first = spawn(["run", "--config", str(config)], tmp_path / "first.log")
    first.wait_for('"mqtt_connected"', 2)  # the persistent sessions exist
    assert first.terminate() == 0
    scans = _series(tmp_path, 40)
    sent = cli("send", "--config", str(config), str(scans))
    assert sent.returncode == 0, sent.stderr
    receiver = _receive(config, tmp_path, 40, timeout=180)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    assert receiver.proc.wait(200) == 0, receiver.text()[-2000:]
    assert len(receiver.events("result_received")) == 40
    assert agent.events("inbox_full"), "the burst never filled the 1 MiB inbox"
    assert agent.events("inbox_accepting")
    assert len(agent.events("mqtt_connected")) == 2 and not agent.events("mqtt_disconnected")
    assert agent.terminate() == 0


def test_malformed_payloads_go_to_the_error_topic_and_serving_goes_on(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    errors = Recorder.start(cloud.url, "errors", "iomt/site-a/node-1/errors")
    receiver = _receive(config, tmp_path, 1, timeout=90)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    payloads = _bad_payloads(tmp_path)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for name, data in payloads.items():
        (bad_dir / f"{name}.bin").write_bytes(data)
    # Bad ones first, the good one last: it must still be served.
    files = sorted(bad_dir.iterdir(), key=lambda p: p.name.startswith("_"))
    assert cli("send", "--config", str(config), *map(str, files)).returncode == 0
    assert receiver.proc.wait(90) == 0, receiver.text()
    reports = [json.loads(m.payload) for m in errors.wait("errors", 5)]
    assert agent.proc.poll() is None, "the agent must keep serving"
    reasons = {r["reason"] for r in reports}
    assert {"pixel_budget_exceeded", "no_pixel_data", "wrong_modality"} <= reasons
    assert "not_dicom" in reasons
    assert len(reports) == 5
    for r in reports:
        assert len(r["payload_sha256"]) == 64 and r["device_id"] == "node-1"
    assert agent.terminate() == 0
    # Not redelivered forever: a restart finds nothing pending.
    again = spawn(["run", "--config", str(config)], tmp_path / "agent3.log")
    again.wait_for('"agent_starting"')
    start = again.events("agent_starting")[0]
    assert start["inbox_pending"] == 0 and start["outbox_pending"] == 0
    assert again.terminate() == 0
    errors.stop()


def test_patient_name_appears_in_no_log_topic_or_error(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    on_edge = Recorder.start(edge.url, "edge-all")
    on_cloud = Recorder.start(cloud.url, "cloud-all")
    scans = _series(tmp_path, 2, patient_name=SECRET_NAME, patient_id=SECRET_ID)
    # Also a rejected scan that carries the name, to exercise the error path.
    bad = pydicom.dcmread(next(scans.iterdir()))
    bad.Modality = "CT"
    bad.SeriesDescription = f"T1 {SECRET_NAME}"
    bad.save_as(scans / "zz_bad.dcm", enforce_file_format=True)
    receiver = _receive(config, tmp_path, 2, timeout=90)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    assert cli("send", "--config", str(config), str(scans)).returncode == 0
    assert receiver.proc.wait(90) == 0, receiver.text()
    on_cloud.wait("errors", 1)
    assert agent.terminate() == 0
    # De-identified (the default), the results do not carry it either ...
    derived = _derived(tmp_path)
    assert derived and all(str(ds.PatientName) == "" for ds in derived)
    # ... and nothing else did (tests/daemon/test_phi_proof.py: also with it off).
    for secret in (SECRET_NAME, SECRET_ID, "SECRETNAME"):
        for log in (agent.text(), receiver.text()):
            assert secret not in log
        for m in on_cloud.messages + on_edge.messages:
            assert secret not in m.topic
            if "/scans/" not in m.topic:  # the input itself carries it, by design
                assert secret.encode() not in m.payload
    on_edge.stop()
    on_cloud.stop()


def test_bad_config_exits_2_naming_the_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text(
        '[agent]\nsite = "s"\ndevice_id = "d"\n'
        '[edge]\nurl = "mqtt://127.0.0.1:1883"\nprotcol = "5"\n'
        '[cloud]\nurl = "http://example"\n'
        '[model]\nbundle = "x"\n'
        '[seal]\nrecipient_public_key = "a"\ndevice_signing_key = "b"\n'
    )
    for args in (["run", "--config", str(bad)], ["config", "check", str(bad)]):
        r = cli(*args)
        assert r.returncode == 2, r
        assert "edge.protcol" in r.stderr and "unknown key" in r.stderr
        assert "cloud.url" in r.stderr and "mqtt://host[:port]" in r.stderr


def test_mqtt_311_sessions_against_mosquitto(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud, protocol="3.1.1")
    scans = _series(tmp_path, 3)
    receiver = _receive(config, tmp_path, 3, timeout=90)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    assert cli("send", "--config", str(config), str(scans)).returncode == 0
    assert receiver.proc.wait(90) == 0, receiver.text()
    assert len(_derived(tmp_path)) == 3
    assert agent.terminate() == 0


def test_receive_rejects_forged_and_tampered_results_and_keeps_running(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    from agent.config import BrokerConfig
    from agent.crypto import keys, seal
    from agent.transport.mqtt import Connection

    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    keydir = config.parent / "keys"
    device = keys.load_signing_key(keydir / "device-signing.key")
    recipient = keys.load_recipient_public_key(keydir / "cloud-recipient.pub")
    dicom = build_series(load_demo_slab().t1[:1])[0]

    def envelope(signer=device, to=recipient, mid="m-1"):  # type: ignore[no-untyped-def]
        return seal.seal(dicom, recipient=to, signing_key=signer, device_id="node-1",
                         message_id=mid)

    good = envelope()
    tampered = bytearray(good)
    tampered[len(good) // 2] ^= 0x01
    _, stranger = keys.generate_recipient_keypair()
    receiver = _receive(config, tmp_path, 1, timeout=60)
    pub = Connection(BrokerConfig(url=cloud.url), "forger", name="cloud")
    pub.start()
    assert pub.wait_connected(10)
    topic = "iomt/site-a/node-1/results"
    for payload in (b"not an envelope", bytes(tampered),
                    envelope(signer=keys.generate_signing_key(), mid="m-2"),
                    envelope(to=stranger, mid="m-3"), good, good):
        pub.publish(topic, payload, qos=1)
    assert receiver.proc.wait(60) == 0, receiver.text()
    pub.stop()
    reasons = [e["reason"] for e in receiver.events("result_rejected")]
    assert reasons == ["malformed", "bad_signature", "bad_signature", "unknown_recipient"]
    assert len(_derived(tmp_path)) == 1
