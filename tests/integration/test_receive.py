"""The cloud side between real Mosquitto brokers, as subprocesses: results that wait for the
first consumer, what `receive` says about a broker that is down, a second receiver, results
it cannot open, error reports, duplicates, and stop signals for `run` and `receive`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from agent.config import BrokerConfig
from agent.crypto import keys, seal
from agent.demo.sample_series import build_series, load_demo_slab
from agent.transport.mqtt import Connection
from tests.conftest import Mosquitto
from tests.integration.harness import REPO, Proc, Recorder, cli, spawn
from tests.integration.test_end_to_end import _init, _series

pytestmark = pytest.mark.integration


@pytest.fixture
def brokers(mosquitto_factory: Callable[[str], Mosquitto]) -> tuple[Mosquitto, Mosquitto]:
    return mosquitto_factory("edge"), mosquitto_factory("cloud")


def _receiver(config: Path, tmp: Path, log: str, *extra: str) -> Proc:
    return spawn(["receive", "--config", str(config), "--out", str(tmp / "results"), *extra],
                 tmp / log)


def _files(tmp: Path) -> list[Path]:
    return sorted(p for p in (tmp / "results").rglob("*.dcm"))


def _no_traceback(proc: Proc) -> None:
    assert "Traceback" not in proc.text(), proc.text()


def test_results_published_before_any_consumer_wait_for_it(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    """The README's order: run, send, then receive. The cloud broker answers "no matching
    subscribers" until the consumer's first start creates its session; the agent keeps the
    results and retries until it is there."""
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    scans = _series(tmp_path, 10)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    assert cli("send", "--config", str(config), str(scans)).returncode == 0
    agent.wait_for('"slice_processed"', 10)
    agent.wait_for('"result_unclaimed"')
    receiver = _receiver(config, tmp_path, "receiver.log", "--count", "10", "--timeout", "90")
    assert receiver.proc.wait(90) == 0, receiver.text()
    assert len(receiver.events("result_received")) == 10
    assert len({p.name for p in _files(tmp_path)}) == 10
    agent.wait_for('"results_claimed"', timeout=30)
    assert len(agent.events("result_unclaimed")) == 1  # once per episode, not per row
    [claimed] = agent.events("results_claimed")
    assert claimed["rows"] == 10
    assert agent.terminate() == 0
    [stopped] = agent.events("agent_stopped")
    assert stopped["outbox_pending"] == 0


def test_a_stop_keeps_unclaimed_results_for_the_next_start(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    scans = _series(tmp_path, 3)
    status = Recorder.start(cloud.url, "status", "iomt/site-a/node-1/status")
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    assert cli("send", "--config", str(config), str(scans)).returncode == 0
    agent.wait_for('"slice_processed"', 3)
    agent.wait_for('"result_unclaimed"')
    t = time.monotonic()
    assert agent.terminate() == 0
    assert time.monotonic() - t < 8, "a stop must not wait for a consumer that is not there"
    last = json.loads(status.wait("status", 1)[-1].payload)
    assert last["state"] == "offline"
    assert last["outbox_depth"] == 3 and last["results_unclaimed"] == 3
    status.stop()
    receiver = _receiver(config, tmp_path, "receiver.log", "--count", "3", "--timeout", "90")
    receiver.wait_for('"mqtt_connected"')
    again = spawn(["run", "--config", str(config)], tmp_path / "agent2.log")
    assert receiver.proc.wait(90) == 0, receiver.text()
    assert len(_files(tmp_path)) == 3
    assert again.terminate() == 0
    assert not again.events("result_unclaimed")  # the consumer's session exists now


def test_receive_says_that_the_cloud_broker_is_down(
    tmp_path: Path, mosquitto_factory: Callable[[str], Mosquitto]
) -> None:
    dead = mosquitto_factory("dead")
    dead.proc.terminate()
    dead.proc.wait(5)
    config = _init(tmp_path, dead, dead)
    receiver = _receiver(config, tmp_path, "receiver.log", "--count", "1", "--timeout", "8")
    assert receiver.proc.wait(30) == 1
    [first, *_] = receiver.events("cloud_broker_unreachable")
    assert first["url"] == dead.url and "cannot reach" in str(first["error"])
    assert "receive_timeout" not in receiver.text()  # the broker is the reason, not the results
    _no_traceback(receiver)


def test_a_second_receiver_with_the_same_client_id_takes_over(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    first = _receiver(config, tmp_path, "first.log", "--timeout", "90")
    first.wait_for('"mqtt_connected"')
    second = _receiver(config, tmp_path, "second.log", "--timeout", "90")
    deadline = time.monotonic() + 45
    while first.proc.poll() is None and second.proc.poll() is None:
        assert time.monotonic() < deadline, first.text() + second.text()
        time.sleep(0.2)
    gone, stays = (first, second) if first.proc.poll() is not None else (second, first)
    assert gone.proc.returncode == 1
    assert "another receiver with this client id took over" in gone.text()
    [event] = gone.events("receiver_taken_over")
    assert event["client_id"] == "iomt-site-a-cloud-receiver"
    time.sleep(3)  # no fight: the one that stays is not knocked off again
    assert stays.proc.poll() is None
    connected = stays.text().count('"mqtt_connected"')
    time.sleep(2)
    assert stays.text().count('"mqtt_connected"') == connected
    assert stays.terminate() == 0
    _no_traceback(gone)


def test_results_that_cannot_be_opened_are_kept_and_filed_on_a_rerun_with_the_right_key(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    keydir = config.parent / "keys"
    wrong, _ = keys.generate_recipient_keypair()
    keys.save_private_key(keydir / "wrong.key", wrong)
    right_config = config.read_text()
    config.write_text(right_config.replace('"keys/cloud-recipient.key"', '"keys/wrong.key"'))
    device = keys.load_signing_key(keydir / "device-signing.key")
    recipient = keys.load_recipient_public_key(keydir / "cloud-recipient.pub")
    instances = build_series(load_demo_slab().t1[:2])
    receiver = _receiver(config, tmp_path, "wrong-key.log", "--timeout", "60")
    receiver.wait_for('"mqtt_connected"')
    time.sleep(0.5)
    pub = Connection(BrokerConfig(url=cloud.url), "pub-results", name="cloud")
    pub.start()
    assert pub.wait_connected(10)
    for i, dicom in enumerate(instances):
        pub.publish("iomt/site-a/node-1/results", seal.seal(
            dicom, recipient=recipient, signing_key=device, device_id="node-1",
            message_id=f"m-{i}"), qos=1)
    receiver.wait_for('"result_rejected"', 2)
    pub.stop()
    assert receiver.terminate() == 0  # SIGTERM: a clean stop
    rejected = receiver.events("result_rejected")
    assert {e["reason"] for e in rejected} == {"unknown_recipient"}
    quarantine = tmp_path / "results" / "quarantine"
    kept = sorted(quarantine.iterdir())
    assert len(kept) == 2
    assert {str(e["quarantined"]) for e in rejected} == {str(p) for p in kept}
    assert not _files(tmp_path)
    [stopped] = receiver.events("receive_stopped")
    assert stopped["quarantined"] == 2 and stopped["quarantine"] == str(quarantine)

    config.write_text(right_config)
    rerun = _receiver(config, tmp_path, "right-key.log", "--count", "2", "--timeout", "30")
    assert rerun.proc.wait(60) == 0, rerun.text()
    assert len(_files(tmp_path)) == 2
    assert not list(quarantine.iterdir())
    assert {e["from_quarantine"] for e in rerun.events("result_received")} == {p.name
                                                                             for p in kept}


def test_receive_shows_why_the_agent_rejected_scans(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    """A text file, a renamed README and a CT: `send` succeeds (the broker took them), and
    both the agent's log and `receive` say why each was rejected."""
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not a scan\n")
    (bad / "scan.dcm").write_bytes((REPO / "README.md").read_bytes())
    ct = pydicom.dcmread(next(_series(tmp_path, 1).iterdir()))
    ct.Modality = "CT"
    ct.save_as(bad / "ct.dcm", enforce_file_format=True)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    receiver = _receiver(config, tmp_path, "receiver.log", "--count", "3", "--timeout", "8")
    receiver.wait_for('"mqtt_connected"')
    time.sleep(0.5)
    assert cli("send", "--config", str(config), str(bad)).returncode == 0
    receiver.wait_for('"error_report"', 3)
    reports = receiver.events("error_report")
    assert sorted(str(r["reason"]) for r in reports) == ["not_dicom", "not_dicom",
                                                         "wrong_modality"]
    [modality] = [r for r in reports if r["reason"] == "wrong_modality"]
    assert "Modality CT" in str(modality["detail"]) and "expects MR" in str(modality["detail"])
    assert all(r["detail"] and r["device_id"] == "node-1" for r in reports)
    rejected = agent.events("scan_rejected")
    assert len(rejected) == 3
    assert {str(e["detail"]) for e in rejected} == {str(r["detail"]) for r in reports}
    # No result comes for them: the timeout says why.
    assert receiver.proc.wait(30) == 1
    [timeout] = receiver.events("receive_timeout")
    assert timeout["error_reports"] == 3
    assert "3 scans were rejected by the agent" in str(timeout["detail"])
    # The session above took error reports: these three queue for it, and --no-errors
    # neither shows nor counts them (nor takes new ones).
    assert cli("send", "--config", str(config), str(bad)).returncode == 0
    agent.wait_for('"scan_rejected"', 6)
    quiet = _receiver(config, tmp_path, "quiet.log", "--no-errors", "--timeout", "4")
    assert quiet.proc.wait(30) == 0, quiet.text()
    assert quiet.events("error_report") == []
    [done] = quiet.events("receive_done")
    assert done["error_reports"] == 0
    assert agent.terminate() == 0


