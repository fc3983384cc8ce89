"""Scale-out on one site: three agents share the site's scans (``$share/{site}/...``) on a
real Mosquitto; one is SIGKILLed mid-stream, the other two go on.

* default session expiry: the killed one is restarted (as systemd's Restart=on-failure
  does) and every one of 600 slices comes out once;
* short session expiry and a confirming sender: the killed one is NOT restarted; the broker
  drops its session (and the scans queued in it), the sender publishes what no agent
  accepted again, and the other two take over."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from agent.config import BrokerConfig
from agent.demo.sample_series import build_series
from agent.ops.confirming_sender import ConfirmingGateway
from agent.transport.mqtt import Connection, Message
from agent.transport.scan_receipts import accepted_digest
from agent.transport.topics import Topics
from tests.bundles import make_context_bundle
from tests.conftest import Mosquitto
from tests.integration.harness import Proc, cli, spawn
from tests.site import site_uid

pytestmark = pytest.mark.integration

N = 600
AGENTS = 3


def _configs(tmp: Path, edge: Mosquitto, cloud: Mosquitto, edge_extra: str = "") -> list[Path]:
    """One node directory, three agent configs: own device id, state dir and client ids;
    the same keys (the receiver trusts the one device key under each id)."""
    bundle = make_context_bundle(tmp / "bundle", [1.0])  # 2D, 32 x 32: cheap inference
    r = cli("init", str(tmp / "node"), "--edge-url", edge.url, "--cloud-url", cloud.url,
            "--site", "site-a", "--device-id", "node-1", "--bundle", str(bundle))
    assert r.returncode == 0, r.stderr
    base = (tmp / "node" / "agent.toml").read_text()
    base = base.replace('format = "auto"', 'format = "json"')
    edge_line = f'url = "{edge.url}"\n'
    assert edge_line in base
    base = base.replace(edge_line, edge_line + edge_extra, 1)
    base = base.replace('backend = "auto"', 'backend = "onnxruntime"')
    base = base.replace('state_dir = "state"\n',
                        'state_dir = "state"\nshared_subscription = true\n')
    trusted = ", ".join(f'"node-{i}" = "keys/device-signing.pub"' for i in range(1, AGENTS + 1))
    base = base.replace('trusted_devices = { "node-1" = "keys/device-signing.pub" }',
                        f"trusted_devices = {{ {trusted} }}")
    assert "shared_subscription = true" in base and '"node-3"' in base
    configs = []
    for i in range(1, AGENTS + 1):
        path = tmp / "node" / f"agent-{i}.toml"
        path.write_text(base.replace('device_id = "node-1"', f'device_id = "node-{i}"')
                        .replace('state_dir = "state"', f'state_dir = "state-{i}"'))
        configs.append(path)
    return configs


def _scans(tmp: Path) -> Path:
    out = tmp / "scans"
    out.mkdir()
    vol = (np.arange(N * 32 * 32, dtype=np.uint32).reshape(N, 32, 32) % 3000 + 100)
    for i, payload in enumerate(build_series(vol.astype(np.uint16))):
        (out / f"{i:04d}.dcm").write_bytes(payload)
    return out


def _settled(receiver: Proc, quiet_s: float = 2.0, timeout: float = 120) -> int:
    """Results received once no new one came for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(receiver.events("result_received"))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return now
        time.sleep(0.2)
    raise AssertionError("results kept coming")


