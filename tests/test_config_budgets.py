"""The [storage] and [decode] sections: defaults, key-path errors, documented fields."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, parse_config
from tests.test_config import VALID


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    return err.value.problems


def test_defaults_values_and_key_paths() -> None:
    cfg = parse_config(VALID)
    assert cfg.storage.outbox_full == "backpressure" and cfg.storage.min_free_disk_bytes > 0
    assert cfg.decode.isolate and cfg.decode.timeout_s == 10.0
    cfg = parse_config(VALID + '[storage]\noutbox_full = "drop_oldest"\nmin_free_disk_bytes = 0\n'
                       "[decode]\nisolate = false\nmemory_bytes = 268435456\ntimeout_s = 2.5\n")
    assert cfg.storage.outbox_full == "drop_oldest" and cfg.storage.min_free_disk_bytes == 0
    assert not cfg.decode.isolate and cfg.decode.memory_bytes == 256 << 20
    problems = _problems(VALID + '[storage]\noutbox_full = "drop_newest"\n'
                         "[decode]\ntimeout_s = 0\nmemory = 1\n")
    assert any(p.startswith("storage.outbox_full:") for p in problems)
    assert any(p.startswith("decode.timeout_s:") for p in problems)
    assert any(p.startswith("decode.memory: unknown key") for p in problems)
    for section in (cfg.storage, cfg.decode):
        for name, info in type(section).model_fields.items():
            assert info.title and info.description, name
