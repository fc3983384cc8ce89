"""What a site computes, holding its de-identification secret, to map a result back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.crypto.site_secret import load_site_secret
from agent.dicom.deid import Deidentifier


def site_uid(node: Path) -> Callable[[str], str]:
    """The pseudonym function of the node directory ``node`` (written by ``init``): a
    source UID -> the UID that the node's de-identified results carry for it."""
    return Deidentifier(load_site_secret(node / "keys" / "site-deid.key")).uid
