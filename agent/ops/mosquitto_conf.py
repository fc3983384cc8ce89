"""The two brokers' Mosquitto configs and ACL files, written by ``iomt-agent certs init``.

``DIR/mosquitto/edge.conf`` and ``cloud.conf`` run as they are (``mosquitto -c FILE``): one
TLS listener that requires a client certificate from the PKI's CA, the certificate's CN as
the user name, no anonymous clients, an ACL file, persistence inside DIR and size limits.

The ACL is least privilege per broker (``acl_rules``, kept as data so that docs and tests
can show it): anything not granted is denied. Mosquitto drops an unauthorized publish
(MQTT 5: PUBACK 0x87) and refuses an unauthorized subscription (MQTT 5: SUBACK 0x87).
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.transport.topics import Topic, Topics, every_status, fleet_filter

if TYPE_CHECKING:
    from agent.ops.certs import Identity, PkiOptions

Broker = Literal["edge", "cloud"]
Access = Literal["read", "write", "readwrite"]

# The agent refuses scans over limits.max_payload_bytes (64 MiB by default); the broker
# refuses packets no agent would take (the payload plus room for the header and properties).
MAX_PAYLOAD = 64 * 1024 * 1024
MAX_PACKET_SIZE = MAX_PAYLOAD + 64 * 1024
# Mosquitto keeps a client's queued messages in memory: bound them by count and bytes.
MAX_QUEUED_MESSAGES = 10000
MAX_QUEUED_BYTES = 2 * 1024 * 1024 * 1024


@dataclass(frozen=True)
class Rule:
    """One ACL grant: on ``broker``, identity ``cn`` may ``access`` topics matching ``topic``."""

    broker: Broker
    role: str
    cn: str
    access: Access
    topic: Topic


def acl_rules(site: str, devices: list[str], group: str,
              people: list[Identity]) -> list[Rule]:
    """Every grant of both brokers. Devices: on the edge, read the site's scans and write
    their own status (and will) and scan receipts (``accepted``); on the cloud, write their
    own results, status and errors and read their own receipts and their group's fleet
    topics. The gateway writes scans and reads the site's scan receipts (edge only). The
    cloud consumer reads the site's results, status and errors and writes their receipts
    (cloud only). The fleet operator
    writes fleet topics and reads every status (cloud only)."""
    rules: list[Rule] = []
    site_topics = Topics(site, devices[0])
    for ident in people:
        if ident.role == "device":
            own = Topics(site, ident.cn)
            rules += [
                Rule("edge", "device", ident.cn, "read", site_topics.scans_filter()),
                Rule("edge", "device", ident.cn, "write", own.status),
                Rule("edge", "device", ident.cn, "write", own.accepted),
                Rule("cloud", "device", ident.cn, "write", own.results),
                Rule("cloud", "device", ident.cn, "write", own.status),
                Rule("cloud", "device", ident.cn, "write", own.errors),
                Rule("cloud", "device", ident.cn, "read", fleet_filter(group)),
                Rule("cloud", "device", ident.cn, "read", own.receipts),
            ]
        elif ident.role == "gateway":
            rules += [Rule("edge", "gateway", ident.cn, "write",
                           Topic(f"iomt/{site}/scans/#", filter=True)),
                      Rule("edge", "gateway", ident.cn, "read", site_topics.accepted_filter())]
        elif ident.role == "cloud":
            rules += [Rule("cloud", "cloud", ident.cn, "read", t) for t in (
                site_topics.results_filter(), site_topics.status_filter(),
                site_topics.errors_filter())]
            rules.append(Rule("cloud", "cloud", ident.cn, "write",
                              site_topics.receipts_filter()))
        elif ident.role == "operator":
            rules += [Rule("cloud", "operator", ident.cn, "readwrite", fleet_filter()),
                      Rule("cloud", "operator", ident.cn, "read", every_status())]
    return rules


def acl_text(rules: list[Rule], broker: Broker, site: str) -> str:
    """The Mosquitto ACL file of one broker: one ``user`` block per identity."""
    lines = [f"# {broker} broker ACL of site {site} (written by iomt-agent certs init).",
             "# The user name is the client certificate's CN (use_identity_as_username).",
             "# Anything not granted here is denied.", ""]
    by_user: dict[str, list[Rule]] = {}
    for rule in rules:
        if rule.broker == broker:
            by_user.setdefault(rule.cn, []).append(rule)
    for cn, granted in by_user.items():
        lines.append(f"# {granted[0].role}")
        lines.append(f"user {cn}")
        lines += [f"topic {r.access} {r.topic}" for r in granted]
        lines.append("")
    return "\n".join(lines)


def broker_conf(root: Path, broker: Broker, port: int, site: str, public: bool) -> str:
    """Mosquitto 2.0 config text for one broker; every path absolute (``root``: the PKI)."""
    m = root / "mosquitto"
    bind = "" if public else " 127.0.0.1"
    return f"""\
# {broker} broker of site {site} (written by iomt-agent certs init).
# Run it as it is:  mosquitto -c {m / f"{broker}.conf"}
# Every path below is absolute: after moving the directory, run certs init again.
per_listener_settings false
allow_anonymous false
acl_file {m / f"{broker}.acl"}

# The user the broker drops to when started as root: it must be able to read the key.
user {getpass.getuser()}

persistence true
persistence_location {m / f"{broker}-data"}/
autosave_interval 60

# Size limits: nothing bigger than the agent would take; bounded queues per client.
max_packet_size {MAX_PACKET_SIZE}
max_queued_messages {MAX_QUEUED_MESSAGES}
max_queued_bytes {MAX_QUEUED_BYTES}
max_inflight_messages 64

log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true

# Mutual TLS: only clients with a certificate from this CA; their CN is their user name.
listener {port}{bind}
protocol mqtt
cafile {root / "ca" / "ca.pem"}
certfile {root / "brokers" / f"{broker}.pem"}
keyfile {root / "brokers" / f"{broker}.key"}
tls_version tlsv1.2
require_certificate true
use_identity_as_username true
# Revocation: point crlfile at the CA's current CRL (PEM) and restart the broker.
# crlfile {root / "ca" / "crl.pem"}
"""


def write_broker_configs(root: Path, opts: PkiOptions, people: list[Identity]) -> list[Rule]:
    """Write ``mosquitto/{edge,cloud}.conf`` and ``.acl`` and the data directories."""
    m = root / "mosquitto"
    m.mkdir(parents=True, exist_ok=True)
    rules = acl_rules(opts.site, opts.device_ids, opts.fleet_group, people)
    public = bool(set(opts.hostnames) - {"localhost", "127.0.0.1", "::1"})
    ports: dict[Broker, int] = {"edge": opts.edge_port, "cloud": opts.cloud_port}
    for broker, port in ports.items():
        data = m / f"{broker}-data"
        data.mkdir(mode=0o700, exist_ok=True)  # queued scans and results
        (m / f"{broker}.acl").write_text(acl_text(rules, broker, opts.site), encoding="utf-8")
        (m / f"{broker}.conf").write_text(broker_conf(root, broker, port, opts.site, public),
                                          encoding="utf-8")
    return rules
