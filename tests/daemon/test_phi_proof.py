"""No PHI leaks, proved on the running service (issue 12, point 6).

Scans with distinctive identifiers (top level, inside sequences and in private elements) go
through one ``Agent`` (its decode, model and finisher threads, its store; fed by hand in place
of the edge broker) with de-identification on (three option sets) and off. With it on, the
decrypted results hold none of them: not in the raw bytes, not in any element, recursively.
Either way none appears in a log line, a topic, a cleartext envelope header, the raw
envelope, an error report, the status, or a file the agent wrote outside its store.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from agent import log as agent_log
from agent.config import load_config
from agent.crypto import keys, seal
from agent.daemon.service import Agent
from agent.demo.sample_series import build_series
from agent.dicom.derive import result_message_id
from agent.ops.scaffold import InitOptions, write_directory
from tests.bundles import make_scale_bundle
from tests.site import site_uid

TOPIC = "iomt/site-1/scans/gw"
# Distinctive values: none can occur by chance in what the agent writes.
PHI = {
    "PatientName": "ZQXWREN^ODALYS",
    "PatientID": "PIDZQX7731",
    "AccessionNumber": "ACCZQX5512",
    "StudyDescription": "ZQXSTUDY BRAIN",
    "InstitutionName": "ZQX GENERAL HOSPITAL",
    "ReferringPhysicianName": "ZQXDOC^REFERRA",
    "PatientBirthDate": "19410312",
    "StudyDate": "19730517",
    "SeriesDate": "19730518",
    "AcquisitionDate": "19730519",
    "ContentDate": "19730520",
}
NESTED = {"nested patient id": "PIDZQXOTHER", "nested accession": "ACCZQXNESTED",
          "private": "ZQXPRIVATEVALUE", "private creator": "ZQXCREATOR"}  # fmt: skip
N_SLICES = 3
OPTIONS = {
    "off": "enabled = false",
    "basic": "enabled = true",
    "dates": "enabled = true\nretain_modified_dates = true",
    "all-options": "enabled = true\nretain_modified_dates = true\n"
                   "retain_patient_characteristics = true\nretain_device_identity = true",
}  # fmt: skip


def _identify(ds: Dataset) -> None:
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    other = Dataset()
    other.PatientID = NESTED["nested patient id"]
    other.IssuerOfPatientID = "ZQX ISSUER"
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.AccessionNumber = NESTED["nested accession"]
    request.RequestedProcedureDescription = PHI["StudyDescription"]
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(0x0009, NESTED["private creator"], create=True)
    block.add_new(0x01, "LO", NESTED["private"])
    block.add_new(0x02, "PN", PHI["PatientName"])


def scans() -> list[bytes]:
    """N_SLICES MR slices and one CT slice (rejected: an error report), all identified."""
    vol = np.zeros((N_SLICES + 1, 64, 64), dtype=np.uint16)
    vol[:, 16:48, 16:48] = 900
    payloads = build_series(vol[:N_SLICES], spacing_mm=(1.0, 1.0, 1.0))
    payloads += build_series(vol[N_SLICES:], spacing_mm=(1.0, 1.0, 1.0), modality="CT")
    out = []
    for payload in payloads:
        ds = pydicom.dcmread(io.BytesIO(payload))
        _identify(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def source_uids(payloads: list[bytes]) -> set[str]:
    uids = set()
    for payload in payloads:
        ds = pydicom.dcmread(io.BytesIO(payload))
        uids |= {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                 ds.FrameOfReferenceUID}
    return uids


@dataclass
class Run:
    results: list[tuple[str, bytes]]  # (topic, envelope)
    errors: list[tuple[str, bytes]]  # (topic, JSON)
    message_ids: list[str]
    log: str
    status: str
    files: dict[str, bytes]  # what the agent wrote outside its store
    open: object
    digest: str  # the served model file's
    pseudonym: Callable[[str], str]  # the site's (from its secret file)


def run_agent(tmp: Path, deid: str, payloads: list[bytes]) -> Run:
    bundle = make_scale_bundle(tmp / "bundle")
    config = write_directory(InitOptions(
        directory=tmp / "node", edge_url="mqtt://127.0.0.1:1", cloud_url="mqtt://127.0.0.1:1",
        site="site-1", device_id="edge-1", bundle=bundle))
    text = config.read_text().replace('backend = "auto"', 'backend = "onnxruntime"')
    start = text.index("[deid]")
    end = text.index("[log]")
    config.write_text(text[:start] + "[deid]\n" + OPTIONS[deid] + "\n\n" + text[end:])
    stream = io.StringIO()
    agent_log.configure(level="debug", fmt="json", stream=stream)
    agent = Agent(load_config(config), config)
    try:
        agent.prepare()
        agent.stages.start()
        for p in payloads:
            agent.store.accept(TOPIC, hashlib.sha256(p).hexdigest(), p)
        deadline = time.monotonic() + 30
        while agent.store.depths()[1] < len(payloads) and time.monotonic() < deadline:
            agent.stages.process_pending()
            time.sleep(0.05)
        agent.stages.drain()
        status = json.dumps(agent.status())
        digest = agent.model.digest
        agent.stages.stop(timeout=10)
        rows = agent.store.outbox(limit=1000)
    finally:
        agent.model.close()
        agent.store.close()
    kdir = config.parent / "keys"
    recipient = keys.load_recipient_private_key(kdir / "cloud-recipient.key")
    device = keys.load_verify_key(kdir / "device-signing.pub")

    def open_result(envelope: bytes) -> bytes:
        return seal.open_envelope(envelope, recipients={recipient.key_id: recipient},
                                  trusted_devices={"edge-1": device}).plaintext

    files = {str(p): p.read_bytes() for p in config.parent.rglob("*")
             if p.is_file() and not p.name.startswith("agent.db")}
    return Run([(r.topic, r.payload) for r in rows if r.kind == "result"],
               [(r.topic, r.payload) for r in rows if r.kind == "error"],
               [r.message_id for r in rows], stream.getvalue(), status, files, open_result,
               digest, site_uid(config.parent))


def needles(payloads: list[bytes]) -> dict[str, bytes]:
    found = {k: v.encode() for k, v in {**PHI, **NESTED}.items()}
    found.update({f"uid {u}": u.encode() for u in source_uids(payloads)})
    # a person name's components on their own too: "ZQXWREN", "ODALYS"
    for keyword in ("PatientName", "ReferringPhysicianName"):
        for n, part in enumerate(PHI[keyword].split("^")):
            found[f"{keyword} part {n}"] = part.encode()
    return found


def element_texts(ds: Dataset) -> Iterator[str]:
    """Every element's value as text, recursively (sequence items included)."""
    for elem in ds.iterall():
        if elem.VR != "SQ":
            value = elem.value
            yield value.decode("latin-1") if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module")
