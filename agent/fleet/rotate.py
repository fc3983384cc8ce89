"""``iomt-agent fleet rotate-key``: replace a role's keys with a new one, through a new root.

The new root version lists the new key for the role instead of the old ones and is signed
by the old root's threshold of root keys (and, when the root keys themselves rotate, by the
new ones too), so nodes follow it from the root they trust. The old private keys move to
``keys/retired/``. Nodes see the new root at the next ``publish`` or ``refresh`` of each
group (both publish the whole root chain); until then the old keys' signatures still hold.
"""

from __future__ import annotations

from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from agent.fleet.repo import (
    ROLES,
    SERIALIZER,
    RepoError,
    expires,
    roots,
    signers_for,
    write_private,
)


def rotate_key(directory: Path, role: str) -> int:
    """Rotate ``role``'s keys; returns the new root version."""
    if role not in ROLES:
        raise RepoError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    chain = roots(directory)
    old = Metadata[Root].from_bytes(chain[max(chain)])
    old_root_signers = signers_for(directory, "root", old.signed)
    old_files = sorted((directory / "keys").glob(f"{role}-*.pem"))
    new = Metadata[Root].from_bytes(chain[max(chain)])
    root = new.signed
    keep = len(root.roles[role].keyids) if role == "root" else 1
    for keyid in list(root.roles[role].keyids):
        root.revoke_key(keyid, role)
    fresh = [CryptoSigner.generate_ed25519() for _ in range(keep)]
    for signer in fresh:
        root.add_key(signer.public_key, role)
    root.version += 1
    root.expires = expires("root")
    new.signatures.clear()
    for signer in old_root_signers + (fresh if role == "root" else []):
        new.sign(signer, append=True)
    data = new.to_bytes(SERIALIZER)
    retired = directory / "keys" / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    for path in old_files:
        path.rename(retired / f"v{root.version - 1}-{path.name}")
    for n, signer in enumerate(fresh, 1):
        write_private(directory / "keys" / f"{role}-{n}.pem", signer.private_bytes)
    (directory / "metadata" / f"{root.version}.root.json").write_bytes(data)
    (directory / "root.json").write_bytes(data)
    return root.version
