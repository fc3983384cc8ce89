"""The ``certs`` subcommand of ``iomt-agent`` (``agent.cli`` adds its parser here).

As in ``agent.cli``, only the standard library is imported up front; the work is
``agent.ops.certs``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def cmd_certs_init(args: argparse.Namespace) -> int:
    from agent.ops.certs import PkiError, PkiExists, PkiOptions, create_pki

    opts = PkiOptions(directory=Path(args.dir), site=args.site, device_ids=args.device_id,
                      hostnames=args.hostname or [], edge_port=args.edge_port,
                      cloud_port=args.cloud_port, fleet_group=args.fleet_group,
                      force=args.force)
    try:
        create_pki(opts)
    except PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL if isinstance(exc, PkiExists) else EXIT_CONFIG
    except OSError as exc:
        print(f"error: cannot write {args.dir}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    root = opts.directory
    print(f"wrote a development PKI in {root} (CA, broker and client certificates; private "
          "keys 0600) and the brokers' configs:")
    print(f"  mosquitto -c {root.resolve() / 'mosquitto' / 'edge.conf'}   # port "
          f"{opts.edge_port}")
    print(f"  mosquitto -c {root.resolve() / 'mosquitto' / 'cloud.conf'}  # port "
          f"{opts.cloud_port}")
    print(f"next: iomt-agent init NODE_DIR --certs {root} --site {opts.site} "
          f"--device-id {opts.device_ids[0]}")
    print("keep ca/ca.key off the edge nodes; certs/README.md says how to run a real CA")
    return EXIT_OK


def add_certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``iomt-agent certs init DIR --site S --device-id D ...``."""
    s = sub.add_parser("certs", help="development PKI and broker configs for mutual TLS")
    csub = s.add_subparsers(dest="certs_command", required=True, metavar="SUBCOMMAND")
    c = csub.add_parser(
        "init", help="create a CA, broker and client certificates, and both brokers' "
        "Mosquitto configs with their ACLs (exit 0; 1 DIR holds a PKI; 2 bad flag)",
        description="A development PKI: a CA; broker certificates for localhost, 127.0.0.1, "
        "::1 and each --hostname; client certificates whose CN is the identity (each device, "
        "the scanner gateway, the cloud consumer, the fleet operator); DIR/mosquitto/edge.conf "
        "and cloud.conf with their ACL files, to run as they are (mosquitto -c FILE).")
    c.add_argument("dir", help="directory to write the PKI into")
    c.add_argument("--site", required=True, help="site id (one topic level)")
    c.add_argument("--device-id", required=True, action="append",
                   help="device id (repeatable: one client certificate per device; the first "
                   "is the one `init --certs` configures)")
    c.add_argument("--hostname", action="append", metavar="NAME",
                   help="a broker host name or IP address for the server certificates "
                   "(repeatable; loopback is always included; any other name makes the "
                   "brokers listen on every interface)")
    c.add_argument("--edge-port", type=int, default=8883, help="edge broker port (8883)")
    c.add_argument("--cloud-port", type=int, default=8884, help="cloud broker port (8884)")
    c.add_argument("--fleet-group", default="default",
                   help="the devices' fleet group: they read iomt/fleet/GROUP/# (default)")
    c.add_argument("--force", action="store_true",
                   help="replace an existing PKI (every certificate it issued stops working)")
    c.set_defaults(func=cmd_certs_init)
