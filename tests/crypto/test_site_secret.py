"""The site's de-identification secret file: created 0600, refused when exposed or wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config_deid import DeidSection
from agent.crypto.keys import KeyFileError
from agent.crypto.site_secret import create_site_secret, load_site_secret
from agent.daemon.pipeline import deidentifier


def test_created_0600_loaded_and_never_replaced_silently(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "site-deid.key"
    create_site_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600
    secret = load_site_secret(path)
    assert len(secret) == 32
    with pytest.raises(FileExistsError):
        create_site_secret(path)
    create_site_secret(path, overwrite=True)
    assert load_site_secret(path) != secret


def test_refusals_name_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "site-deid.key"
    with pytest.raises(KeyFileError, match="restore it from the backup, or copy it from"):
        load_site_secret(path)
    create_site_secret(path)
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match=re.escape(f"chmod 600 {path}")):
        load_site_secret(path)
    path.write_text("not hex\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="64 hex digits"):
        load_site_secret(path)


def test_the_config_section_makes_the_deidentifier(tmp_path: Path) -> None:
    path = tmp_path / "site-deid.key"
    create_site_secret(path)
    assert deidentifier(DeidSection(enabled=False, secret_file=path)) is None
    deid = deidentifier(DeidSection(secret_file=path, retain_modified_dates=True,
                                    retain_device_identity=True))
    assert deid is not None and deid.options.names == ("dates", "device")
    with pytest.raises(KeyFileError):
        deidentifier(DeidSection(secret_file=tmp_path / "missing.key"))
