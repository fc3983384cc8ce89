"""``iomt-agent fleet ...``: the operator's commands (``agent.cli`` adds this parser).

As in ``agent.cli``, only the standard library is imported up front.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.cli_types import positive_float, positive_int

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def cmd_init_repo(args: argparse.Namespace) -> int:
    from agent.fleet.repo import RepoError, init_repo

    try:
        root = init_repo(Path(args.dir), args.root_threshold, args.root_keys)
    except RepoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"fleet repository in {args.dir}: keys in {Path(args.dir) / 'keys'} (0600; keep the "
          f"root keys offline)\ntrusted root for the nodes: {root} (their [fleet] root)")
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    from agent.errors import AgentError
    from agent.fleet.publish import publish
    from agent.log import configure

    configure("warning", "console")
    broker = _broker(args)
    if broker is None:
        return EXIT_CONFIG
    try:
        canaries = None
        if args.canary:
            from agent.fleet.rollout import pick_canaries

            canaries = pick_canaries(broker, args.group, args.canary)
            print(f"canaries: {', '.join(canaries)}")
        release = publish(Path(args.repo), Path(args.bundle), args.group, broker,
                          chunk_bytes=args.chunk_kib * 1024, timeout=args.timeout,
                          canaries=canaries)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"published version {release.version} to iomt/fleet/{args.group}/ on {args.broker}: "
          f"{len(release.target)} bytes, sha256 {release.sha256}")
    return EXIT_OK


def cmd_refresh(args: argparse.Namespace) -> int:
    from agent.errors import AgentError
    from agent.fleet.publish import refresh
    from agent.log import configure

    configure("warning", "console")
    broker = _broker(args)
    if broker is None:
        return EXIT_CONFIG
    try:
        release = refresh(Path(args.repo), args.group, broker, timeout=args.timeout)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"refreshed group {args.group}: version {release.version}, the same target "
          f"(sha256 {release.sha256[:16]}...)")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from agent.errors import AgentError
    from agent.fleet.publish import rollback
    from agent.log import configure

    configure("warning", "console")
    broker = _broker(args)
    if broker is None:
        return EXIT_CONFIG
    try:
        release = rollback(Path(args.repo), args.group, args.to, broker, timeout=args.timeout)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"group {args.group} gets bundle version {args.to} again as release version "
          f"{release.version} (sha256 {release.sha256[:16]}...)")
    return EXIT_OK


def cmd_promote_or_halt(args: argparse.Namespace) -> int:
    from agent.errors import AgentError
    from agent.fleet.rollout import halt, promote
    from agent.log import configure

    configure("warning", "console")
    broker = _broker(args)
    if broker is None:
        return EXIT_CONFIG
    step = promote if args.fleet_command == "promote" else halt
    try:
        release = step(Path(args.repo), args.group, broker, timeout=args.timeout)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    done = "promoted to all devices" if step is promote else "halted: back to"
    print(f"group {args.group}: {done} bundle {release.sha256[:16]}... (release version "
          f"{release.version})")
    return EXIT_OK


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from agent.fleet.repo import RepoError
    from agent.fleet.rotate import rotate_key

    try:
        version = rotate_key(Path(args.repo), args.role)
    except RepoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"new {args.role} key in {Path(args.repo) / 'keys'}; root version {version} lists "
          "it. Run `fleet refresh` for each group so the nodes follow the new root.")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from agent.errors import AgentError
    from agent.fleet.overview import collect, render
    from agent.log import configure

    configure("warning", "console")
    broker = _broker(args)
    if broker is None:
        return EXIT_CONFIG
    try:
        statuses = collect(broker, args.group, quiet_s=args.quiet)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(render(statuses))
    print(f"{len(statuses)} device(s) in group {args.group}")
    return EXIT_OK


def _broker(args: argparse.Namespace) -> Any:
    """The --broker flags as a BrokerConfig, or None after saying what is wrong. TLS is
    the one client context of ``agent.transport.tls`` (TLS >= 1.2, the server's
    certificate and host name verified); plaintext MQTT to a host that is not loopback is
    refused unless ``--allow-plaintext``."""
    from agent.config import BrokerConfig

    if args.key_file and not args.cert_file:
        print("error: --key needs --cert (the certificate it belongs to)", file=sys.stderr)
        return None
    try:
        broker = BrokerConfig(url=args.broker, ca_file=args.ca_file, cert_file=args.cert_file,
                              key_file=args.key_file, username=args.username,
                              password_file=args.password_file,
                              allow_plaintext=args.allow_plaintext)
    except ValueError as exc:
        print(f"error: --broker {args.broker}: {_first_error(exc)}", file=sys.stderr)
        return None
    if not broker.tls and (args.cert_file or args.ca_file):
        print(f"error: --cert and --ca need TLS: --broker {args.broker} is not mqtts://",
              file=sys.stderr)
        return None
    if not broker.tls and args.allow_plaintext:
        print(f"warning: --allow-plaintext: signed fleet metadata and your MQTT credentials "
              f"cross the network to {broker.host} unencrypted", file=sys.stderr)
    return broker


def _first_error(exc: ValueError) -> str:
    """A pydantic validation error's own sentence (one line), else the exception's text."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        found = errors()
        if found:
            return str(found[0].get("msg", exc)).removeprefix("Value error, ")
    return str(exc)


