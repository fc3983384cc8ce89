"""``iomt-agent send``: what a scanner gateway does, publish DICOM files to the site's scan
topic at QoS 1 and wait for the edge broker's acks."""

from __future__ import annotations

import threading
from pathlib import Path

from agent.config import Config
from agent.log import get_logger
from agent.transport.mqtt import Connection, Delivery, Verdict
from agent.transport.topics import Topics

log = get_logger("agent.send")


def collect(paths: list[Path]) -> list[Path]:
    """Files as given, directories by their files (recursively, sorted)."""
    files: list[Path] = []
    for p in paths:
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return files


def send_files(config: Config, paths: list[Path], source: str, timeout: float) -> bool:
    """Publish every file; True when the broker took each one for a subscriber."""
    files = collect(paths)
    topics = Topics(config.agent.site, config.agent.device_id)
    conn = Connection(config.edge, f"iomt-{config.agent.site}-sender-{source}", name="edge")
    conn.start()
    if not conn.wait_connected(timeout):
        log.error("edge_broker_unreachable", url=config.edge.url, error=conn.last_error)
        conn.stop()
        return False
    acked = threading.Semaphore(0)
    refused: list[str] = []
    unclaimed: list[str] = []

    def done(verdict: Verdict) -> None:
        if verdict.delivery is Delivery.REFUSED:
            refused.append(verdict.reason)
        elif verdict.delivery is Delivery.UNCLAIMED:
            unclaimed.append(verdict.reason)
        acked.release()

    topic = topics.scan(source)
    for f in files:
        conn.publish(topic, f.read_bytes(), qos=1, on_done=done)
    complete = all(acked.acquire(timeout=timeout) for _ in files)
    conn.stop()
    log.info("sent", files=len(files), topic=str(topic), refused=len(refused),
             unclaimed=len(unclaimed), complete=complete,
             note="acked by the edge broker; whether the agent accepts each scan shows in its "
             "log (scan_rejected) and in `iomt-agent receive` (error_report)")
    if refused:
        log.error("scans_refused", files=len(refused), topic=str(topic), reason=refused[0],
                  fix="the edge broker's ACL may let only the scanner gateway publish scans: "
                  "send with its certificate (--cert, --key)")
    if unclaimed:
        log.error("scans_unclaimed", files=len(unclaimed), topic=str(topic),
                  detail="the edge broker had no subscriber for them and discarded them",
                  fix="send them again once an agent is subscribed: start `iomt-agent run` "
                  "once (its persistent session makes the broker keep scans for it), or, if the "
                  "broker restarted without persistence, wait until the agent has reconnected "
                  "(mqtt_connected in its log, within 30 s)")
    return complete and not refused and not unclaimed


def send_confirmed(config: Config, paths: list[Path], source: str, timeout: float) -> bool:
    """Publish every file and wait until the agent confirmed each one (its ``accepted``
    receipt), resending unconfirmed ones: nothing is lost to an edge broker that acked and
    then crashed."""
    from agent.ops.confirming_sender import ConfirmingGateway

    files = collect(paths)
    topics = Topics(config.agent.site, config.agent.device_id)
    gateway = ConfirmingGateway(config.edge, f"iomt-{config.agent.site}-sender-{source}",
                                topics, source=source, resend_s=max(1.0, timeout / 4))
    if not gateway.start(timeout):
        log.error("edge_broker_unreachable", url=config.edge.url, error=gateway.conn.last_error)
        gateway.stop()
        return False
    for f in files:
        gateway.send(f.read_bytes())
    confirmed = gateway.wait_confirmed(timeout)
    left = gateway.unconfirmed
    gateway.stop()
    log.info("sent", files=len(files), confirmed=len(files) - left, resent=gateway.resent,
             complete=confirmed)
    if not confirmed:
        log.error("scans_unconfirmed", files=left, fix="is the agent running and connected "
                  "to the edge broker? May it publish on iomt/{site}/{device}/accepted and "
                  "this gateway read it (the edge broker's ACL)?")
    return confirmed
