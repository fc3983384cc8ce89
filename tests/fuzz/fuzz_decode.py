"""Coverage-guided fuzzing of the decoder with atheris (``make fuzz``, not part of the
suite): libFuzzer mutates payloads, seeded with the hostile corpus's real instances, and
every input goes through ``decode_scan``. A crash is any exception other than
``ScanRejected`` with a registered reason (or a libFuzzer timeout / RSS limit); libFuzzer
writes the input to tests/fuzz/crashes/, where tests/fuzz/test_corpus.py replays it.

    python -m tests.fuzz.fuzz_decode -max_total_time=300 -artifact_prefix=tests/fuzz/crashes/
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["agent", "pydicom"]):
    from agent.dicom.decode import REASONS, ScanRejected, decode_scan
    from agent.model.bundle import load_bundle

from tests.fuzz import corpus
from tests.integration.harness import REFERENCE_BUNDLE

CONTRACT = load_bundle(REFERENCE_BUNDLE).input


def one_input(data: bytes) -> None:
    try:
        decode_scan(data, CONTRACT, pixel_budget=4096 * 4096, max_payload_bytes=64 << 20)
    except ScanRejected as exc:
        if exc.reason not in REASONS:
            raise AssertionError(f"unregistered reason {exc.reason!r}") from None


def main() -> None:
    seeds = Path(tempfile.mkdtemp(prefix="iomt-fuzz-seeds-"))
    for i, base in enumerate(corpus.bases()):
        (seeds / f"base-{i:02d}.dcm").write_bytes(base)
    argv = [*sys.argv, str(seeds)]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
