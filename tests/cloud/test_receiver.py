"""Tests for agent.receiver.ResultReceiver: verify, decrypt, de-duplicate and file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud.receiver import Received, ResultReceiver, receiver_from_config
from agent.config import ConfigError, load_config, parse_config
from agent.crypto import keys, seal
from agent.crypto.seal import EnvelopeError
from agent.demo.sample_series import build_series
from agent.ops.scaffold import InitOptions, write_directory
from tests.bundles import make_scale_bundle

DEVICE = "edge-1"
_RECIPIENT, _RECIPIENT_PUB = keys.generate_recipient_keypair()
_DEVICE_KEY = keys.generate_signing_key()
_SERIES = build_series(np.full((3, 16, 16), 500, dtype=np.uint16), patient_name="DOE^JOHN")


def _seal(plaintext: bytes, message_id: str, *, device: str = DEVICE,
          signing_key: Ed25519PrivateKey = _DEVICE_KEY,
          recipient: keys.RecipientPublicKey = _RECIPIENT_PUB) -> bytes:
    return seal.seal(plaintext, recipient=recipient, signing_key=signing_key, device_id=device,
                     message_id=message_id)


def _receiver(out: Path) -> ResultReceiver:
    return ResultReceiver(recipients={_RECIPIENT.key_id: _RECIPIENT},
                          trusted_devices={DEVICE: _DEVICE_KEY.public_key()}, out_dir=out)


def _uids(instance: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(instance), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _reason(receiver: ResultReceiver, envelope: bytes) -> str:
    with pytest.raises(EnvelopeError) as ei:
        receiver.handle(envelope)
    return ei.value.reason


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_files_study_series_sop(tmp_path: Path) -> None:
    out = tmp_path / "results"
    receiver = _receiver(out)
    got = receiver.handle(_seal(_SERIES[0], "m-0"))
    study, series, sop = _uids(_SERIES[0])
    assert got == Received("m-0", DEVICE, out / study / series / f"{sop}.dcm", len(_SERIES[0]))
    assert got.path.read_bytes() == _SERIES[0]
    second = receiver.handle(_seal(_SERIES[1], "m-1"))
    assert second is not None and second.path.parent == got.path.parent
    assert _files(out) == sorted([got.path, second.path])  # no temporary files left


def test_duplicates_return_none(tmp_path: Path) -> None:
    out = tmp_path / "results"
    receiver = _receiver(out)
    envelope = _seal(_SERIES[0], "m-0")
    first = receiver.handle(envelope)
    assert first is not None
    mtime = first.path.stat().st_mtime_ns
    assert receiver.handle(envelope) is None
    # A redelivery sealed afresh (new encapsulation, same message id) is a duplicate too.
    assert receiver.handle(_seal(_SERIES[0], "m-0")) is None
    # So is the same instance after a restart: the file is already there.
    assert _receiver(out).handle(_seal(_SERIES[0], "m-0")) is None
    assert first.path.stat().st_mtime_ns == mtime
    assert _files(out) == [first.path]


def test_tampered_bytes_are_rejected(tmp_path: Path) -> None:
    out = tmp_path / "results"
    receiver = _receiver(out)
    envelope = bytearray(_seal(_SERIES[0], "m-0"))
    for pos in (len(envelope) // 2, len(envelope) - 1, 40):
        bad = bytearray(envelope)
        bad[pos] ^= 0x01
        with pytest.raises(EnvelopeError):
            receiver.handle(bytes(bad))
    assert _reason(receiver, bytes(envelope[:-1])) == "malformed"
    assert _reason(receiver, b"not an envelope") == "malformed"
    assert _files(out) == []
    assert receiver.handle(bytes(envelope)) is not None  # the genuine one still files


def test_unknown_device(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path / "results")
    assert _reason(receiver, _seal(_SERIES[0], "m-0", device="edge-9")) == "unknown_device"
    # The right name with another key is a forgery.
    forged = _seal(_SERIES[0], "m-0", signing_key=Ed25519PrivateKey.generate())
    assert _reason(receiver, forged) == "bad_signature"
    assert _files(tmp_path) == []


def test_unknown_recipient_key_id(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path / "results")
    _, other_pub = keys.generate_recipient_keypair()
    assert _reason(receiver, _seal(_SERIES[0], "m-0", recipient=other_pub)) == (
        "unknown_recipient")
    assert _files(tmp_path) == []


def test_non_dicom_plaintext_is_malformed(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path / "results")
    assert _reason(receiver, _seal(b"\x00" * 10, "m-0")) == "malformed"
    assert _files(tmp_path) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("uid", ["../../../etc", "1.2.3/4", "", "1.2.abc", "1" * 65])
def test_uids_cannot_escape_the_output_directory(tmp_path: Path, uid: str) -> None:
    ds = pydicom.dcmread(io.BytesIO(_SERIES[0]))
    ds.SOPInstanceUID = uid
    buffer = io.BytesIO()
    ds.save_as(buffer)
    receiver = _receiver(tmp_path / "results")
    with pytest.raises(EnvelopeError) as ei:
        receiver.handle(_seal(buffer.getvalue(), "m-evil"))
    assert ei.value.reason == "malformed" and "SOPInstanceUID" in str(ei.value)
    assert _files(tmp_path) == []


def test_failed_write_is_not_remembered_as_seen(tmp_path: Path) -> None:
    """A result that could not be written must be filed when it is redelivered."""
    out = tmp_path / "results"
    out.mkdir()
    study, _, _ = _uids(_SERIES[0])
    (out / study).write_bytes(b"")  # a file where the study directory should go
    receiver = _receiver(out)
    envelope = _seal(_SERIES[0], "m-0")
    with pytest.raises(OSError):
        receiver.handle(envelope)
    (out / study).unlink()
    got = receiver.handle(envelope)
    assert got is not None and got.path.read_bytes() == _SERIES[0]


def test_receiver_from_config(tmp_path: Path) -> None:
    bundle = make_scale_bundle(tmp_path / "bundle")
    cfg_path = write_directory(InitOptions(tmp_path / "node", "mqtt://127.0.0.1:1883",
                                           "mqtt://127.0.0.1:1884", device_id=DEVICE,
                                           bundle=bundle))
    cfg = load_config(cfg_path)
    receiver = receiver_from_config(cfg, tmp_path / "out")
    kdir = tmp_path / "node" / "keys"
    envelope = seal.seal(_SERIES[2], recipient=keys.load_recipient_public_key(
        kdir / "cloud-recipient.pub"), signing_key=keys.load_signing_key(
        kdir / "device-signing.key"), device_id=DEVICE, message_id="m-2")
    got = receiver.handle(envelope)
    assert got is not None and got.path.read_bytes() == _SERIES[2]
    # The test keys of this module are not the configured ones.
    assert _reason(receiver, _seal(_SERIES[0], "m-0")) == "bad_signature"

    without = parse_config(cfg_path.read_text().split("[receiver]")[0])
    with pytest.raises(ConfigError, match="receiver"):
        receiver_from_config(without, tmp_path / "out")


def test_file_tells_new_from_filed_earlier_from_seen_again(tmp_path: Path) -> None:
    out = tmp_path / "results"
    envelope = _seal(_SERIES[0], "m-0")
    first = _receiver(out)
    new = first.file(envelope)
    assert (new.kind, new.message_id, new.device_id) == ("new", "m-0", DEVICE)
    assert new.path is not None and new.path.read_bytes() == _SERIES[0]
    assert first.file(envelope).kind == "repeat"
    # A later run (a fresh receiver) finds the file: filed earlier, with its path.
    rerun = _receiver(out)
    earlier = rerun.file(_seal(_SERIES[0], "m-0"))
    assert (earlier.kind, earlier.path) == ("earlier", new.path)
    assert rerun.file(envelope).kind == "repeat"


def test_quarantine_keeps_what_cannot_be_opened_until_the_right_key_files_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "results"
    other, other_pub = keys.generate_recipient_keypair()
    envelopes = [_seal(s, f"m-{i}", recipient=other_pub) for i, s in enumerate(_SERIES[:2])]
    receiver = _receiver(out)
    kept = []
    for envelope in envelopes:
        assert _reason(receiver, envelope) == "unknown_recipient"
        kept.append(receiver.quarantine(envelope))
    assert receiver.quarantine(envelopes[0]) == kept[0]  # the same envelope: one file
    assert sorted(kept) == sorted(receiver.quarantine_dir.iterdir())
    assert [p.read_bytes() for p in kept] == envelopes
    assert _files(out) == sorted(kept)  # nothing filed as a result
    # Still the wrong key: both stay.
    retried = list(receiver.retry_quarantine())
    assert [type(got) for _, got in retried] == [EnvelopeError, EnvelopeError]
    assert sorted(receiver.quarantine_dir.iterdir()) == sorted(kept)
    # With the right key they are filed and leave the quarantine.
    right = ResultReceiver(recipients={other.key_id: other},
                           trusted_devices={DEVICE: _DEVICE_KEY.public_key()}, out_dir=out)
    filed = [got for _, got in right.retry_quarantine()]
    assert sorted(f.message_id for f in filed if not isinstance(f, EnvelopeError)) == [
        "m-0", "m-1"]
    assert list(right.quarantine_dir.iterdir()) == []
    assert len([p for p in _files(out) if p.suffix == ".dcm"]) == 2


def test_what_file_reports_for_new_earlier_and_repeat(tmp_path: Path) -> None:
    """The ids and sizes a consumer loop logs and confirms (receipts go by message_id)."""
    def head(f: object) -> tuple[object, ...]:
        return tuple(getattr(f, k) for k in ("kind", "message_id", "device_id", "path", "size"))

    envelope = _seal(_SERIES[1], "m-7")
    study, series, sop = _uids(_SERIES[1])
    path = tmp_path / "out" / study / series / f"{sop}.dcm"
    size = len(_SERIES[1])
    assert head(_receiver(tmp_path / "out").file(envelope)) == ("new", "m-7", DEVICE, path, size)
    again = _receiver(tmp_path / "out")  # a second run: the file is there
    assert head(again.file(envelope)) == ("earlier", "m-7", DEVICE, path, size)
    assert head(again.file(envelope)) == ("repeat", "m-7", DEVICE, None, 0)


def test_malformed_results_say_what_is_wrong(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path / "out")
    with pytest.raises(EnvelopeError, match="payload is not DICOM: "):
        receiver.file(_seal(b"not dicom at all", "m-1"))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        ds = pydicom.dcmread(io.BytesIO(_SERIES[0]))
        setattr(ds, keyword, "1.2.x")
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        with pytest.raises(EnvelopeError, match=f"result has an invalid {keyword}$"):
            receiver.file(_seal(buf.getvalue(), f"m-{keyword}"))


def test_quarantine_names_are_the_envelope_hash(tmp_path: Path) -> None:
    import hashlib

    envelope = b"cannot be opened"
    path = _receiver(tmp_path / "out").quarantine(envelope)
    assert path.name == hashlib.sha256(envelope).hexdigest()[:32] + ".iomt"


def test_every_filing_names_the_keys_it_was_sealed_to_and_signed_with(tmp_path: Path) -> None:
    """``recipient_key_id`` and ``signer_key_id`` (what a key rotation audit reads) for a new,
    an earlier and a repeated result alike."""
    envelope = _seal(_SERIES[1], "m-8")
    signer = keys.signing_key_id(_DEVICE_KEY.public_key())
    first = _receiver(tmp_path / "out")
    again = _receiver(tmp_path / "out")
    for filed in (first.file(envelope), again.file(envelope), again.file(envelope)):
        assert (filed.recipient_key_id, filed.signer_key_id) == (_RECIPIENT.key_id, signer)


def test_a_payload_that_is_not_dicom_names_the_decoder_error(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path / "out")
    with pytest.raises(EnvelopeError) as ei:
        receiver.file(_seal(b"not dicom at all", "m-1"))
    assert str(ei.value) == "malformed: payload is not DICOM: InvalidDicomError"


def test_a_config_without_receiver_section_names_the_config(tmp_path: Path) -> None:
    bundle = make_scale_bundle(tmp_path / "bundle")
    cfg_path = write_directory(InitOptions(tmp_path / "node", "mqtt://127.0.0.1:1883",
                                           "mqtt://127.0.0.1:1884", device_id=DEVICE,
                                           bundle=bundle))
    without = parse_config(cfg_path.read_text().split("[receiver]")[0])
    with pytest.raises(ConfigError) as ei:
        receiver_from_config(without, tmp_path / "out")
    assert ei.value.source == "config"
    assert ei.value.problems == ["receiver: section required for `iomt-agent receive`"]