def _broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, metavar="URL",
                   help="the cloud broker: mqtts://host:port (or mqtt:// to loopback)")
    p.add_argument("--ca", "--ca-file", dest="ca_file", type=Path, metavar="PEM",
                   help="CA certificates that signed the broker's certificate (mqtts; "
                   "default: the system store)")
    p.add_argument("--cert", "--cert-file", dest="cert_file", type=Path, metavar="PEM",
                   help="client certificate for mutual TLS: the fleet operator's "
                   "(`certs init` writes clients/fleet-operator.pem)")
    p.add_argument("--key", "--key-file", dest="key_file", type=Path, metavar="PEM",
                   help="its private key (default: in the --cert file)")
    p.add_argument("--username", help="MQTT username")
    p.add_argument("--password-file", type=Path, help="file holding the MQTT password")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="permit mqtt:// (no TLS) to a host that is not loopback (warned)")


def add_fleet_parser(sub: Any) -> None:
    """``fleet`` and its subcommands, under the top-level parser's ``sub``."""
    s = sub.add_parser("fleet", help="signed model updates for groups of nodes (TUF over MQTT)",
                       description="The fleet operator's tools: a TUF repository of signing "
                       "keys, and signed releases published retained on the cloud broker.")
    fsub = s.add_subparsers(dest="fleet_command", required=True, metavar="SUBCOMMAND")
    f = fsub.add_parser("init-repo", help="create a repository: keys for root, targets, "
                        "snapshot, timestamp, and DIR/root.json for the nodes",
                        description="Exit 0 created; 1 DIR is not empty or bad threshold.")
    f.add_argument("dir", help="new (or empty) directory")
    f.add_argument("--root-threshold", type=positive_int, default=1, metavar="N",
                   help="root signatures a new root needs (default 1)")
    f.add_argument("--root-keys", type=positive_int, metavar="M",
                   help="root keys to create (default: the threshold)")
    f.set_defaults(func=cmd_init_repo)
    f = fsub.add_parser("publish", help="pack, sign and publish a bundle for a group",
                        description="Checks the bundle (schema, every sha256), packs it as a "
                        "tar, signs new targets/snapshot/timestamp versions and publishes "
                        "them with the chunked target, retained. Exit 0 published; 1 the "
                        "bundle, the repository or the broker refused; 2 bad --broker.")
    f.add_argument("--repo", required=True, help="the repository directory (init-repo)")
    f.add_argument("--bundle", required=True, help="model bundle directory")
    f.add_argument("--group", required=True, help="rollout group (a topic level)")
    _broker_args(f)
    f.add_argument("--canary", type=positive_int, metavar="N",
                   help="only the first N online devices "
                   "of the group take it, until `fleet promote`")
    f.add_argument("--chunk-kib", type=positive_int, default=256, metavar="K",
                   help="target chunk size in KiB (default 256)")
    f.add_argument("--timeout", type=positive_float, default=60.0,
                   help="seconds for the broker's acks")
    f.set_defaults(func=cmd_publish)
    f = fsub.add_parser("refresh", help="sign the group's last release again with fresh "
                        "expiry (timestamp: 1 day, snapshot: 7 days); run it from cron",
                        description="New targets/snapshot/timestamp versions for the same "
                        "target: nodes download nothing. Exit 0 published; 1 refused; 2 bad "
                        "--broker.")
    f.add_argument("--repo", required=True, help="the repository directory (init-repo)")
    f.add_argument("--group", required=True, help="rollout group (a topic level)")
    _broker_args(f)
    f.add_argument("--timeout", type=positive_float, default=60.0,
                   help="seconds for the broker's acks")
    f.set_defaults(func=cmd_refresh)
    f = fsub.add_parser("status", help="a table of the group's devices: online, model, "
                        "update state, last error (from their retained status)",
                        description="Exit 0 read; 1 the broker cannot be reached; 2 bad "
                        "--broker.")
    f.add_argument("--group", required=True, help="rollout group (a topic level)")
    _broker_args(f)
    f.add_argument("--quiet", type=positive_float, default=1.0, metavar="S",
                   help="stop reading after S seconds without a new status (default 1)")
    f.set_defaults(func=cmd_status)
    f = fsub.add_parser("rollback", help="give the group an earlier bundle again, as a new "
                        "release (a forward step in TUF versions)",
                        description="Republishes the last bundle with version VERSION that "
                        "this repository gave the group. Exit 0 published; 1 unknown version "
                        "or refused; 2 bad --broker.")
    f.add_argument("--repo", required=True, help="the repository directory (init-repo)")
    f.add_argument("--group", required=True, help="rollout group (a topic level)")
    f.add_argument("--to", required=True, metavar="VERSION", help="the bundle version")
    _broker_args(f)
    f.add_argument("--timeout", type=positive_float, default=60.0,
                   help="seconds for the broker's acks")
    f.set_defaults(func=cmd_rollback)
    for name, text in (("promote", "give the canary release to the whole group, once every "
                        "canary serves it (exit 1 while one does not, or after one failed)"),
                       ("halt", "stop a canary release: the group's previous bundle again, "
                        "as a new release")):
        f = fsub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}. Exit "
                            "0 done; 1 refused; 2 bad --broker.")
        f.add_argument("--repo", required=True, help="the repository directory (init-repo)")
        f.add_argument("--group", required=True, help="rollout group (a topic level)")
        _broker_args(f)
        f.add_argument("--timeout", type=positive_float, default=60.0, help="seconds for the acks")
        f.set_defaults(func=cmd_promote_or_halt)
    f = fsub.add_parser("rotate-key", help="replace a role's keys, through a new root "
                        "signed by the current root keys",
                        description="Exit 0 rotated; 1 refused (unknown role, missing keys).")
    f.add_argument("--repo", required=True, help="the repository directory (init-repo)")
    f.add_argument("--role", required=True, choices=["root", "targets", "snapshot",
                                                      "timestamp"])
    f.set_defaults(func=cmd_rotate_key)