def test_three_agents_split_600_slices_and_a_killed_one_loses_nothing(
    tmp_path: Path, mosquitto_factory: Callable[[str], Mosquitto]
) -> None:
    edge, cloud = mosquitto_factory("edge"), mosquitto_factory("cloud")
    configs = _configs(tmp_path, edge, cloud)
    scans = _scans(tmp_path)
    receiver = spawn(["receive", "--config", str(configs[0]), "--out", str(tmp_path / "out"),
                      "--count", str(N), "--timeout", "240"], tmp_path / "receiver.log")
    receiver.wait_for('"mqtt_connected"')
    agents = [spawn(["run", "--config", str(c)], tmp_path / f"agent-{i + 1}.log")
              for i, c in enumerate(configs)]
    restarted = None
    try:
        for a in agents:
            a.wait_for('"mqtt_connected"', 2)
        time.sleep(0.5)  # every SUBSCRIBE in before the first scan
        assert cli("send", "--config", str(configs[0]), str(scans)).returncode == 0
        victim = agents[1]
        victim.wait_for('"slice_processed"', 40)
        victim.kill()  # SIGKILL mid-stream
        before_kill = len(victim.events("slice_processed"))
        settled = _settled(receiver)
        by_device = Counter(str(e["device_id"]) for e in receiver.events("result_received"))
        assert by_device["node-1"] > 0 and by_device["node-3"] > 0
        restarted = spawn(["run", "--config", str(configs[1])], tmp_path / "agent-2b.log")
        assert receiver.proc.wait(240) == 0, receiver.text()[-3000:]
        received = receiver.events("result_received")
        unique = {e["message_id"] for e in received}
        assert len(unique) == N, f"{N - len(unique)} slices lost"
        done = receiver.events("receive_done")[-1]
        assert done["filed"] == N and done["error_reports"] == 0
        final = Counter(str(e["device_id"]) for e in received)
        after_restart = len(restarted.events("slice_processed"))
        # Mosquitto 2.0 deals the group's messages in turn to every member with a session,
        # connected or not: the killed agent's share waited in its session (and its inbox)
        # and the restart processed it (docs/reliability.md, "Scale-out on one site").
        assert after_restart > 0 and final["node-2"] > by_device["node-2"]
        figures = {"sent": N, "unique_results": len(unique), "lost": N - len(unique),
                   "duplicates_dropped": done["duplicates"],
                   "per_agent": dict(sorted(final.items())),
                   "killed_agent_processed_before_kill": before_kill,
                   "results_while_killed_agent_down": settled,
                   "processed_by_restarted_agent": after_restart}
        print("shared subscription figures:", json.dumps(figures))
        (tmp_path / "figures.json").write_text(json.dumps(figures))
    finally:
        for a in [*agents, restarted]:
            if a is not None:
                a.kill()
        receiver.kill()


SESSION_EXPIRY_S = 5  # edge.session_expiry_s of every agent in the takeover test
RESEND_S = 10.0  # the confirming sender's first wait for an `accepted` receipt
RATE = 20.0  # scans per second: a stream, so that the kill lands in the middle of it


def _stranded(state: Path) -> tuple[set[str], set[str]]:
    """What a dead agent still holds on its disk: the digests of scans it accepted and did
    not finish (inbox rows not done), and the message ids of results it had not yet
    forgotten (outbox rows: unsent, or sent and not yet deleted)."""
    db = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True)
    try:
        inbox = {str(r[0]) for r in db.execute(
            "SELECT sha256 FROM inbox WHERE state != 'done'")}
        outbox = {str(r[0]) for r in db.execute("SELECT message_id FROM outbox")}
    finally:
        db.close()
    return inbox, outbox


