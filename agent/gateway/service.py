"""``iomt-agent gateway``: the Storage SCP, the edge broker connection and the spool, wired.

Start: open the spool (``<agent.state_dir>/gateway-spool.sqlite``), connect to the edge
broker in the background (the SCP does not wait for it: instances spool until it is there),
bind the SCP, tell systemd READY. With ``gateway.keep_until_accepted`` (the default) the
connection also subscribes to the site's ``accepted`` receipts, which delete spool rows.
Stop (SIGTERM): close the SCP, let the drainer finish what is in flight (and receipts come
in) for a moment, disconnect; what is still spooled stays for the next start.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config, ConfigError
from agent.config_gateway import GatewaySection
from agent.daemon.sdnotify import ServiceNotifier
from agent.gateway.forwarder import Forwarder
from agent.gateway.intake import Intake, decodable_syntaxes, syntax_name
from agent.gateway.spool import Spool
from agent.log import get_logger
from agent.transport.mqtt import Connection, Message
from agent.transport.topics import Topics

log = get_logger("agent.gateway")

SPOOL_FILE = "gateway-spool.sqlite"
STOP_DRAIN_S = 3.0


@dataclass(frozen=True)
class GatewaySummary:
    published: int
    spooled: int
    drained: int
    confirmed: int
    resent: int
    left_in_spool: int


def spool_path(config: Config) -> Path:
    return config.agent.state_dir / SPOOL_FILE


def section_of(config: Config, source: str) -> GatewaySection:
    if config.gateway is None:
        raise ConfigError(source, ["gateway: section required for `iomt-agent gateway` "
                                   "(at least allowed_calling_ae_titles; see docs/integration.md)"])
    return config.gateway


def accepted_syntaxes(section: GatewaySection, source: str) -> list[str]:
    """The configured transfer syntaxes, each one the agent can decode here; by default all
    of those."""
    decodable = decodable_syntaxes()
    if section.transfer_syntaxes is None:
        return decodable
    bad = [s for s in section.transfer_syntaxes if s not in decodable]
    if bad:
        names = ", ".join(f"{s} ({syntax_name(s)})" for s in bad)
        raise ConfigError(source, [f"gateway.transfer_syntaxes: the agent cannot decode {names} "
                                   "here (Deflated is never taken; compressed ones need the "
                                   "jpeg extra)"])
    return list(section.transfer_syntaxes)


def run_gateway(config: Config, source: str, stop: threading.Event) -> GatewaySummary:
    """Serve until ``stop`` is set. Raises ConfigError, OSError (the port cannot be bound)."""
    from agent.gateway.scp import StorageScp

    section = section_of(config, source)
    syntaxes = accepted_syntaxes(section, source)
    topics = Topics(config.agent.site, config.agent.device_id)
    topic = topics.scan(section.source)
    spool = Spool(spool_path(config), max_bytes=section.spool_max_bytes)
    forwarder: Forwarder

    def connected() -> None:
        forwarder.kick()

    def accepted(msg: Message) -> None:
        forwarder.on_accepted(msg)

    keep = section.keep_until_accepted
    conn = Connection(config.edge, config.client_id("gateway"), name="edge",
                      subscriptions=(topics.accepted_filter(),) if keep else (),
                      on_message=accepted if keep else None, on_connected=connected)
    forwarder = Forwarder(conn, topic, spool, ack_timeout_s=section.ack_timeout_s,
                          accepted_timeout_s=section.accepted_timeout_s if keep else None)
    intake = Intake(forwarder, sop_classes=section.sop_class_uids(),
                    max_instance_bytes=config.limits.max_payload_bytes)
    scp = StorageScp(section, intake, syntaxes)
    notifier = ServiceNotifier.from_environ()
    forwarder.start()  # sends only while connected: nothing until conn.start() below
    try:
        # The port first: a second gateway on one config fails here, before its CONNECT
        # (same client id) would knock the running one off the broker.
        bound = scp.start()
    except OSError:
        forwarder.stop()
        spool.close()
        raise
    conn.start()
    log.info("gateway_listening", ae_title=section.ae_title, host=bound.host, port=bound.port,
             topic=str(topic), sop_classes=len(section.sop_classes),
             transfer_syntaxes=[syntax_name(s) for s in syntaxes],
             allowed_calling=len(section.allowed_calling_ae_titles), spooled=spool.count)
    told_down = False
    try:
        while not stop.is_set():
            notifier.beat(status=lambda: _status(conn, forwarder, spool))
            if not conn.connected and not told_down and conn.last_error:
                told_down = True
                log.warning("gateway_broker_down", url=config.edge.url, error=conn.last_error,
                            note="C-STORE goes on: instances are committed to the spool "
                            "and sent when the broker is back")
            elif conn.connected:
                told_down = False
            stop.wait(0.5)
    finally:
        notifier.stopping()
        scp.stop()
        deadline = time.monotonic() + STOP_DRAIN_S
        while spool.count and conn.connected and time.monotonic() < deadline:
            time.sleep(0.1)
        forwarder.stop()
        conn.stop()
        c = forwarder.counts
        summary = GatewaySummary(c.published, c.spooled, c.drained, c.confirmed, c.resent,
                                 spool.count)
        spool.close()
    log.info("gateway_stopped", published=summary.published, spooled=summary.spooled,
             drained=summary.drained, confirmed=summary.confirmed, resent=summary.resent,
             left_in_spool=summary.left_in_spool)
    return summary


def _status(conn: Connection, forwarder: Forwarder, spool: Spool) -> str:
    c = forwarder.counts
    broker = "broker connected" if conn.connected else "broker DOWN (spooling)"
    return (f"{broker}; published {c.published}, spooled {c.spooled}, drained {c.drained}, "
            f"confirmed {c.confirmed}, in spool {spool.count}")
