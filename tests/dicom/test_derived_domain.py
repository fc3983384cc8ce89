"""The domain-shift mark in the derived instance: ImageComments when flagged, the private
block always, the per-slice writer's bytes equal to the generic writer's, dciodvfy clean."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from agent.dicom.derive import DOMAIN_CREATOR, DomainMark, derive_instance, derive_instance_generic
from agent.dicom.derived_writer import DerivedWriter
from tests.dicom.test_derived_writer import (
    MODEL,
    OUT_MR,
    _demo,
    dciodvfy_errors,
    decode,
    stored_for,
)

KW = {"device_id": "edge-07", "software_version": "0.1.0"}
MARKS = {
    "flagged": DomainMark(3.25, 2.5, True),
    "in-domain": DomainMark(0.41, 0.38, False),
    "unscored": DomainMark(None, None, False),
}


@pytest.mark.parametrize("name", sorted(MARKS))
def test_the_mark_is_written_alike_by_both_writers(name: str) -> None:
    mark, writer = MARKS[name], DerivedWriter()
    for payload in _demo(2):
        scan = decode(payload)
        plain = derive_instance(scan, stored_for(scan), MODEL, OUT_MR, writer=writer, **KW)
        fast = derive_instance(scan, stored_for(scan), MODEL, OUT_MR, writer=writer,
                               domain=mark, **KW)
        generic = derive_instance_generic(decode(payload), stored_for(scan), MODEL, OUT_MR,
                                          domain=mark, **KW)
        assert fast == generic
        ds = pydicom.dcmread(io.BytesIO(fast))
        assert ds[0x00710010].value == DOMAIN_CREATOR
        assert ds[0x00711003].value == {"flagged": "FLAGGED", "in-domain": "IN_DOMAIN",
                                        "unscored": "UNSCORED"}[name]
        if mark.score is None:
            assert 0x00711001 not in ds
        else:
            assert float(ds[0x00711001].value) == mark.score
            assert float(ds[0x00711002].value) == mark.series_score
        assert ("ImageComments" in ds) == mark.flagged
        if mark.flagged:
            assert "DOMAIN SHIFT WARNING" in ds.ImageComments
            assert "3.25" in ds.ImageComments and "not a measure" in ds.ImageComments
        # The template is shared: an unmarked slice of the same series carries no mark.
        assert 0x00710010 not in pydicom.dcmread(io.BytesIO(plain))


def test_a_marked_instance_passes_dciodvfy(tmp_path: Path) -> None:
    scan = decode(_demo(1)[0])
    data = derive_instance(scan, stored_for(scan), MODEL, OUT_MR, writer=DerivedWriter(),
                           domain=MARKS["flagged"], **KW)
    assert dciodvfy_errors(data, tmp_path) == []
