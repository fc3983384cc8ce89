"""The operator's TUF repository on disk: keys, the root, and one signed release per group.

Layout of ``DIR`` (``iomt-agent fleet init-repo``):

* ``root.json``: the trusted root to install on nodes (``[fleet] root``);
* ``keys/{role}-{n}.pem``: Ed25519 private keys (PKCS#8, 0600; ``keys/`` is 0700): keep the
  root keys offline;
* ``metadata/{n}.root.json``: every root version (nodes walk the chain);
* ``repo.json``: the repository-wide version counter: every release of every group takes
  the next number for its targets, snapshot and timestamp, so a node that is shown another
  group's (validly signed) metadata is never stuck behind a higher version;
* ``groups/{group}/``: the group's last release (``release.json``, the metadata files, the
  target tar).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent.errors import AgentError
from agent.fleet.clock import issued_now
from agent.transport.topics import check_level

ROLES = ("root", "targets", "snapshot", "timestamp")
TARGET_NAME = "bundle.tar"  # the one target of a group: the bundle it should serve
EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=90),
          "snapshot": timedelta(days=7), "timestamp": timedelta(days=1)}
SERIALIZER = JSONSerializer(compact=True)


class RepoError(AgentError):
    """The repository directory cannot be used (missing, incomplete, a bad key file)."""


@dataclass(frozen=True)
class Release:
    """One signed release of a group: the metadata bytes and the target."""

    group: str
    version: int  # of targets, snapshot and timestamp alike
    roots: dict[int, bytes]  # every root version
    targets: bytes
    snapshot: bytes
    timestamp: bytes
    target: bytes  # the bundle tar
    sha256: str


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def expires(role: str, now: datetime | None = None) -> datetime:
    return ((now or datetime.now(UTC)) + EXPIRY[role]).replace(microsecond=0)


def init_repo(directory: Path, root_threshold: int = 1, root_keys: int | None = None) -> Path:
    """Create the keys and the first root; returns ``DIR/root.json``."""
    root_keys = root_keys or root_threshold
    if root_threshold < 1 or root_keys < root_threshold:
        raise RepoError(f"root threshold {root_threshold} needs at least that many root keys "
                        f"(got {root_keys})")
    if directory.exists() and not directory.is_dir():
        raise RepoError(f"{directory} is a file: give a new directory for the repository")
    if directory.exists() and any(directory.iterdir()):
        raise RepoError(f"{directory} exists and is not empty: choose a new directory")
    keys = directory / "keys"
    try:
        keys.mkdir(parents=True, mode=0o700)
        (directory / "metadata").mkdir()
    except OSError as exc:
        raise RepoError(f"cannot create {directory}: {exc.strerror}") from None
    root = Root(expires=expires("root"), consistent_snapshot=True)
    signers = []
    for role in ROLES:
        for n in range(1, (root_keys if role == "root" else 1) + 1):
            signer = CryptoSigner.generate_ed25519()
            write_private(keys / f"{role}-{n}.pem", signer.private_bytes)
            root.add_key(signer.public_key, role)
            if role == "root":
                signers.append(signer)
    root.roles["root"].threshold = root_threshold
    md = Metadata(root)
    for signer in signers:
        md.sign(signer, append=True)
    data = md.to_bytes(SERIALIZER)
    (directory / "metadata" / "1.root.json").write_bytes(data)
    (directory / "root.json").write_bytes(data)
    (directory / "repo.json").write_text(json.dumps({"version": 0}) + "\n")
    return directory / "root.json"


def roots(directory: Path) -> dict[int, bytes]:
    """Every root version in the repository, by version."""
    found = {int(p.name.split(".")[0]): p.read_bytes()
             for p in (directory / "metadata").glob("*.root.json")
             if p.name.split(".")[0].isdigit()}
    if not found:
        raise RepoError(f"{directory} holds no metadata/N.root.json: is it a fleet repository "
                        "(`iomt-agent fleet init-repo`)?")
    return found


def signers_for(directory: Path, role: str, root: Root) -> list[CryptoSigner]:
    """The private keys in ``keys/`` that the root lists for ``role``."""
    wanted = set(root.roles[role].keyids)
    found = []
    for path in sorted((directory / "keys").glob(f"{role}-*.pem")):
        try:
            signer = CryptoSigner(load_pem_private_key(path.read_bytes(), None))
        except (OSError, ValueError, TypeError) as exc:
            raise RepoError(f"{path}: not a usable private key: {exc}") from None
        if signer.public_key.keyid in wanted:
            found.append(signer)
    if len(found) < root.roles[role].threshold:
        raise RepoError(f"{directory / 'keys'}: {len(found)} key(s) for role {role}, the "
                        f"root needs {root.roles[role].threshold}")
    return found


def sign(signed: Targets | Snapshot | Timestamp, signers: list[CryptoSigner]) -> bytes:
    md: Metadata[Any] = Metadata(signed)
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes(SERIALIZER)


def next_version(directory: Path) -> int:
    state = directory / "repo.json"
    try:
        version = int(json.loads(state.read_text())["version"]) + 1
    except (OSError, ValueError, KeyError) as exc:
        raise RepoError(f"{state}: cannot read the version counter: {exc}") from None
    state.write_text(json.dumps({"version": version}) + "\n")
    return version


def sign_release(directory: Path, group: str, tar: bytes, custom: dict[str, Any],
                 now: datetime | None = None) -> Release:
    """Sign a new version of ``group``'s targets (the one target ``bundle.tar`` = ``tar``,
    ``custom`` describing it), snapshot and timestamp; keep it under ``groups/{group}``."""
    check_level(group, "group")
    chain = roots(directory)
    root = Metadata[Root].from_bytes(chain[max(chain)]).signed
    version = next_version(directory)
    digest = hashlib.sha256(tar).hexdigest()
    target = TargetFile(len(tar), {"sha256": digest}, TARGET_NAME,
                        {"custom": {**custom, "group": group}})
    targets = sign(Targets(version=version, expires=expires("targets", now),
                           targets={TARGET_NAME: target}),
                   signers_for(directory, "targets", root))
    snapshot = sign(Snapshot(version=version, expires=expires("snapshot", now),
                             meta={"targets.json": MetaFile(version=version)}),
                    signers_for(directory, "snapshot", root))
    timestamp = sign(Timestamp(version=version, expires=expires("timestamp", now),
                               snapshot_meta=MetaFile(version=version),
                               unrecognized_fields=issued_now(now)),
                     signers_for(directory, "timestamp", root))
    release = Release(group, version, chain, targets, snapshot, timestamp, tar, digest)
    keep = directory / "groups" / group
    keep.mkdir(parents=True, exist_ok=True)
    for name, data in (("targets.json", targets), ("snapshot.json", snapshot),
                       ("timestamp.json", timestamp), (TARGET_NAME, tar)):
        (keep / name).write_bytes(data)
    history = keep / "history"  # every bundle the group was given, for `fleet rollback`
    history.mkdir(exist_ok=True)
    stem = f"{digest[:16]}"
    if not (history / f"{stem}.tar").exists():
        (history / f"{stem}.tar").write_bytes(tar)
    (history / f"{stem}.json").write_text(json.dumps(
        {**custom, "sha256": digest, "published": version}) + "\n")
    return release


def last_custom(directory: Path, group: str) -> dict[str, Any]:
    """The ``custom`` of the group's last release (its bundle, version and rollout)."""
    roots(directory)  # a path that is no repository is named as such
    keep = directory / "groups" / check_level(group, "group")
    try:
        targets = Metadata[Targets].from_bytes((keep / "targets.json").read_bytes()).signed
    except (OSError, ValueError) as exc:
        raise RepoError(f"{keep}: no release of group {group} ({exc}): `fleet publish` one "
                        "first") from None
    custom = dict(targets.targets[TARGET_NAME].custom or {})
    custom.pop("group", None)
    return custom


