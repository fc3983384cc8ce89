"""The [gateway] section (agent.config_gateway): defaults, and errors that name the key."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, parse_config
from agent.config_gateway import STORAGE_CLASSES
from tests.test_config import VALID


def _parse(section: str):  # type: ignore[no-untyped-def]
    return parse_config(VALID + "\n[gateway]\n" + section, "test.toml")


def _problems(section: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        _parse(section)
    return ei.value.problems


def test_defaults() -> None:
    gw = _parse('allowed_calling_ae_titles = ["MRI-1", "PACS"]').gateway
    assert gw is not None
    assert (gw.ae_title, gw.port, gw.max_associations) == ("IOMT-GW", 11112, 4)
    assert gw.sop_class_uids() == [STORAGE_CLASSES["MRImageStorage"],
                                   STORAGE_CLASSES["CTImageStorage"]]
    assert gw.transfer_syntaxes is None and gw.source == "gateway"
    assert gw.keep_until_accepted is True and gw.accepted_timeout_s == 60.0
    assert parse_config(VALID).gateway is None  # the section is optional


@pytest.mark.parametrize(("section", "needle"), [
    ("port = 11112", "gateway.allowed_calling_ae_titles"),
    ('allowed_calling_ae_titles = []', "gateway.allowed_calling_ae_titles"),
    ('allowed_calling_ae_titles = ["A\\\\B"]', "not valid"),
    ('allowed_calling_ae_titles = ["X"]\nae_title = "SEVENTEEN-CHARS-X"', "gateway.ae_title"),
    ('allowed_calling_ae_titles = ["X"]\nsop_classes = ["MRImage"]', "neither a dotted UID"),
    ('allowed_calling_ae_titles = ["X"]\ntransfer_syntaxes = ["jpeg"]', "not a dotted UID"),
    ('allowed_calling_ae_titles = ["X"]\nport = 0', "gateway.port"),
    ('allowed_calling_ae_titles = ["X"]\nsource = "a/b"', "gateway.source"),
    ('allowed_calling_ae_titles = ["X"]\nlisten = 1', "gateway.listen"),
    ('allowed_calling_ae_titles = ["X"]\naccepted_timeout_s = 0', "gateway.accepted_timeout_s"),
    ('allowed_calling_ae_titles = ["X"]\nkeep_until_accepted = "maybe"',
     "gateway.keep_until_accepted"),
])
def test_bad_values_name_the_key(section: str, needle: str) -> None:
    assert any(needle in p for p in _problems(section)), _problems(section)
