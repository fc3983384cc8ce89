"""The processing stages of one scan, wired in one visible place.

decode -> validate -> preprocess -> backend.run -> postprocess -> derive -> seal

``Translator.process`` never raises for bad input: a scan that cannot be processed becomes an
error report (reason code, payload sha256, no PHI) instead of a result.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from agent import __version__
from agent.backends import ModelRunner
from agent.bundle import ModelBundle
from agent.config import LimitsSection
from agent.derive import ModelIdentity, derive_instance, result_message_id
from agent.dicom import ScanRejected, decode_scan
from agent.preprocess import from_model_grid, normalise, to_model_grid
from agent.topics import Topics

Sealer = Callable[[bytes, str], bytes]  # (plaintext, message_id) -> envelope


@dataclass
class Outcome:
    """What processing one scan produced: rows for the outbox and what to log."""

    ok: bool
    kind: str  # "result" | "error"
    message_id: str
    topic: str
    payload: bytes
    reason: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    series_key: str | None = None  # short hash of the output series, safe to log

    @property
    def counter(self) -> str:
        return "processed" if self.ok else "failed"


def error_report(
    *, device_id: str, reason: str, detail: str, payload_sha256: str, source_topic: str
) -> tuple[str, bytes]:
    """The JSON body of an error-topic message (see docs/protocol.md). Never holds PHI."""
    message_id = hashlib.sha256(f"error\n{payload_sha256}\n{reason}".encode()).hexdigest()[:32]
    body = {
        "v": 1,
        "message_id": message_id,
        "device_id": device_id,
        "reason": reason,
        "detail": detail,
        "payload_sha256": payload_sha256,
        "source_topic": source_topic,
        "at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    return message_id, json.dumps(body, separators=(",", ":")).encode()


class Translator:
    """Turns one DICOM payload into one sealed result (or one error report)."""

    def __init__(
        self,
        bundle: ModelBundle,
        runner: ModelRunner,
        sealer: Sealer,
        *,
        limits: LimitsSection,
        topics: Topics,
        runtime: str = "onnxruntime",
    ) -> None:
        self.bundle = bundle
        self.runner = runner
        self.sealer = sealer
        self.limits = limits
        self.topics = topics
        self.identity = ModelIdentity(bundle.name, bundle.version, bundle.digest(runtime))

    def process(self, payload: bytes, source_topic: str, payload_sha256: str) -> Outcome:
        timings: dict[str, float] = {}
        t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[stage] = round((now - t) * 1000, 3)
            t = now

        try:
            scan = decode_scan(
                payload,
                self.bundle.input,
                pixel_budget=self.limits.pixel_budget,
                max_payload_bytes=self.limits.max_payload_bytes,
            )
            lap("decode")
            grid, gmap = to_model_grid(scan.pixels, scan.pixel_spacing, self.bundle.input)
            x = normalise(grid, self.bundle.input.normalisation)
            lap("preprocess")
            y = self.runner.run(x[np.newaxis, np.newaxis, :, :])
            lap("infer")
            out = from_model_grid(y[0, 0], gmap)
            stored = np.clip(out, 0.0, None) * np.float32(self.bundle.output.scale)
            derived = derive_instance(
                scan,
                stored,
                self.identity,
                self.bundle.output,
                device_id=self.topics.device,
                software_version=__version__,
            )
            lap("derive")
            message_id = result_message_id(scan.sop_instance_uid, self.identity.digest)
            envelope = self.sealer(derived, message_id)
            lap("seal")
        except ScanRejected as exc:
            message_id, body = error_report(
                device_id=self.topics.device,
                reason=exc.reason,
                detail=str(exc),
                payload_sha256=payload_sha256,
                source_topic=source_topic,
            )
            return Outcome(False, "error", message_id, str(self.topics.errors), body,
                           reason=exc.reason, timings_ms=timings)
        series_key = hashlib.sha256(scan.series_instance_uid.encode()).hexdigest()[:12]
        return Outcome(True, "result", message_id, str(self.topics.results), envelope,
                       timings_ms=timings, series_key=series_key)
