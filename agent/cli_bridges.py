"""``iomt-agent gateway`` (DICOM C-STORE into MQTT) and the flags of ``receive``'s DICOMweb
export (STOW-RS); kept apart from ``agent.cli`` to keep that module small. Only the
standard library is imported up front."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent.signals import StopRequested, StopSignals

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def cmd_gateway(args: argparse.Namespace) -> int:
    from agent.cli import _load

    with StopSignals() as stop:
        try:
            from agent.log import configure, get_logger

            configure()
            config = _load(args.config)
            configure(config.log.level, config.log.format)
            from agent.config import ConfigError
            from agent.gateway.service import run_gateway

            log = get_logger("agent.gateway")
            stop.ready()
            try:
                run_gateway(config, args.config, stop.event)
            except ConfigError as exc:
                print(exc.render(), file=sys.stderr)
                return EXIT_CONFIG
            except OSError as exc:  # the port is taken or not ours to bind
                log.error("cannot_listen", error=str(exc), fix="free the port or set "
                          "gateway.port (a port below 1024 needs CAP_NET_BIND_SERVICE)")
                return EXIT_FAIL
            return EXIT_OK
        except StopRequested as exc:
            from agent.log import ensure_configured, get_logger

            ensure_configured()
            get_logger("agent.gateway").info("gateway_stopped", signal=exc.signal_name,
                                             during="start-up")
            return EXIT_OK


def add_gateway_parser(sub: Any) -> None:
    s = sub.add_parser("gateway", help="DICOM C-STORE gateway: a Storage SCP that publishes "
                       "each instance to the site's scan topic (needs [gateway])")
    s.add_argument("--config", required=True, help="path to agent.toml")
    s.set_defaults(func=cmd_gateway)


def add_stow_flags(s: argparse.ArgumentParser) -> None:
    """``receive``'s DICOMweb export: each filed result is stored in an archive too."""
    g = s.add_argument_group("DICOMweb export (STOW-RS)")
    g.add_argument("--stow-url", metavar="URL", help="DICOMweb base URL of the archive (e.g. "
                   "https://pacs.example/dicom-web): every filed result is stored there too")
    g.add_argument("--stow-user", metavar="NAME", help="HTTP basic auth user name")
    g.add_argument("--stow-password-file", metavar="FILE", help="file holding the basic auth "
                   "password")
    g.add_argument("--stow-token-file", metavar="FILE", help="file holding a bearer token")
    g.add_argument("--stow-cert", metavar="PEM", help="client certificate for mutual TLS")
    g.add_argument("--stow-key", metavar="PEM", help="its private key (default: in --stow-cert)")
    g.add_argument("--stow-ca", metavar="PEM", help="CA bundle that signs the archive's "
                   "certificate (default: the system store)")
    g.add_argument("--stow-timeout", type=float, default=30.0, metavar="S",
                   help="seconds per HTTP request (default 30)")
    g.add_argument("--stow-attempts", type=int, default=6, metavar="N",
                   help="tries per result within one run, with exponential backoff, before it "
                   "is left for the next run (default 6)")