def _delivered_sources(out: Path) -> set[str]:
    """The (pseudonymised) source SOP Instance UIDs of the result files under ``out``."""
    return {str(pydicom.dcmread(f).SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in out.rglob("*.dcm") if "quarantine" not in f.parts}


def test_with_a_short_session_expiry_and_a_confirming_sender_the_others_take_over(
    tmp_path: Path, mosquitto_factory: Callable[[str], Mosquitto]
) -> None:
    edge, cloud = mosquitto_factory("edge"), mosquitto_factory("cloud")
    configs = _configs(tmp_path, edge, cloud, f"session_expiry_s = {SESSION_EXPIRY_S}\n")
    assert all(f"session_expiry_s = {SESSION_EXPIRY_S}" in c.read_text() for c in configs)
    payloads = [f.read_bytes() for f in sorted(_scans(tmp_path).glob("*.dcm"))]
    receiver = spawn(["receive", "--config", str(configs[0]), "--out", str(tmp_path / "out"),
                      "--count", str(N), "--timeout", "300"], tmp_path / "receiver.log")
    receiver.wait_for('"mqtt_connected"')
    agents = [spawn(["run", "--config", str(c)], tmp_path / f"agent-{i + 1}.log")
              for i, c in enumerate(configs)]
    topics = Topics("site-a", "node-1")
    sender = ConfirmingGateway(BrokerConfig(url=edge.url), "sender-takeover", topics,
                               resend_s=RESEND_S)
    sent_at: dict[str, float] = {}
    accepted_at: dict[str, float] = {}

    def on_accepted(msg: Message) -> None:  # when each scan was first accepted, for figures
        digest = accepted_digest(msg.payload)
        if digest is not None:
            accepted_at.setdefault(digest, time.monotonic())

    watch = Connection(BrokerConfig(url=edge.url), "takeover-watch", name="watch",
                       subscriptions=(topics.accepted_filter(),), on_message=on_accepted)
    watch.start()
    victim = agents[1]
    killed_at = None
    try:
        for a in agents:
            a.wait_for('"mqtt_connected"', 2)
        time.sleep(0.5)  # every SUBSCRIBE in before the first scan
        assert sender.start() and watch.wait_connected(10)
        started = time.monotonic()
        for i, payload in enumerate(payloads):
            time.sleep(max(0.0, started + i / RATE - time.monotonic()))
            sent_at.setdefault(sender.send(payload), time.monotonic())
            if killed_at is None and len(victim.events("slice_processed")) >= 40:
                victim.kill()  # SIGKILL mid-stream, and it stays dead
                killed_at, sent_before_kill = time.monotonic(), i + 1
        assert killed_at is not None, "the stream ended before the victim had processed 40"
        stranded, outbox = _stranded(tmp_path / "node" / "state-2")
        # Every scan that no live agent has: accepted by the dead one (on its disk) or not
        # confirmed yet (the sender resends it).
        confirmed = sender.wait_confirmed(240)
        confirmed_s = time.monotonic() - killed_at
        assert confirmed, f"{sender.unconfirmed} scans never accepted"
        _settled(receiver, quiet_s=3.0, timeout=240)
        received = receiver.events("result_received")
        last_s = time.monotonic() - killed_at  # upper bound; the events say when exactly
        if receiver.proc.poll() is None:
            receiver.terminate()
        figures_line = (receiver.events("receive_done") or receiver.events("receive_stopped"))[-1]
    finally:
        sender.stop()
        watch.stop()
        for a in agents:
            a.kill()
        receiver.kill()
    unique = {e["message_id"] for e in received}
    # Every slice: delivered (a result file names its source), or on the dead agent's
    # disk: accepted and not finished (inbox), or finished and not sent (outbox).
    pseudonym = site_uid(tmp_path / "node")
    delivered = _delivered_sources(tmp_path / "out")
    missing = {hashlib.sha256(p).hexdigest() for p in payloads
               if pseudonym(str(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID)) not in delivered}
    unsent = len(outbox - unique)  # each one the result of one slice
    in_inbox = len(missing & stranded)
    lost = max(0, len(missing - stranded) - unsent)
    assert len(delivered) == len(unique)
    assert lost == 0, f"{lost} slices neither delivered nor on the dead agent's disk"
    per_agent = Counter(str(e["device_id"]) for e in received)
    assert per_agent["node-1"] + per_agent["node-3"] > 2 * N // 3  # they took over its share
    assert sender.resent > 0  # what the broker dropped with the session came again
    # Takeover, from the sender's side: a scan published after the kill was dealt to the
    # dead member's session (and waited for a resend) or accepted at once by a live one.
    late = {d: accepted_at[d] - t for d, t in sent_at.items()
            if t > killed_at and d in accepted_at and accepted_at[d] - t > 1.0}
    window = max((sent_at[d] - killed_at for d in late), default=0.0)
    figures = {"sent": N, "sent_before_kill": sent_before_kill,
               "delivered_unique": len(unique),
               "duplicates_dropped": figures_line["duplicates"],
               "on_the_dead_agents_disk": {"inbox": in_inbox, "outbox": unsent},
               "also_delivered_by_another_agent": len(stranded) - in_inbox,
               "lost": lost, "per_agent": dict(sorted(per_agent.items())),
               "sender_resends": sender.resent,
               "scans_sent_after_kill_that_waited_for_a_resend": len(late),
               "kill_to_last_scan_dealt_to_the_dead_session_s": round(window, 1),
               "longest_wait_of_such_a_scan_s": round(max(late.values(), default=0.0), 1),
               "stream_after_kill_s": round((N - sent_before_kill) / RATE, 1),
               "kill_to_all_accepted_s": round(confirmed_s, 1),
               "kill_to_results_settled_s": round(last_s, 1)}
    print("\ntakeover figures:", json.dumps(figures))
    (tmp_path / "figures.json").write_text(json.dumps(figures))
