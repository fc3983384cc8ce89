"""The one error tree and the one registry of reason codes.

Every error the agent raises on purpose derives from ``AgentError``, so a caller that only
needs "did the agent refuse this, and why" catches one class and prints ``str(exc)``: the
messages say what to fix. The kinds below it live beside the code that raises them:

| class (subclasses) | raised when |
|---|---|
| ``config.ConfigError`` (``model.contract.ContractError``) | a TOML file breaks its schema |
| ``model.bundle.BundleError`` (``model.guard.GuardFailed``) | a bundle is unusable or fails |
| ``backends.base.BackendError`` | a runtime is missing or cannot load or run a file |
| ``dicom.decode.ScanRejected``, ``dicom.series.SliceRefused`` | a scan cannot be served |
| ``daemon.store.StoreFull`` | the inbox or outbox is at its byte cap |
| ``transport.mqtt.MqttError`` | a broker refused or could not be reached |
| ``transport.topics.TopicError`` | a topic level is not valid |
| ``crypto.keys.KeyFileError`` | a key file is missing, malformed or too open |
| ``crypto.seal.EnvelopeError`` | a sealed envelope cannot be opened (``reason``) |
| ``dicom.codestream.CodestreamError`` | a compressed frame does not match its header |
| ``quantize.errors.QuantizeError`` | ``model quantize`` cannot go on (``exit_code``) |
| ``bench.macs.MacCountError`` | a graph's MACs cannot be counted |
| ``fleet.verdict.UpdateRejected`` | a fleet update fails TUF, the archive or the bundle checks |
| ``fleet.repo.RepoError`` | the operator's fleet repository cannot be used |

Reason codes are the machine-readable part of what leaves the node (``reason`` of an error
report) or what the receiver reports (``EnvelopeError.reason``). Each code is listed here
once, and ``docs/protocol.md`` documents each; a test checks both against the code.
"""

from __future__ import annotations

# Reported on the error topic for one scan (agent.dicom, agent.daemon).
SCAN_REASONS = (
    "not_dicom", "payload_too_large", "missing_tag", "no_pixel_data", "wrong_modality",
    "series_mismatch", "unsupported_photometric", "unsupported_bits", "pixel_budget_exceeded",
    "multiframe_unsupported", "unsupported_transfer_syntax", "pixel_decode_failed",
    "bad_geometry", "duplicate_position", "series_too_large", "inference_failed",
    "derive_failed", "decode_budget_exceeded", "outbox_overflow",
)  # fmt: skip
# Reported on the error topic about the model, not about a scan.
MODEL_REASONS = ("model_refused", "update_rejected")
# Why a fleet update was rejected (agent.fleet): the status's ``update.reason``.
UPDATE_REASONS = (
    "metadata_unavailable", "metadata_unsigned", "metadata_replayed", "metadata_expired",
    "metadata_invalid", "target_missing", "target_too_long", "target_mismatch",
    "download_stalled", "wrong_group", "unsafe_archive", "bundle_invalid", "guard_failed",
    "load_failed", "failure_rate", "clock_behind",
)  # fmt: skip
# Why the receiver could not open a sealed envelope (agent.crypto.seal).
ENVELOPE_REASONS = (
    "malformed", "unsupported_version", "unknown_device", "bad_signature",
    "unsupported_suite", "unknown_recipient", "decrypt_failed",
)  # fmt: skip

# Why the DICOM gateway refused a C-STORE (agent.gateway; its ``cstore_refused`` log line).
GATEWAY_REASONS = (
    "sop_class_not_supported", "instance_too_large", "not_dicom", "dataset_mismatch",
    "spool_full", "broker_refused", "spool_failed",
)  # fmt: skip
# Why the DICOMweb export kept a result instead of storing it (agent.cloud.stow).
EXPORT_REASONS = ("archive_refused", "archive_unreachable")

ERROR_TOPIC_REASONS = frozenset(SCAN_REASONS + MODEL_REASONS)
REASONS = (ERROR_TOPIC_REASONS | frozenset(ENVELOPE_REASONS) | frozenset(UPDATE_REASONS)
           | frozenset(GATEWAY_REASONS) | frozenset(EXPORT_REASONS))


class AgentError(Exception):
    """Root of the agent's own errors. ``reason``: a code from ``REASONS`` where the error
    is reported with one, else None."""

    reason: str | None = None


class ReasonedError(AgentError):
    """An error that carries a reason code of the error topic; the message is safe to log
    and publish (no PHI)."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in ERROR_TOPIC_REASONS:
            raise ValueError(f"unknown reason code {reason!r} (add it to agent/errors.py "
                             "and docs/protocol.md)")
        super().__init__(message)
        self.reason: str = reason
        self.message = message
