"""agent.dicom.sandbox: decoding in a child process under a memory and a time budget. A
payload past either budget, or one that kills the child, is reported as
``decode_budget_exceeded`` and the next scan gets a fresh child."""

from __future__ import annotations

import io
import os
import signal
import threading
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest

from agent.demo.sample_series import build_series, load_demo_slab
from agent.dicom import sandbox as sandbox_module
from agent.dicom.decode import ScanRejected, decode_scan
from agent.dicom.sandbox import DecodeProcess
from agent.model.bundle import InputContract, load_bundle
from tests.integration.harness import REFERENCE_BUNDLE

BUDGET = {"pixel_budget": 8192 * 8192, "max_payload_bytes": 256 << 20}


@pytest.fixture(scope="module")
def contract() -> InputContract:
    return load_bundle(REFERENCE_BUNDLE).input


@pytest.fixture(scope="module")
def sandbox() -> Iterator[DecodeProcess]:
    box = DecodeProcess(memory_bytes=96 << 20, timeout_s=1.0)
    yield box
    box.close()


def _good() -> bytes:
    return build_series(load_demo_slab().t1[:1])[0]


def _flood(count: int = 300_000) -> bytes:
    """A real instance behind hundreds of thousands of empty private elements."""
    good = _good()
    elements = b"".join(b"\x09\x00" + (0x1000 + i % 0xEFFF).to_bytes(2, "little") + b"LO\x00\x00"
                        for i in range(count))
    return good[:132] + elements + good[132:]


def test_answers_match_the_in_process_decoder(sandbox: DecodeProcess,
                                              contract: InputContract) -> None:
    good = _good()
    scan = sandbox.decode(good, contract, **BUDGET)
    local = decode_scan(good, contract, **BUDGET)
    assert np.array_equal(scan.pixels, local.pixels)
    assert scan.sop_instance_uid == local.sop_instance_uid
    assert scan.dataset.SeriesDescription == local.dataset.SeriesDescription
    # The data set, rebuilt from its elements: what dcmread gave, less the pixel data.
    del local.dataset.PixelData
    assert type(scan.dataset) is type(local.dataset) and scan.dataset == local.dataset
    assert scan.dataset.file_meta == local.dataset.file_meta
    assert scan.dataset.preamble == local.dataset.preamble
    assert scan.dataset.original_encoding == local.dataset.original_encoding
    assert scan.dataset.original_character_set == local.dataset.original_character_set
    # The child's CPU comes back with the answer (it measures its own process time).
    assert scan.decoder_cpu_ms > 0 and local.decoder_cpu_ms == 0.0
    with pytest.raises(ScanRejected) as rejected:
        sandbox.decode(b"not a scan" * 50, contract, **BUDGET)
    assert rejected.value.reason == "not_dicom" and rejected.value.payload_sha256


def test_the_answer_leaves_out_what_the_daemon_has(sandbox: DecodeProcess,
                                                   contract: InputContract) -> None:
    """The pixels come back through the shared buffer; the data set without its pixel data
    element and without pydicom's reference to the payload."""
    scan = sandbox.decode(_good(), contract, **BUDGET)
    assert "PixelData" not in scan.dataset and scan.dataset.buffer is None
    assert scan.pixels.dtype == np.float32 and scan.pixels.flags.writeable
    assert scan.dataset.Rows == scan.pixels.shape[0]


def test_too_big_for_the_shared_buffer_travels_in_the_pickles(
        contract: InputContract, monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload or an image larger than the shared buffer still decodes, identically; and
    scans after a big one use the buffer again."""
    good = _good()
    local = decode_scan(good, contract, **BUDGET)
    for size in (4096, len(good) + 4096):  # payload too big; payload fits, pixels do not
        monkeypatch.setattr(sandbox_module, "SHARED_BYTES", size)
        box = DecodeProcess(memory_bytes=96 << 20, timeout_s=5.0)
        try:
            for _ in range(2):
                scan = box.decode(good, contract, **BUDGET)
                assert np.array_equal(scan.pixels, local.pixels)
                assert scan.sop_instance_uid == local.sop_instance_uid
        finally:
            box.close()


def test_time_memory_and_a_crash_each_cost_one_scan_not_the_daemon(
        sandbox: DecodeProcess, contract: InputContract) -> None:
    restarts = sandbox.restarts
    # time: an element flood parses for seconds
    with pytest.raises(ScanRejected, match=r"decode\.timeout_s") as slow:
        sandbox.decode(_flood(), contract, **BUDGET)
    assert slow.value.reason == "decode_budget_exceeded"
    # memory: a real 4096 x 4096 instance needs ~200 MiB to decode, the budget is 96 MiB
    ds = pydicom.dcmread(io.BytesIO(_good()))
    ds.Rows = ds.Columns = 4096
    ds.PixelData = np.ones((4096, 4096), np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ScanRejected, match=r"decode\.memory_bytes") as big:
        sandbox.decode(buf.getvalue(), contract, **BUDGET)
    assert big.value.reason == "decode_budget_exceeded"
    assert decode_scan(buf.getvalue(), contract, **BUDGET).pixels.shape == (4096, 4096)
    # a crash: the child killed while it decodes (the flood is built first: on a loaded
    # machine building it can take longer than the timer, which would kill the idle child)
    flood = _flood()
    pid = sandbox.pid
    assert pid is not None
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    with pytest.raises(ScanRejected, match="died") as died:
        sandbox.decode(flood, contract, **BUDGET)
    assert died.value.reason == "decode_budget_exceeded"
    assert sandbox.restarts == restarts + 2  # timeout and crash; MemoryError kept the child
    assert sandbox.decode(_good(), contract, **BUDGET).pixels.shape == (256, 256)