def resign_release(directory: Path, group: str, now: datetime | None = None,
                   custom: dict[str, Any] | None = None) -> Release:
    """The group's last release signed again as new versions with fresh expiry (the same
    target bytes, so nodes download nothing): ``fleet refresh``; ``custom`` replaces its
    description (``fleet promote``)."""
    roots(directory)  # a path that is no repository is named as such
    keep = directory / "groups" / check_level(group, "group")
    try:
        targets = Metadata[Targets].from_bytes((keep / "targets.json").read_bytes()).signed
        tar = (keep / TARGET_NAME).read_bytes()
    except (OSError, ValueError) as exc:
        raise RepoError(f"{keep}: no release of group {group} to refresh ({exc}): "
                        "`fleet publish` one first") from None
    if custom is None:
        custom = dict(targets.targets[TARGET_NAME].custom or {})
        custom.pop("group", None)
    return sign_release(directory, group, tar, custom, now)


def earlier_bundle(directory: Path, group: str, version: str | None,
                   ) -> tuple[bytes, dict[str, Any]]:
    """The tar and description of the last release of ``group`` whose bundle version is
    ``version`` (``fleet rollback --to``); None: the last one given to the whole group
    (not a canary release: ``fleet halt``)."""
    history = directory / "groups" / check_level(group, "group") / "history"
    found: list[tuple[int, Path, dict[str, Any]]] = []
    for path in history.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            wide = (doc.get("rollout") or {}).get("stage", "all") == "all"
            if str(doc.get("version")) == version or (version is None and wide):
                found.append((int(doc.get("published", 0)), path, doc))
    if not found:
        known = sorted({str(json.loads(p.read_text()).get("version"))
                        for p in history.glob("*.json")})
        raise RepoError(f"group {group} was never given bundle version {version} "
                        f"(known: {', '.join(known) or 'none'})" if version else
                        f"group {group} has no release for all its devices to go back to")
    _, path, doc = max(found, key=lambda f: f[0])
    custom = {k: v for k, v in doc.items() if k not in ("sha256", "published", "group")}
    return path.with_suffix(".tar").read_bytes(), custom


def previous_release(directory: Path, group: str) -> dict[str, Any] | None:
    """What the last publish of ``group`` put on the broker (``release.json``)."""
    path = directory / "groups" / group / "release.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc


def record_release(directory: Path, release: Release, chunks: int) -> None:
    (directory / "groups" / release.group / "release.json").write_text(json.dumps(
        {"version": release.version, "sha256": release.sha256, "chunks": chunks}) + "\n")
