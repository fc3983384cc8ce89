"""The hostile corpus through the decoder in-process (``decode_scan``): every payload ends
in a ``Scan`` or a ``ScanRejected`` with a registered reason, nothing else escapes; and
every case the fuzzer (``make fuzz``) found, kept in tests/fuzz/crashes/, still does.

The suite decodes a seeded subset; ``make hostile`` all 10,000 (``IOMT_HOSTILE_N``).
Element floods are left to the budgeted decoder process (tests/dicom/test_sandbox.py and
the live test): in-process they take seconds each, which is the point of that process.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.dicom.decode import REASONS, ScanRejected, decode_scan
from agent.model.bundle import InputContract, load_bundle
from tests.fuzz import corpus
from tests.integration.harness import REFERENCE_BUNDLE

N = int(os.environ.get("IOMT_HOSTILE_N", "600"))
CRASHES = Path(__file__).parent / "crashes"


@pytest.fixture(scope="module")
def contract() -> InputContract:
    return load_bundle(REFERENCE_BUNDLE).input


def _outcome(payload: bytes, contract: InputContract) -> str:
    try:
        decode_scan(payload, contract, pixel_budget=4096 * 4096, max_payload_bytes=64 << 20)
    except ScanRejected as exc:
        assert exc.reason in REASONS and exc.payload_sha256
        return exc.reason
    return "ok"


def test_the_corpus_is_deterministic() -> None:
    for i in (0, 1, 777, corpus.SIZE - 1):
        assert corpus.payload(i) == corpus.payload(i)
    assert corpus.payload(5) != corpus.payload(5, seed=corpus.SEED + 1)


def test_every_corpus_payload_decodes_or_is_rejected_with_a_reason(
        contract: InputContract) -> None:
    indices = ([i for i, _ in corpus.distinct(N).values()] if N >= corpus.SIZE
               else corpus.sample(N))
    outcomes: Counter[str] = Counter()
    families: Counter[str] = Counter()
    t0 = time.monotonic()
    for i in indices:
        name = corpus.family(i)
        families[name] += 1
        if name == "element_flood":
            continue  # the decoder process's job (see the module docstring)
        outcomes[_outcome(corpus.payload(i), contract)] += 1
    assert len(families) == len(corpus.FAMILIES)
    assert outcomes["ok"] > 0 and len(outcomes) > 5  # the corpus reaches deep, not only the door
    figures = {"payloads": sum(families.values()), "decoded_in_process": sum(outcomes.values()),
               "outcomes": dict(outcomes), "families": dict(families),
               "seconds": round(time.monotonic() - t0, 1),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(figures, indent=1))
    if os.environ.get("IOMT_HOSTILE_JSON"):
        Path(os.environ["IOMT_HOSTILE_JSON"]).write_text(json.dumps(figures, indent=1))


def test_fuzzer_findings_stay_fixed(contract: InputContract) -> None:
    """Each case ``make fuzz`` kept (and the hand-picked ones beside them) decodes or is
    rejected with a reason."""
    cases = sorted(p for p in CRASHES.iterdir() if p.suffix != ".md")
    assert cases, "tests/fuzz/crashes/ holds the regression cases"
    for case in cases:
        _outcome(case.read_bytes(), contract)
