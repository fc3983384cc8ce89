"""The ``keys`` subcommand of ``iomt-agent``: new key pairs for a rotation, and key ids.

* ``keys recipient STEM [--kind K]``: a cloud recipient key pair, ``STEM.key`` (0600, for
  the receiver) and ``STEM.pub`` (for the nodes' ``seal.recipient_public_key``);
* ``keys signing STEM``: a device signing key pair, ``STEM.key`` (0600, the node's
  ``seal.device_signing_key``) and ``STEM.pub`` (for ``receiver.trusted_devices``);
* ``keys id FILE``: the key id of a key file (what the agent's and the receiver's log lines
  and the status name).

Only key ids are printed, never key bytes. ``docs/security.md`` ("Key rotation") gives the
order of the steps.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _write_pair(stem: str, private: object, public: object) -> int:
    from agent.crypto import keys

    key, pub = Path(f"{stem}.key"), Path(f"{stem}.pub")
    if stem.endswith("/") or Path(stem).is_dir():
        example = Path(stem) / "node-1"
        print(f"error: {stem} is a directory: give a file stem in it, e.g. {example} (writes "
              f"{example}.key and {example}.pub)", file=sys.stderr)
        return EXIT_FAIL
    try:
        keys.save_private_key(key, private)  # type: ignore[arg-type]
        keys.save_public_key(pub, public)  # type: ignore[arg-type]
    except keys.KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def cmd_keys_recipient(args: argparse.Namespace) -> int:
    from agent.crypto import keys

    private, public = keys.generate_recipient_keypair(args.kind)
    code = _write_pair(args.stem, private, public)
    if code == EXIT_OK:
        print(f"wrote {args.stem}.key (0600, the receiver's) and {args.stem}.pub (the nodes'); "
              f"{public.kind} key id {public.key_id}")
    return code


def cmd_keys_signing(args: argparse.Namespace) -> int:
    from agent.crypto import keys

    private = keys.generate_signing_key()
    code = _write_pair(args.stem, private, private.public_key())
    if code == EXIT_OK:
        print(f"wrote {args.stem}.key (0600, the node's) and {args.stem}.pub (the receiver's); "
              f"Ed25519 key id {keys.signing_key_id(private)}")
    return code


def cmd_keys_id(args: argparse.Namespace) -> int:
    from agent.crypto import keys

    path = Path(args.file)
    if path.is_dir():
        print(f"error: {path} is a directory: give a key file (.key or .pub)", file=sys.stderr)
        return EXIT_FAIL
    loaders: tuple[tuple[str, Callable[[], str]], ...] = (
        ("recipient public", lambda: keys.load_recipient_public_key(path).key_id),
        ("recipient private", lambda: keys.load_recipient_private_key(path).key_id),
        ("signing public", lambda: keys.signing_key_id(keys.load_verify_key(path))),
        ("signing private", lambda: keys.signing_key_id(keys.load_signing_key(path))),
    )
    problems = []
    for what, load in loaders:
        try:
            print(f"{path}: {what} key, key id {load()}")
            return EXIT_OK
        except keys.KeyFileError as exc:
            problems.append(str(exc))
    try:
        private = "PRIVATE KEY" in path.read_bytes()[:64].decode("ascii", "replace")
    except OSError:
        private = False
    # an open private key file is refused before it is parsed: say so only for one
    refused = [p for p in problems if "not found" in p or ("chmod 600" in p and private)]
    print(f"error: {refused[0] if refused else f'{path}: not a key file of this project'}",
          file=sys.stderr)
    return EXIT_FAIL


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``iomt-agent keys recipient|signing STEM`` and ``iomt-agent keys id FILE``."""
    s = sub.add_parser("keys", help="new key pairs for a key rotation, and key ids")
    ksub = s.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    r = ksub.add_parser("recipient", help="a new cloud recipient key pair: STEM.key (0600) "
                        "and STEM.pub")
    r.add_argument("stem", help="path without suffix")
    r.add_argument("--kind", choices=("mlkem768-x25519", "x25519"), default="mlkem768-x25519",
                   help="HPKE KEM (default: the hybrid ML-KEM-768 + X25519)")
    r.set_defaults(func=cmd_keys_recipient)
    g = ksub.add_parser("signing", help="a new device signing key pair (Ed25519): STEM.key "
                        "(0600) and STEM.pub")
    g.add_argument("stem", help="path without suffix")
    g.set_defaults(func=cmd_keys_signing)
    i = ksub.add_parser("id", help="the key id of a key file (as the logs and status name it)")
    i.add_argument("file", help="a recipient or signing key file, public or private")
    i.set_defaults(func=cmd_keys_id)
