"""The site's de-identification secret: 32 random bytes, hex, in a 0600 file.

It keys the UID pseudonyms and date offsets of ``agent.dicom.deid``: every node of one site
holds the same file, so they map a source UID to the same pseudonym; a lost secret means
new pseudonyms (studies split), a leaked one lets its holder link pseudonyms to source UIDs.
"""

from __future__ import annotations

import binascii
import os
import secrets
import stat
from pathlib import Path

from agent.crypto.keys import KeyFileError

SECRET_BYTES = 32


def create_site_secret(path: Path, *, overwrite: bool = False) -> None:
    """Write a new secret to ``path`` (mode 0600); refuses to replace one unless
    ``overwrite``, since a new secret gives every UID a new pseudonym."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(SECRET_BYTES) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def load_site_secret(path: Path) -> bytes:
    """The secret in ``path``. Raises ``KeyFileError`` (naming the file and the fix) when it
    is missing, readable by group or others, or not 32 hex-encoded bytes or more."""
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise KeyFileError(
            f"{path}: de-identification secret not found: restore it from the backup, or copy "
            "it from another node of this site (every node of a site needs the same one, or "
            "a study gets a second set of pseudonyms: docs/deploy.md, install step 4); only a "
            "new site starts with a new one (`iomt-agent init` writes it)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the de-identification secret: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if os.name == "posix" and st.st_mode & 0o077:
        raise KeyFileError(f"{path}: secret file is accessible by group/others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}); run 'chmod 600 {path}'")
    try:
        secret = binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        secret = b""
    if len(secret) < SECRET_BYTES:
        raise KeyFileError(f"{path}: not a de-identification secret (expected "
                           f"{2 * SECRET_BYTES} hex digits)")
    return secret