def payloads() -> list[bytes]:
    return scans()


@pytest.mark.parametrize("deid", sorted(OPTIONS))
def test_no_phi_outside_the_sealed_payload(deid: str, payloads: list[bytes],
                                           tmp_path: Path) -> None:
    run = run_agent(tmp_path, deid, payloads)
    assert len(run.results) == N_SLICES and len(run.errors) == 1
    found = needles(payloads)
    places: dict[str, bytes] = {
        "log": run.log.encode(),
        "status": run.status.encode(),
        "message ids": "\n".join(run.message_ids).encode(),
        **{f"topic {i}": t.encode() for i, (t, _) in enumerate(run.results + run.errors)},
        **{f"error {i}": body for i, (_, body) in enumerate(run.errors)},
        **{f"envelope {i}": env for i, (_, env) in enumerate(run.results)},
        **{f"header {i}": json.dumps(seal.peek_header(env).__dict__, default=str).encode()
           for i, (_, env) in enumerate(run.results)},
        **{f"file {name}": data for name, data in run.files.items()},
    }
    hits = [(name, where) for name, needle in found.items()
            for where, data in places.items() if needle in data]
    assert hits == []
    assert run.log.count("\n") > 5  # the log was captured (not an empty proof)

    plaintexts = [run.open(env) for _, env in run.results]  # type: ignore[operator]
    raw_hits = [name for name, needle in found.items() for p in plaintexts if needle in p]
    texts = [t for p in plaintexts for t in element_texts(pydicom.dcmread(io.BytesIO(p)))]
    element_hits = [name for name, needle in found.items()
                    for t in texts if needle.decode() in t]
    print(f"phi-proof {deid}: {len(payloads)} instances, {len(found)} needles, "
          f"{len(places)} places + {len(plaintexts)} plaintexts ({len(texts)} element values), "
          f"hits outside {len(hits)}, in results raw {len(raw_hits)} / elements "
          f"{len(element_hits)}")
    # The idempotency key is stable and keyed: the site (its secret) computes it, the
    # source UID alone does not give it.
    sops = [str(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID) for p in payloads[:N_SLICES]]
    plain = {result_message_id(uid, run.digest) for uid in sops}
    keyed = {result_message_id(run.pseudonym(uid), run.digest) for uid in sops}
    result_ids = set(run.message_ids) & (plain | keyed)
    assert len(result_ids) == N_SLICES
    assert result_ids == (plain if deid == "off" else keyed)
    status = json.loads(run.status)["deid"]
    assert status["enabled"] == (deid != "off")
    assert status.get("codes") == {"off": None, "basic": ["113100"], "dates": ["113100", "113107"],
                                   "all-options": ["113100", "113107", "113108", "113109"]}[deid]
    if deid == "off":  # the search finds what is there: the source's identifiers
        assert {"PatientName", "PatientID", "AccessionNumber", "StudyDescription",
                "ReferringPhysicianName", "StudyDate"} <= set(raw_hits) & set(element_hits)
    else:
        assert raw_hits == [] and element_hits == []
        for p in plaintexts:
            ds = pydicom.dcmread(io.BytesIO(p))
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
