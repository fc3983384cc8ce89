"""`iomt-agent gateway` against dcmtk's echoscu / storescu and a real Mosquitto: the
allow-list, C-ECHO, what reaches the scan topic, and the refusals a modality sees."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import Mosquitto
from tests.integration.harness import REFERENCE_BUNDLE, Recorder, cli, spawn
from tests.integration.orthanc import free_port, need, store_successes, storescu

pytestmark = pytest.mark.integration

CALLING = "CT-SCANNER-2"


def _echo(port: int, calling: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("echoscu", "dcmtk"), "-aet", calling, "-aec", "IOMT-GW",
                           "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30)


def test_gateway_with_dcmtk(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> None:
    edge = mosquitto_factory("edge")
    port = free_port()
    r = cli("init", str(tmp_path / "node"), "--edge-url", edge.url, "--cloud-url", edge.url,
            "--site", "site-a", "--device-id", "node-1", "--bundle", str(REFERENCE_BUNDLE))
    assert r.returncode == 0, r.stderr
    config = tmp_path / "node" / "agent.toml"
    text = re.sub(r"(?m)^max_payload_bytes = .*$", "max_payload_bytes = 100000",
                  config.read_text().replace('format = "auto"', 'format = "json"'))
    assert "max_payload_bytes = 100000" in text
    config.write_text(text + f'\n[gateway]\nhost = "127.0.0.1"\nport = {port}\n'
                      f'allowed_calling_ae_titles = ["{CALLING}"]\n'
                      'sop_classes = ["CTImageStorage"]\nmax_associations = 1\n')
    ct = tmp_path / "ct.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), ct)  # 39 kB, CT Image Storage
    assert cli("sample", str(tmp_path / "mr"), "--count", "1").returncode == 0
    mr = next((tmp_path / "mr").glob("*.dcm"))  # MR Image Storage, 133 kB
    big_ct = tmp_path / "big_ct.dcm"  # CT, over limits.max_payload_bytes
    ds = pydicom.dcmread(ct)
    ds.private_block(0x0009, "IOMT TEST", create=True).add_new(0x10, "OB", b"\0" * 80000)
    ds.save_as(big_ct)

    scans = Recorder.start(edge.url, "scans", "iomt/site-a/scans/#")
    gw = spawn(["gateway", "--config", str(config)], tmp_path / "gateway.log")
    try:
        gw.wait_for('"gateway_listening"')
        assert _echo(port, CALLING).returncode == 0
        refused = _echo(port, "UNKNOWN-AE")
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        # gateway.max_associations = 1: while one association is open, another is refused
        holder = subprocess.Popen([need("echoscu", "dcmtk"), "-aet", CALLING, "-aec",
                                   "IOMT-GW", "--repeat", "1000000", "127.0.0.1", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            gw.wait_for('"cecho"', 10)
            second = _echo(port, CALLING)
        finally:
            holder.terminate()
            holder.wait(10)
        assert second.returncode != 0
        assert "Local Limit Exceeded" in second.stdout + second.stderr
        deadline = time.monotonic() + 10  # the holder's association is gone: room again
        while _echo(port, CALLING).returncode != 0:
            assert time.monotonic() < deadline, gw.text()[-2000:]
            time.sleep(0.1)

        p = storescu(port, [ct, big_ct], calling=CALLING)
        out, _ = p.communicate(timeout=60)
        assert store_successes(out) == [str(ct)], out
        assert "Received Store Response (Refused: OutOfResources)" in out, out
        got = scans.wait("/scans/gateway", 1)
        assert got[0].payload[128:132] == b"DICM" and got[0].qos == 1
        assert pydicom.dcmread(io.BytesIO(got[0].payload)).SOPInstanceUID == (
            ds.SOPInstanceUID)

        # MR is not in gateway.sop_classes: its presentation context is not accepted
        p = storescu(port, [mr], calling=CALLING)
        out, _ = p.communicate(timeout=60)
        assert store_successes(out) == [], out
        assert len(scans.on("/scans/gateway")) == 1

        # A second gateway on this config fails on the port before its CONNECT (the same
        # client id) could knock the running one off the broker.
        twin = cli("gateway", "--config", str(config))
        assert twin.returncode == 1 and '"cannot_listen"' in twin.stderr, twin.stderr
        time.sleep(1.0)
        assert '"mqtt_disconnected"' not in gw.text()
    finally:
        assert gw.terminate() == 0
        scans.stop()
    text = gw.text()
    assert '"reason": "instance_too_large"' in text and '"status": "0xA700"' in text
    assert '"association_refused"' in text and "UNKNOWN-AE" in text
    assert '"outcome": "published"' in text
    assert str(ds.PatientName) not in text and str(ds.SOPInstanceUID) not in text


def test_unclaimed_instance_is_spooled_then_drained(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    """MQTT 5 "no matching subscribers" (0x10): the broker discarded the publish, so the
    instance is spooled, not counted as safe; once a subscriber is there it is drained."""
    from agent.config import BrokerConfig
    from agent.gateway.forwarder import Forwarder, Outcome
    from agent.gateway.spool import Spool
    from agent.transport.mqtt import Connection
    from agent.transport.topics import Topics

    edge = mosquitto_factory("edge")
    conn = Connection(BrokerConfig(url=edge.url), "gw-unclaimed", name="edge")
    spool = Spool(tmp_path / "spool.sqlite", max_bytes=10**7)
    forwarder = Forwarder(conn, Topics("site-a", "node-1").scan("gateway"), spool,
                          ack_timeout_s=5)
    conn.start()
    forwarder.start()
    try:
        assert conn.wait_connected(10)
        assert forwarder.store("1.2.3", b"instance-1") is Outcome.SPOOLED
        assert spool.count == 1
        scans = Recorder.start(edge.url, "scans", "iomt/site-a/scans/#")
        forwarder.kick()  # as on a reconnect; otherwise the next try comes after a backoff
        got = scans.wait("/scans/gateway", 1, timeout=10)
        assert got[0].payload == b"instance-1"
        deadline = time.monotonic() + 10
        while spool.count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spool.count == 0 and forwarder.counts.drained == 1
        assert forwarder.store("1.2.4", b"instance-2") is Outcome.PUBLISHED
        scans.stop()
    finally:
        forwarder.stop()
        conn.stop()
        spool.close()


def test_a_kept_instance_goes_again_until_its_receipt_deletes_it(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    """keep_until_accepted: the PUBACK keeps the row, an overdue receipt sends it again (the
    wait doubling), and the agent's `accepted` receipt, read from the broker, deletes it."""
    from agent.config import BrokerConfig
    from agent.gateway.forwarder import Forwarder, Outcome
    from agent.gateway.spool import Spool
    from agent.transport.mqtt import Connection
    from agent.transport.scan_receipts import accepted_body
    from agent.transport.topics import Topics

    edge = mosquitto_factory("edge")
    topics = Topics("site-a", "node-1")
    scans = Recorder.start(edge.url, "scans", "iomt/site-a/scans/#")
    forwarder: Forwarder
    conn = Connection(BrokerConfig(url=edge.url), "gw-kept", name="edge",
                      subscriptions=(topics.accepted_filter(),),
                      on_message=lambda m: forwarder.on_accepted(m))
    spool = Spool(tmp_path / "spool.sqlite", max_bytes=10**7)
    forwarder = Forwarder(conn, topics.scan("gateway"), spool, ack_timeout_s=5,
                          accepted_timeout_s=0.3)
    agent = Connection(BrokerConfig(url=edge.url), "agent-kept", name="agent")
    conn.start()
    agent.start()
    forwarder.start()
    try:
        assert conn.wait_connected(10) and agent.wait_connected(10)
        time.sleep(0.3)  # the receipts' SUBSCRIBE in
        assert forwarder.store("1.2.3", b"instance-1") is Outcome.PUBLISHED
        assert spool.count == 1  # acked by the broker, kept
        got = scans.wait("/scans/gateway", 3, timeout=30)  # overdue: 0.3 s, 0.6 s, ...
        assert {m.payload for m in got} == {b"instance-1"}
        assert spool.count == 1 and forwarder.counts.resent >= 2
        agent.publish(topics.accepted, b"not json", qos=1)  # unreadable: ignored
        agent.publish(topics.accepted, accepted_body(b"instance-1"), qos=1)
        deadline = time.monotonic() + 10
        while spool.count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spool.count == 0 and forwarder.counts.confirmed == 1
    finally:
        forwarder.stop()
        agent.stop()
        conn.stop()
        scans.stop()
        spool.close()


