"""Faults during one stream of 312 scans, against real Mosquitto brokers configured as
docs/reliability.md recommends (persistence by snapshot, autosave every 60 s, receipts on):
every scan is accounted for at the end, delivered exactly once after the receiver drops
duplicates or reported on the error topic.

One stream carries all the faults, so that the two-minute outage pays for the rest:

1. the edge broker SIGKILLed and restarted (what it had acked since its last snapshot is
   gone: the gateway resends what the agent has not confirmed);
2. the receiver stopped, results queued for its session, then the cloud broker SIGKILLed
   and restarted: the broker PUBACKed those results and lost them; the outbox still has
   them (no receipt yet) and sends them again after the reconnect;
3. the cloud broker down for two minutes while scans keep arriving (store and forward);
4. the agent SIGKILLed ten times at seeded random moments, one of them a "power cut" in a
   burst of writes; after each kill every SQLite store passes ``PRAGMA integrity_check``
   before the next start opens it.

The figures are printed (``-s``) and quoted in docs/reliability.md.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from agent.config import BrokerConfig
from agent.demo.sample_series import build_series, load_demo_slab
from agent.ops.confirming_sender import ConfirmingGateway
from agent.transport.topics import Topics
from tests.bundles import make_scale_bundle
from tests.integration.faults import Broker, integrity_check
from tests.integration.harness import Proc, cli, spawn
from tests.site import site_uid

pytestmark = pytest.mark.integration

GOOD, BAD = 306, 6
OUTAGE_S = 120.0
AGENT_KILLS = 10
SEED = 13


def _node(tmp: Path, edge: Broker, cloud: Broker) -> Path:
    bundle = make_scale_bundle(tmp / "bundle")
    r = cli("init", str(tmp / "node"), "--edge-url", edge.url, "--cloud-url", cloud.url,
            "--site", "site-a", "--device-id", "node-1", "--bundle", str(bundle))
    assert r.returncode == 0, r.stderr
    config = tmp / "node" / "agent.toml"
    # As docs/reliability.md recommends: the outbox keeps a result until the receipt.
    config.write_text(config.read_text().replace('format = "auto"', 'format = "json"')
                      + "\n[delivery]\nreceipts = true\n")
    return config


def _stream() -> list[bytes]:
    slab = load_demo_slab()
    vol = np.concatenate([slab.t1] * -(-GOOD // slab.t1.shape[0]))[:GOOD]
    good = build_series(vol)
    rng = np.random.default_rng(SEED)
    bad = [b"not DICOM " + rng.bytes(2000) for _ in range(BAD)]
    stream = list(good)
    for i, payload in enumerate(bad):  # spread over the stream
        stream.insert(40 + i * 45, payload)
    return stream


class Agents:
    """The agent as a subprocess, SIGKILLed and started again; one log per life."""

    def __init__(self, config: Path, tmp: Path) -> None:
        self.config, self.tmp, self.lives = config, tmp, 0
        self.state = config.parent / "state"
        self.checks: list[dict[str, str]] = []
        self.proc = self._spawn()

    def _spawn(self) -> Proc:
        self.lives += 1
        return spawn(["run", "--config", str(self.config)], self.tmp / f"agent{self.lives}.log")

    def kill_and_restart(self) -> None:
        self.proc.kill()
        self.checks.append(integrity_check(self.state))
        self.proc = self._spawn()

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for i in range(1, self.lives + 1)
                for e in Proc(self.proc.proc, self.tmp / f"agent{i}.log").events(name)]


def _receiver(config: Path, tmp: Path, n: int, *, wait: bool = True) -> Proc:
    """``iomt-agent receive`` without ``--count``: the test stops it once all is in."""
    proc = spawn(["receive", "--config", str(config), "--out", str(tmp / "results"),
                  "--timeout", "400"], tmp / f"receiver{n}.log")
    if wait:
        proc.wait_for('"mqtt_connected"')
    return proc


def _all_in(tmp: Path, receivers: list[Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = len(list((tmp / "results").rglob("*.dcm")))
        reports = {e["message_id"] for r in receivers for e in r.events("error_report")}
        if files >= GOOD and len(reports) >= BAD:
            return
        time.sleep(0.5)
    raise AssertionError(f"{files} results and {len(reports)} reports after {timeout} s:\n"
                         + receivers[-1].text()[-3000:])


def test_312_scans_through_broker_kills_an_outage_and_ten_agent_kills(tmp_path: Path) -> None:
    edge, cloud = Broker("edge", tmp_path), Broker("cloud", tmp_path)
    edge.start()
    cloud.start()
    gateway: ConfirmingGateway | None = None
    agents: Agents | None = None
    receivers: list[Proc] = []
    try:
        config = _node(tmp_path, edge, cloud)
        stream = _stream()
        receivers.append(_receiver(config, tmp_path, 1))
        agents = Agents(config, tmp_path)
        agents.proc.wait_for('"mqtt_connected"', 2)
        gateway = ConfirmingGateway(BrokerConfig(url=edge.url), "gateway-faults",
                                    Topics("site-a", "node-1"), resend_s=10.0)
        assert gateway.start()

        rng = random.Random(SEED)
        t0 = time.monotonic()
        # The stream: 312 scans over ~103 s, with one burst of 30 just before the power cut.
        burst_at = 100
        times = [i * 0.33 for i in range(len(stream))]
        sending = threading.Event()

        def send_stream() -> None:
            for i, payload in enumerate(stream):
                if i < burst_at or i >= burst_at + 30:
                    delay = t0 + times[i] - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                assert gateway is not None
                gateway.send(payload)
            sending.set()

        sender = threading.Thread(target=send_stream, daemon=True)
        sender.start()

        def at(t: float) -> None:
            delay = t0 + t - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        at(2)  # 1. the edge broker
        edge.kill()
        time.sleep(1)
        edge.start()
        at(4.5)  # 2. results queued for an absent receiver, then the cloud broker killed
        assert receivers[0].terminate() == 0
        at(8)
        cloud.kill()
        time.sleep(1)
        cloud.start()
        receivers.append(_receiver(config, tmp_path, 2, wait=False))  # it may connect
        # only after the outage: then it creates its session anew and the outbox retries
        # The agent is back on the cloud broker: it has sent again what the broker lost.
        agents.proc.wait_for(f'"url": "{cloud.url}", "session_present"', 2, timeout=40)
        at(11)  # 3. the outage
        cloud.kill()
        outage_start = time.monotonic() - t0
        outage_end = time.monotonic() + OUTAGE_S
        # 4. ten agent kills at seeded moments during the outage, at least 7 s apart; the
        # one after the burst is the power cut.
        moments = sorted(rng.uniform(0, 1) for _ in range(AGENT_KILLS))
        span = OUTAGE_S - 10 - 7 * AGENT_KILLS
        kills = [outage_start + 2 + m * span + 7 * i for i, m in enumerate(moments)]
        power_cut = max(times[burst_at] + 0.4, outage_start + 1)
        kills[min(range(AGENT_KILLS), key=lambda i: abs(kills[i] - power_cut))] = power_cut
        for t in sorted(kills):
            at(t)
            agents.kill_and_restart()
        delay = outage_end - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        cloud.start()
        outage_s = time.monotonic() - outage_end + OUTAGE_S
        assert sending.wait(60)
        assert gateway.wait_confirmed(120), f"{gateway.unconfirmed} scans never confirmed"
        _all_in(tmp_path, receivers, 240)
        assert agents.proc.terminate() == 0  # after the receipts of the last results
        assert receivers[-1].terminate() == 0
        elapsed = time.monotonic() - t0
    finally:
        if gateway is not None:
            gateway.stop()
        if agents is not None:
            agents.proc.kill()
        for r in receivers:
            r.kill()
        edge.stop()
        cloud.stop()

    # Every store opened cleanly after every kill.
    assert len(agents.checks) == AGENT_KILLS
    assert all(check and set(check.values()) == {"ok"} for check in agents.checks), agents.checks
    # Accounted for: each good scan has exactly one result on disk, each bad one a report.
    pseudonym = site_uid(config.parent)
    sources = {pseudonym(str(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID))
               for p in stream if not p.startswith(b"not DICOM")}
    files = sorted((tmp_path / "results").rglob("*.dcm"))
    refs = [str(pydicom.dcmread(f, stop_before_pixels=True)
                .SourceImageSequence[0].ReferencedSOPInstanceUID) for f in files]
    assert len(refs) == len(set(refs)) == GOOD
    assert set(refs) == sources
    summaries = [e for r in receivers for e in r.events("receive_stopped")]
    assert len(summaries) == 2
    reports = {e["message_id"] for r in receivers for e in r.events("error_report")}
    assert len(reports) == BAD
    # The outbox forgot nothing it still needed, and kept nothing: all receipted.
    [stopped] = agents.events("agent_stopped")
    assert stopped["outbox_pending"] == 0 and stopped["inbox_pending"] == 0
    resent = sum(int(e["rows"]) for e in agents.events("results_resent_after_reconnect"))  # type: ignore[call-overload]
    assert resent > 0, "no result was sent again after the cloud broker came back"
    duplicates = sum(int(s["duplicates"]) + int(s["duplicate_reports"])  # type: ignore[call-overload]
                     for s in summaries)
    figures = {
        "sent": len(stream), "good": GOOD, "bad": BAD, "gateway_resent": gateway.resent,
        "delivered": len(refs), "error_reports": len(reports),
        "duplicates_dropped": duplicates, "results_resent_after_reconnect": resent,
        "agent_lives": agents.lives, "edge_kills": edge.kills, "cloud_kills": cloud.kills,
        "outage_s": round(outage_s, 1), "elapsed_s": round(elapsed, 1),
        "processed": sum(1 for _ in agents.events("slice_processed")),
    }
    print("fault stream:", json.dumps(figures))
