"""``iomt-agent gateway`` (DICOM C-STORE into MQTT) and the flags of ``receive``'s DICOMweb
export (STOW-RS); kept apart from ``agent.cli`` to keep that module small. Only the
standard library is imported up front."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli_types import positive_float, positive_int
from agent.signals import StopRequested, StopSignals

if TYPE_CHECKING:
    from agent.cloud.stow import StowSettings

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def cmd_gateway(args: argparse.Namespace) -> int:
    from agent.cli import _load

    def hup() -> None:
        from agent.log import get_logger

        get_logger("agent.gateway").info("reload_ignored", note="the gateway reads its "
                                         "config at start: restart it to apply a change")

    with StopSignals(on_hup=hup) as stop:
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
    g.add_argument("--stow-timeout", type=positive_float, default=30.0, metavar="S",
                   help="seconds per HTTP request (default 30)")
    g.add_argument("--stow-attempts", type=positive_int, default=6, metavar="N",
                   help="tries per result within one run, with exponential backoff, before it "
                   "is left for the next run (default 6)")


def stow_settings(args: argparse.Namespace) -> StowSettings | None:
    """``--stow-*`` as settings (None without --stow-url); a bad combination exits 2."""
    from agent.cloud.stow import StowSettings

    def path(value: str | None) -> Path | None:
        return Path(value).resolve() if value else None

    others = [f for f in ("stow_user", "stow_password_file", "stow_token_file", "stow_cert",
                          "stow_key", "stow_ca") if getattr(args, f)]
    if not args.stow_url:
        if others:
            print(f"error: --{others[0].replace('_', '-')} needs --stow-url", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG)
        return None
    settings = StowSettings(
        url=args.stow_url, user=args.stow_user, password_file=path(args.stow_password_file),
        token_file=path(args.stow_token_file), cert=path(args.stow_cert),
        key=path(args.stow_key), ca=path(args.stow_ca), timeout_s=args.stow_timeout,
        attempts=args.stow_attempts)
    problems = settings.problems()
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return settings
