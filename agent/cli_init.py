"""The ``init`` subcommand of ``iomt-agent`` (``agent.cli`` adds its parser here): a
ready-to-run directory, config and development keys.

As in ``agent.cli``, only the standard library is imported up front; the work is
``agent.ops.scaffold``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2
URL_HELP = "mqtt://host[:port] or mqtts://host[:port] (default port 1883 / 8883)"


def cmd_init(args: argparse.Namespace) -> int:
    from agent.config import ConfigError
    from agent.model.bundle import BundleError
    from agent.ops.certs import PkiError
    from agent.ops.scaffold import InitOptions, write_directory

    if args.certs is None and not (args.edge_url and args.cloud_url):
        print("error: give --edge-url and --cloud-url (or --certs DIR)", file=sys.stderr)
        return EXIT_CONFIG
    pki = args.certs is not None  # with a PKI, site and device default to its own
    try:
        path = write_directory(
            InitOptions(
                directory=Path(args.dir),
                edge_url=args.edge_url or "",
                cloud_url=args.cloud_url or "",
                site=args.site or ("" if pki else "site-1"),
                device_id=args.device_id or ("" if pki else "edge-1"),
                certs=Path(args.certs) if pki else None,
                bundle=Path(args.bundle) if args.bundle else None,
                protocol=args.protocol,
                recipient_kind=args.recipient_kind,
                force=args.force,
                fleet_group=args.fleet_group,
                fleet_root=Path(args.fleet_root) if args.fleet_root else None,
                allow_plaintext=args.allow_plaintext,
            )
        )
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    except PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (FileExistsError, FileNotFoundError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"wrote {path} and development keys in {path.parent / 'keys'}")
    print(f"next: iomt-agent config check {path}; iomt-agent receive --config {path} --out "
          "results --timeout 3 (once: the cloud broker then keeps results for it); "
          f"iomt-agent run --config {path}")
    return EXIT_OK


def add_init_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``iomt-agent init DIR ...`` on the top-level subparsers."""
    s = sub.add_parser("init", help="write a ready-to-run directory (config + dev keys)")
    s.add_argument("dir", help="directory to create")
    s.add_argument("--edge-url", help=URL_HELP)
    s.add_argument("--cloud-url", help=URL_HELP)
    s.add_argument("--certs", metavar="PKI_DIR", help="use the mutual-TLS PKI of `certs init`: "
                   "mqtts://localhost on its ports unless the URLs are given, its CA, the "
                   "device's certificate and key")
    s.add_argument("--site", help="site id (one topic level; default site-1 or the PKI's)")
    s.add_argument("--device-id", help="device id (default edge-1 or the PKI's first)")
    s.add_argument("--bundle", help="model bundle directory (default: models/t1w-to-t2w-lite)")
    s.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")
    s.add_argument("--recipient-kind", choices=["mlkem768-x25519", "x25519"],
                   default="mlkem768-x25519", help="HPKE KEM of the cloud recipient key")
    s.add_argument("--force", action="store_true", help="overwrite an existing directory")
    s.add_argument("--allow-plaintext", action="store_true", help="permit mqtt:// (no TLS) "
                   "to a host that is not loopback (writes allow_plaintext = true)")
    s.add_argument("--fleet-group", metavar="G", help="with --fleet-root: take signed model "
                   "updates for group G (a [fleet] section)")
    s.add_argument("--fleet-root", metavar="FILE", help="the fleet's trusted root.json "
                   "(copied to DIR/fleet/root.json)")
    s.set_defaults(func=cmd_init)
