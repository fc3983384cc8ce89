"""Tests for agent.pipeline.Translator: a real ONNX graph, real keys, real DICOM bytes."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.backends import ModelRunner, RunnerOptions, open_runner
from agent.config import LimitsSection
from agent.crypto import keys, seal
from agent.daemon.pipeline import Outcome, Translator
from agent.demo.sample_series import build_series
from agent.dicom.decode import Scan, decode_scan
from agent.dicom.derive import result_message_id
from agent.model.bundle import ModelBundle, load_bundle
from agent.transport.topics import Topics
from tests.bundles import make_scale_bundle

SITE, DEVICE = "site-1", "edge-1"
PATIENT_NAME, PATIENT_ID = "SECRETNAME^JANE", "PID-99173"
SOURCE_TOPIC = "iomt/site-1/scans/gateway"


def phantom(n: int = 2, rows: int = 64, cols: int = 64) -> np.ndarray:
    z, y, x = np.mgrid[0:n, 0:rows, 0:cols].astype(np.float32)
    r2 = ((y - rows / 2) / (rows / 2.5)) ** 2 + ((x - cols / 2) / (cols / 3)) ** 2
    vol = np.where(r2 < 1.0, 800 + 400 * np.cos(x / 7) * np.sin(y / 5) + 20 * z, 0)
    return vol.astype(np.uint16)


@dataclass
class Rig:
    bundle: ModelBundle
    runner: ModelRunner
    recipient: keys.RecipientPrivateKey
    device_key: Ed25519PrivateKey
    translator: Translator

    def open(self, envelope: bytes) -> seal.Opened:
        return seal.open_envelope(
            envelope,
            recipients={self.recipient.key_id: self.recipient},
            trusted_devices={DEVICE: self.device_key.public_key()},
        )

    def process(self, payload: bytes, translator: Translator | None = None) -> Outcome:
        t = translator or self.translator
        return t.process(payload, SOURCE_TOPIC, hashlib.sha256(payload).hexdigest())

    def translator_with(self, limits: LimitsSection) -> Translator:
        t = self.translator
        return Translator(self.bundle, self.runner, t.sealer, limits=limits, topics=t.topics)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = make_scale_bundle(tmp_path_factory.mktemp("bundle") / "scale", factor=0.5)
    bundle = load_bundle(root)
    runner = open_runner("onnxruntime", str(bundle.backend_file("onnxruntime").path),
                         RunnerOptions(intra_op_threads=1))
    # Keys go through their files, as the agent loads them.
    kdir = tmp_path_factory.mktemp("keys")
    priv, pub = keys.generate_recipient_keypair()
    keys.save_private_key(kdir / "cloud.key", priv)
    keys.save_public_key(kdir / "cloud.pub", pub)
    keys.save_private_key(kdir / "device.key", keys.generate_signing_key())
    recipient_pub = keys.load_recipient_public_key(kdir / "cloud.pub")
    device_key = keys.load_signing_key(kdir / "device.key")

    def sealer(plaintext: bytes, message_id: str) -> bytes:
        return seal.seal(plaintext, recipient=recipient_pub, signing_key=device_key,
                         device_id=DEVICE, message_id=message_id)

    translator = Translator(bundle, runner, sealer, limits=LimitsSection(),
                            topics=Topics(SITE, DEVICE))
    yield Rig(bundle, runner, keys.load_recipient_private_key(kdir / "cloud.key"), device_key,
              translator)
    runner.close()


@pytest.fixture(scope="module")
def series() -> list[bytes]:
    return build_series(phantom(), spacing_mm=(2.0, 1.0, 1.0), patient_name=PATIENT_NAME,
                        patient_id=PATIENT_ID, series_description="T1w axial")


def _expected(pixels: np.ndarray) -> np.ndarray:
    """What the scale bundle stores: robust-max normalised, clipped, x0.5, x1000."""
    p = np.float32(np.percentile(pixels[pixels > 0], 99.5))
    return np.rint(np.clip(pixels / p, 0, 1.5) * 0.5 * 1000.0)


def _error_body(outcome: Outcome) -> dict[str, object]:
    body = json.loads(outcome.payload)
    assert isinstance(body, dict)
    return body


def test_the_served_file_s_digest_keys_the_result(rig: Rig, series: list[bytes]) -> None:
    """An fp32 reference that ``backend = "auto"`` chose has its own digest: its results
    carry ids (and UIDs, provenance) of their own, never those of the int8 file."""
    other = "ab" * 32
    t = rig.translator
    fp32 = Translator(rig.bundle, rig.runner, t.sealer, limits=LimitsSection(), topics=t.topics,
                      digest=other)
    source = pydicom.dcmread(io.BytesIO(series[0]))
    outcome = rig.process(series[0], fp32)
    assert outcome.ok and fp32.identity.digest == other
    assert outcome.message_id == result_message_id(source.SOPInstanceUID, other)
    assert outcome.message_id != result_message_id(source.SOPInstanceUID, rig.bundle.digest())


def test_ok_outcome_is_a_sealed_derived_instance(rig: Rig, series: list[bytes]) -> None:
    payload = series[0]
    source = pydicom.dcmread(io.BytesIO(payload))
    outcome = rig.process(payload)
    assert outcome.ok and outcome.kind == "result" and outcome.reason is None
    assert outcome.counter == "processed"
    assert outcome.topic == f"iomt/{SITE}/{DEVICE}/results"
    assert outcome.message_id == result_message_id(source.SOPInstanceUID, rig.bundle.digest())
    assert outcome.series_key == hashlib.sha256(
        source.SeriesInstanceUID.encode()).hexdigest()[:12]
    assert set(outcome.timings_ms) == {"decode", "preprocess", "infer", "domain", "derive",
                                      "seal"}
    assert all(v >= 0 for v in outcome.timings_ms.values())
    # CPU per stage: the agent's own (the runtime's threads are not counted: no infer).
    assert set(outcome.cpu_ms) == set(outcome.timings_ms) - {"infer"}
    # Sealed: nothing of the patient travels in clear.
    assert PATIENT_NAME.encode() not in outcome.payload
    assert PATIENT_ID.encode() not in outcome.payload

    opened = rig.open(outcome.payload)
    assert opened.device_id == DEVICE and opened.message_id == outcome.message_id
    assert opened.content_type == "application/dicom"
    derived = pydicom.dcmread(io.BytesIO(opened.plaintext))
    assert derived.Modality == "MR"
    assert derived.SOPInstanceUID != source.SOPInstanceUID
    assert derived.SeriesInstanceUID != source.SeriesInstanceUID
    assert derived.StudyInstanceUID == source.StudyInstanceUID
    assert str(derived.PatientName) == PATIENT_NAME and derived.PatientID == PATIENT_ID
    assert "NOT FOR DIAGNOSTIC USE" in derived.SeriesDescription
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert rig.bundle.digest() in derived.DerivationDescription
    assert (derived.Rows, derived.Columns) == (64, 64)
    got = derived.pixel_array.astype(np.float32)
    want = _expected(source.pixel_array.astype(np.float32))
    assert np.abs(got - want).max() <= 1.0
    assert got.max() > 400  # the model really ran on the image, not on zeros


def test_same_scan_twice_same_message_id(rig: Rig, series: list[bytes]) -> None:
    a, b = rig.process(series[0]), rig.process(series[0])
    assert a.ok and b.ok
    assert a.message_id == b.message_id
    assert a.payload != b.payload  # fresh HPKE encapsulation each time...
    assert rig.open(a.payload).plaintext == rig.open(b.payload).plaintext  # ...same instance
    other = rig.process(series[1])
    assert other.ok and other.message_id != a.message_id
    assert other.series_key == a.series_key  # one source series -> one output series


def test_a_different_model_gives_a_different_message_id(
    rig: Rig, series: list[bytes], tmp_path: Path
) -> None:
    bundle = load_bundle(make_scale_bundle(tmp_path / "other", factor=0.25))
    runner = open_runner("onnxruntime", str(bundle.backend_file("onnxruntime").path),
                         RunnerOptions(intra_op_threads=1))
    try:
        t = Translator(bundle, runner, rig.translator.sealer, limits=LimitsSection(),
                       topics=Topics(SITE, DEVICE))
        assert rig.process(series[0], t).message_id != rig.process(series[0]).message_id
    finally:
        runner.close()


def _check_error(outcome: Outcome, payload: bytes, reason: str) -> dict[str, object]:
    assert not outcome.ok and outcome.kind == "error" and outcome.reason == reason
    assert outcome.counter == "failed"
    assert outcome.topic == f"iomt/{SITE}/{DEVICE}/errors"
    assert outcome.series_key is None
    body = _error_body(outcome)
    assert body["v"] == 1 and body["reason"] == reason
    assert body["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert body["message_id"] == outcome.message_id
    assert body["device_id"] == DEVICE and body["source_topic"] == SOURCE_TOPIC
    assert isinstance(body["detail"], str) and body["detail"]
    assert str(body["at"]).endswith("Z")
    return body


def test_random_bytes_give_an_error_report(rig: Rig) -> None:
    payload = random.Random(3).randbytes(5000)
    _check_error(rig.process(payload), payload, "not_dicom")
    empty = b""
    _check_error(rig.process(empty), empty, "not_dicom")


def test_ct_into_an_mr_contract_is_refused_without_phi(rig: Rig) -> None:
    [payload] = build_series(phantom(n=1), modality="CT", patient_name=PATIENT_NAME,
                             patient_id=PATIENT_ID, series_description="CT head")
    outcome = rig.process(payload)
    body = _check_error(outcome, payload, "wrong_modality")
    assert set(body) == {"v", "message_id", "device_id", "reason", "detail", "payload_sha256",
                         "source_topic", "at"}
    for secret in ("SECRETNAME", "JANE", PATIENT_ID):
        assert secret.encode() not in outcome.payload
    # The same bad scan twice yields the same error id (consumers drop the duplicate).
    assert rig.process(payload).message_id == outcome.message_id


def test_limits_are_enforced(rig: Rig, series: list[bytes]) -> None:
    small = rig.translator_with(LimitsSection(max_payload_bytes=1024))
    _check_error(rig.process(series[0], small), series[0], "payload_too_large")
    tight = rig.translator_with(LimitsSection(pixel_budget=64 * 63))
    _check_error(rig.process(series[0], tight), series[0], "pixel_budget_exceeded")
    exact = rig.translator_with(LimitsSection(pixel_budget=64 * 64))
    assert rig.process(series[0], exact).ok


def test_320_by_320_at_0_8_mm_keeps_its_grid(rig: Rig) -> None:
    [payload] = build_series(phantom(n=1, rows=320, cols=320), spacing_mm=(1.0, 0.8, 0.8))
    outcome = rig.process(payload)
    assert outcome.ok, outcome.payload[:300]
    derived = pydicom.dcmread(io.BytesIO(rig.open(outcome.payload).plaintext))
    assert (derived.Rows, derived.Columns) == (320, 320)
    assert derived.pixel_array.shape == (320, 320)
    assert [float(v) for v in derived.PixelSpacing] == [0.8, 0.8]
    source = pydicom.dcmread(io.BytesIO(payload)).pixel_array.astype(np.float32)
    out = derived.pixel_array.astype(np.float32)
    # Away from the phantom's edge (resampled twice) the result is exact background, and
    # inside it matches the model's arithmetic on the source grid.
    y, x = np.mgrid[0:320, 0:320].astype(np.float32)
    r2 = ((y - 160) / 128) ** 2 + ((x - 160) / (320 / 3)) ** 2
    assert out[r2 > 1.15].max() == 0
    inside = r2 < 0.85
    error = np.abs(out - _expected(source))[inside]
    assert error.max() < 0.02 * out.max(), error.max()


def test_staged_parts_give_what_one_call_gives(rig: Rig, series: list[bytes]) -> None:
    """The daemon runs stage | run_model | finish on three threads; the parts in turn give
    the result process() gives, and time spent waiting between them is no stage's."""
    from agent.daemon.pipeline import Inferred, ModelInput

    payload = series[1]
    sha = hashlib.sha256(payload).hexdigest()
    staged = rig.translator.stage(payload, SOURCE_TOPIC, sha)
    assert isinstance(staged, ModelInput)
    assert staged.x.shape == (1, 1, *rig.bundle.input.shape) and staged.x.dtype == np.float32
    assert set(staged.timer.timings) == {"decode", "preprocess"}
    inferred = rig.translator.run_model(staged)
    assert isinstance(inferred, Inferred)
    outcome = rig.translator.finish(inferred)
    whole = rig.process(payload)
    assert outcome.ok and outcome.message_id == whole.message_id
    a = pydicom.dcmread(io.BytesIO(rig.open(outcome.payload).plaintext)).pixel_array
    b = pydicom.dcmread(io.BytesIO(rig.open(whole.payload).plaintext)).pixel_array
    assert np.array_equal(a, b)
    assert set(outcome.timings_ms) == {"decode", "preprocess", "infer", "domain", "derive",
                                      "seal"}


def test_stage_rejects_a_bad_payload_without_running_the_model(rig: Rig) -> None:
    staged = rig.translator.stage(b"not dicom", SOURCE_TOPIC, "0" * 64)
    assert isinstance(staged, Outcome) and not staged.ok and staged.kind == "error"


def test_the_decode_stage_counts_the_decoder_process_cpu(rig: Rig, series: list[bytes]) -> None:
    """A decoder that reports CPU spent elsewhere (the decoder process's) has it added to
    the decode stage's CPU time, not to its wall time."""
    def decoder(*args: Any, **kwargs: Any) -> Scan:
        scan = decode_scan(*args, **kwargs)
        scan.decoder_cpu_ms = 500.0
        return scan

    t = rig.translator
    translator = Translator(rig.bundle, rig.runner, t.sealer, limits=t.limits, topics=t.topics,
                            decoder=decoder)
    outcome = rig.process(series[0], translator)
    assert outcome.ok
    assert outcome.cpu_ms["decode"] >= 500.0 > outcome.timings_ms["decode"]