def test_a_rerun_that_gets_only_duplicates_says_so_and_succeeds(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    scans = _series(tmp_path, 3)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    first = _receiver(config, tmp_path, "first.log", "--count", "3", "--timeout", "60")
    first.wait_for('"mqtt_connected"')
    assert cli("send", "--config", str(config), str(scans)).returncode == 0
    assert first.proc.wait(60) == 0, first.text()
    rerun = _receiver(config, tmp_path, "rerun.log", "--count", "3", "--timeout", "60")
    rerun.wait_for('"mqtt_connected"')
    time.sleep(0.5)
    assert cli("send", "--config", str(config), str(scans)).returncode == 0  # the same again
    assert rerun.proc.wait(60) == 0, rerun.text()
    [done] = rerun.events("receive_done")
    assert (done["filed"], done["already_filed"]) == (0, 3)
    assert "all 3 results were filed by an earlier run" in str(done["note"])
    assert agent.terminate() == 0


def _wait_until_caught(proc: Proc, signum: int, timeout: float = 30) -> None:
    """Until the process has its own handler for ``signum`` (SigCgt in /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.text()
        status = Path(f"/proc/{proc.proc.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines()
                          if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.005)
    raise AssertionError("no handler installed")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_run_starts_is_a_clean_exit(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto], signum: int
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    _wait_until_caught(agent, signal.SIGTERM)
    os.kill(agent.proc.pid, signum)  # while the config and the model are still loading
    assert agent.proc.wait(30) == 0, agent.text()
    [stopped] = agent.events("agent_stopped")
    assert stopped["during"] == "start-up"
    assert stopped["signal"] == signal.Signals(signum).name
    assert "agent_starting" not in agent.text()
    _no_traceback(agent)


# The stop signal's handler runs inside a weakref callback, where Python prints "Exception
# ignored" instead of raising: what happened when it landed in the import system's
# module-lock cleanup (the agent then started and served, ignoring the stop).
SWALLOWED_STOP = """
import os, signal, sys, weakref
from agent import cli

class Box:
    pass

def load(path, _load=cli._load):
    box = Box()
    ref = weakref.ref(box, lambda _r: (os.kill(os.getpid(), signal.SIGTERM),
                                      [None for _ in range(1000)]))
    del box
    return _load(path)

cli._load = load
sys.exit(cli.main(["run", "--config", sys.argv[1]]))
"""


def test_a_stop_signal_whose_exception_python_swallowed_still_stops_the_start(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    log = tmp_path / "agent.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", SWALLOWED_STOP, str(config)],
                                stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    agent = Proc(proc, log)
    try:
        assert proc.wait(60) == 0, agent.text()
    finally:
        agent.kill()
    assert "Exception ignored" in agent.text()  # the swallowed path was taken
    [stopped] = agent.events("agent_stopped")
    assert stopped["during"] == "start-up" and stopped["signal"] == "SIGTERM"
    assert "agent_starting" not in agent.text()  # it never began to serve


def test_ctrl_c_on_receive_is_one_summary_line(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    receiver = _receiver(config, tmp_path, "receiver.log", "--count", "5")
    receiver.wait_for('"mqtt_connected"')
    receiver.proc.send_signal(signal.SIGINT)
    assert receiver.proc.wait(30) == 130
    [stopped] = receiver.events("receive_stopped")
    assert stopped["signal"] == "SIGINT" and stopped["filed"] == 0
    assert '"receive_stopped"' in receiver.text().strip().splitlines()[-1]
    _no_traceback(receiver)
    early = _receiver(config, tmp_path, "early.log")
    _wait_until_caught(early, signal.SIGTERM)
    early.proc.send_signal(signal.SIGINT)  # before it has even read its config
    assert early.proc.wait(30) == 130
    assert "receive_stopped" in early.text()
    _no_traceback(early)


def test_chacha20_version_2_envelopes_are_filed_like_any_other(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    """A node set to the Pi 4's cipher and to envelope version 2: the receiver of the same
    release opens and files every result."""
    edge, cloud = brokers
    config = _init(tmp_path, edge, cloud)
    config.write_text(config.read_text().replace(
        "[seal]\n", '[seal]\naead = "chacha20-poly1305"\nenvelope_version = 2\n', 1))
    scans = _series(tmp_path, 6)
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    [keys_line] = agent.events("seal_keys")
    assert keys_line["suite"].endswith("-hkdfsha256-chacha20poly1305")
    assert keys_line["envelope_version"] == 2
    receiver = _receiver(config, tmp_path, "receiver.log", "--count", "6", "--timeout", "90")
    assert cli("send", "--config", str(config), str(scans)).returncode == 0
    assert receiver.proc.wait(90) == 0, receiver.text()
    assert len(receiver.events("result_received")) == 6
    assert len({p.name for p in _files(tmp_path)}) == 6
    assert receiver.events("result_rejected") == []
    assert agent.terminate() == 0
    _no_traceback(receiver)
