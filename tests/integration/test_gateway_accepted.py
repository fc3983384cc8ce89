"""The DICOM gateway keeps each instance until the agent's ``accepted`` receipt
(``gateway.keep_until_accepted``, the default), against real programs: dcmtk's storescu ->
`iomt-agent gateway` -> Mosquitto (persistence off) -> `iomt-agent run` -> Mosquitto ->
`iomt-agent receive`.

The agent is stopped (its persistent session stays on the broker), so the broker PUBACKs
the next instances and queues them for it; then the broker is SIGKILLed before the agent
has received any of them, and restarted empty. A gateway that deleted its rows on the
PUBACK would have lost them; this one publishes them again after the reconnect, and every
instance must come out, once after the receiver drops duplicates."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mosquitto
from tests.integration.harness import REFERENCE_BUNDLE, Proc, cli, spawn
from tests.integration.orthanc import PersistentBroker, free_port, store_successes, storescu

pytestmark = pytest.mark.integration

FIRST, KEPT = 6, 18  # instances sent with the agent up; then acked by the broker and lost
CALLING = "MRI-SCANNER-1"


def _volatile_broker(tmp: Path) -> PersistentBroker:
    """A Mosquitto on a fixed port with persistence off: a SIGKILL loses everything."""
    port = free_port()
    conf = tmp / "edge.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"
                    "persistence false\nmax_queued_messages 100000\nlog_dest stderr\n"
                    "log_type error\nlog_type warning\n")
    broker = PersistentBroker(port, conf, tmp / "edge.log")
    broker.start()
    return broker


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


def _rows(spool: Path) -> int:
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
    finally:
        db.close()


def _wait_rows(spool: Path, rows: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (now := _rows(spool)) != rows:
        assert time.monotonic() < deadline, f"{now} rows in the gateway's spool, not {rows}"
        time.sleep(0.1)


def _send(port: int, files: list[Path]) -> list[str]:
    out, _ = storescu(port, files, calling=CALLING).communicate(timeout=120)
    ok = store_successes(out)
    assert len(ok) == len(files), out
    return ok


def test_instances_acked_by_a_broker_that_then_crashed_all_arrive(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    edge = _volatile_broker(tmp_path)
    cloud = mosquitto_factory("cloud")
    gw_port = free_port()
    config = _config(tmp_path, edge.url, cloud.url, gw_port)
    n = FIRST + KEPT
    assert cli("sample", str(tmp_path / "scans"), "--count", str(n)).returncode == 0
    files = sorted((tmp_path / "scans").glob("*.dcm"))
    procs: list[Proc] = []
    try:
        receiver = spawn(["receive", "--config", str(config), "--out", str(tmp_path / "out"),
                          "--count", str(n), "--timeout", "300"], tmp_path / "receiver.log")
        agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
        gw = spawn(["gateway", "--config", str(config)], tmp_path / "gateway.log")
        procs += [receiver, agent, gw]
        agent.wait_for('"mqtt_connected"', 2, timeout=120)
        gw.wait_for('"gateway_listening"')
        gw.wait_for('"mqtt_connected"')

        spool = config.parent / "state" / "gateway-spool.sqlite"
        # 1. agent up: each instance is confirmed by the agent, the spool empties
        _send(gw_port, files[:FIRST])
        _wait_rows(spool, 0)
        # 2. agent stopped (its session stays): the broker acks and queues the next ones
        assert agent.terminate() == 0
        _send(gw_port, files[FIRST:])
        outcomes = [e["outcome"] for e in gw.events("cstore_accepted")]
        assert outcomes[FIRST:] == ["published"] * KEPT, outcomes
        kept = _rows(spool)  # kept after the PUBACK: no agent has them
        # 3. the broker crashes right after those PUBACKs, and comes back empty
        assert edge.proc is not None
        edge.proc.kill()
        edge.proc.wait(10)
        crashed = time.monotonic()
        edge.start()
        # 4. the agent comes back; the gateway publishes again what was never confirmed
        agent = spawn(["run", "--config", str(config)], tmp_path / "agent-2.log")
        procs.append(agent)
        assert receiver.proc.wait(300) == 0, receiver.text()[-3000:]
        recovered_s = time.monotonic() - crashed
        _wait_rows(spool, 0)  # the last receipts reach the gateway
        assert gw.terminate() == 0
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.terminate()
        edge.stop()

    assert kept == KEPT
    stopped = gw.events("gateway_stopped")[-1]
    received = receiver.events("result_received")
    done = receiver.events("receive_done")[-1]
    unique = {e["message_id"] for e in received}
    assert len(unique) == n and done["filed"] == n and done["error_reports"] == 0
    assert stopped["left_in_spool"] == 0 and int(str(stopped["resent"])) >= KEPT
    assert int(str(stopped["confirmed"])) >= n
    figures = {"sent": n, "c_store_successes": n, "acked_then_lost_by_the_broker": KEPT,
               "gateway_resent": stopped["resent"], "delivered_unique": len(unique),
               "duplicates_dropped": done["duplicates"], "lost": n - len(unique),
               "left_in_spool": stopped["left_in_spool"],
               "crash_to_last_result_s": round(recovered_s, 1)}
    print("\ngateway accepted figures:", json.dumps(figures))
