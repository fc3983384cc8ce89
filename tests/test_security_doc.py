"""``docs/security.md`` says which test proves each control: every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "security.md").read_text()
TESTS = {p.name: p.read_text() for p in (REPO / "tests").rglob("test_*.py")}


def _defined(name: str, file: str | None = None) -> bool:
    sources = [TESTS.get(Path(file).name, "")] if file else list(TESTS.values())
    return any(re.search(rf"^def {name}\(", text, re.M) for text in sources)


def test_every_named_test_exists() -> None:
    full = re.findall(r"(tests/[\w/]+\.py)::(\w+)", DOC)
    short = re.findall(r"`(test_\w+\.py)::(\w+)`", DOC)
    chained = re.findall(r"`::(\w+)`", DOC)
    assert len(full) + len(short) + len(chained) >= 15
    for file, _ in full:
        assert (REPO / file).is_file(), file
    missing = [f"{f}::{n}" for f, n in full + short if not _defined(n, f)]
    missing += [n for n in chained if not _defined(n)]
    assert missing == []
    for file in set(re.findall(r"`(tests/[\w/]+\.py)`", DOC)):
        assert (REPO / file).is_file(), file