def test_a_kept_instance_the_broker_refuses_is_not_left_in_the_spool(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    """keep_until_accepted commits the row before the publish; when the broker refuses it
    (MQTT 5 PUBACK 0x87, its ACL), the modality is told so and the row goes: a row left
    behind would be drained later, after the modality was told it failed."""
    from agent.config import BrokerConfig
    from agent.gateway.forwarder import BrokerRefused, Forwarder
    from agent.gateway.spool import Spool
    from agent.transport.mqtt import Connection
    from agent.transport.topics import Topics

    acl = tmp_path / "readonly.acl"
    acl.write_text("topic read #\n")  # anonymous clients may read, not write
    edge = mosquitto_factory("edge", f"allow_anonymous true\nacl_file {acl}")
    conn = Connection(BrokerConfig(url=edge.url), "gw-refused", name="edge")
    spool = Spool(tmp_path / "spool.sqlite", max_bytes=10**7)
    forwarder = Forwarder(conn, Topics("site-a", "node-1").scan("gateway"), spool,
                          ack_timeout_s=5, accepted_timeout_s=60)
    conn.start()
    forwarder.start()
    try:
        assert conn.wait_connected(10)
        with pytest.raises(BrokerRefused):
            forwarder.store("1.2.3", b"instance-1")
        assert spool.count == 0 and spool.size == 0
    finally:
        forwarder.stop()
        conn.stop()
        spool.close()
