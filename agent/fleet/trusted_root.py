"""The fleet's trusted root on a node (``[fleet] root``, ``init --fleet-root``): checked
before it is installed or relied on.

It must be a TUF root that its own root keys sign (python-tuf reads and verifies it). A
private key given by mistake is named as such and never copied: the node would hold the
fleet's signing key, readable as an ordinary file.
"""

from __future__ import annotations

from pathlib import Path

GIVE = "give the root.json that `iomt-agent fleet init-repo` wrote (DIR/root.json)"


def root_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as the trusted root (a sentence that starts with the
    path), or None."""
    if path.is_dir():
        return f"{path} is a directory: {GIVE}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"{path}: no such file: {GIVE}"
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror})"
    if b"PRIVATE KEY-----" in data:
        return (f"{path} holds a private key, not the fleet's root: keys stay with the "
                f"operator (keep root keys offline); {GIVE}")
    from tuf.api.metadata import Metadata, Root

    try:
        md: Metadata[Root] = Metadata.from_bytes(data)
        if not isinstance(md.signed, Root):
            return f"{path} holds TUF {md.signed.type} metadata, not the root: {GIVE}"
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except Exception as exc:  # tuf's DeserializationError, UnsignedMetadataError, ...
        return f"{path} is not a signed TUF root ({type(exc).__name__}: {exc}): {GIVE}"
    return None


def root_summary(path: Path) -> str:
    """One line about a root that ``root_problem`` accepted."""
    from tuf.api.metadata import Metadata, Root

    md: Metadata[Root] = Metadata.from_bytes(path.read_bytes())
    return (f"fleet root version {md.signed.version}: signed by its root keys (threshold "
            f"{md.signed.roles[Root.type].threshold})")
