"""The processing stages of one scan, wired in one visible place.

decode -> validate -> preprocess  |  backend.run  |  postprocess -> derive -> seal
(``Translator.stage``)              (``run_model``)   (``Translator.finish``)

The three parts run on different threads in the daemon, so the model works on one scan
while the next one is decoded and the previous one is written, sealed and committed
(``Translator.infer`` runs the first two in one call).

``Translator.process`` never raises for bad input: a scan that cannot be processed becomes an
error report (reason code, payload sha256, no PHI) instead of a result.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from agent import __version__
from agent.backends import ModelRunner
from agent.config import LimitsSection
from agent.config_deid import DeidSection
from agent.config_domain import DomainSection
from agent.crypto.site_secret import load_site_secret
from agent.daemon.domain_check import DomainCheck, DomainVerdict
from agent.dicom.decode import Scan, ScanRejected, decode_scan
from agent.dicom.deid import Deidentifier, DeidOptions
from agent.dicom.derive import (
    TYPE2_EMPTY,
    ModelIdentity,
    derive_instance,
    result_message_id,
    source_uid,
)
from agent.dicom.derived_writer import DerivedWriter
from agent.model.bundle import ModelBundle
from agent.model.preprocess import GridMap, from_model_grid, normalise, to_model_grid
from agent.transport.topics import Topics

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
    detail: str | None = None  # what the error report says (tag names and numbers, no PHI)
    timings_ms: dict[str, float] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # the agent's CPU per stage
    series_key: str | None = None  # short hash of the output series, safe to log
    domain: DomainVerdict | None = None  # the domain-shift verdict (a bundle with a reference)

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


def deidentifier(section: DeidSection) -> Deidentifier | None:
    """The config's de-identification (None when ``enabled = false``). Raises
    ``KeyFileError`` for a missing or unprotected secret file."""
    if not section.enabled:
        return None
    options = DeidOptions(
        retain_modified_dates=section.retain_modified_dates,
        retain_patient_characteristics=section.retain_patient_characteristics,
        retain_device_identity=section.retain_device_identity,
    )
    return Deidentifier(load_site_secret(section.secret_file), options, type2=TYPE2_EMPTY)


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
        digest: str | None = None,
        deid: Deidentifier | None = None,
        decoder: Callable[..., Scan] = decode_scan,
        domain: DomainSection | None = None,
        extra_runners: Sequence[ModelRunner] = (),
    ) -> None:
        """``extra_runners``: more sessions of the same file, for further model workers.
        ``deid``: de-identify each result before sealing (PS3.15 Annex E); its message
        id and series key then derive from the source UIDs' pseudonyms, not the UIDs.
        ``decoder``: ``decode_scan`` or a budgeted stand-in with its signature
        (``agent.dicom.sandbox.DecodeProcess.decode``).
        ``domain``: the site's domain-shift policy (default: serve, marked)."""
        self.decoder = decoder
        self.bundle = bundle
        self.deid = deid
        self.runner = runner
        self.runners = (runner, *extra_runners)  # one per model worker
        self.sealer = sealer
        self.limits = limits
        self.topics = topics
        # The served file's digest (``digest``): an fp32 reference that ``backend = "auto"``
        # chose has its own, so its results never share ids with the int8 file's.
        self.identity = ModelIdentity(bundle.name, bundle.version,
                                      digest or bundle.digest(runtime))
        # Per-series templates of the derived instance: only per-slice elements are encoded.
        self.writer = DerivedWriter()
        self.domain = DomainCheck(bundle.domain, domain or DomainSection())

    def error(self, reason: str, detail: str, payload_sha256: str, source_topic: str,
              timings: dict[str, float] | None = None) -> Outcome:
        """An error report for one scan (never PHI: reason code, tag names, numbers)."""
        message_id, body = error_report(
            device_id=self.topics.device,
            reason=reason,
            detail=detail,
            payload_sha256=payload_sha256,
            source_topic=source_topic,
        )
        return Outcome(False, "error", message_id, str(self.topics.errors), body,
                       reason=reason, detail=detail, timings_ms=timings or {})

    def prepare(self, payload: bytes, payload_sha256: str | None = None) -> Prepared:
        """Decode a payload against the input contract and put it on the model grid.
        ``payload_sha256``: its digest when known (not hashed again). Raises
        ``ScanRejected``."""
        scan = self.decoder(
            payload,
            self.bundle.input,
            pixel_budget=self.limits.pixel_budget,
            max_payload_bytes=self.limits.max_payload_bytes,
            payload_sha256=payload_sha256,
        )
        grid, gmap = to_model_grid(scan.pixels, scan.pixel_spacing, self.bundle.input)
        return Prepared(scan, grid, gmap)

    def stage(self, payload: bytes, source_topic: str, payload_sha256: str) -> ModelInput | Outcome:
        """Everything before the model for a 2D model: decode, validate, preprocess. An
        Outcome means the scan was rejected."""
        timer = StageTimer()
        try:
            prepared = self.prepare(payload, payload_sha256)
        except ScanRejected as exc:
            return self.error(exc.reason, str(exc), payload_sha256, source_topic, timer.timings)
        timer.lap("decode", extra_cpu_ms=prepared.scan.decoder_cpu_ms)
        return self.stack(prepared, [prepared.grid], source_topic, payload_sha256, timer)

    def stack(self, centre: Prepared, grids: Sequence[npt.NDArray[np.float32]],
              source_topic: str, payload_sha256: str,
              timer: StageTimer | None = None) -> ModelInput:
        """The model input from prepared slices: ``grids`` are the model-grid images of the
        2k + 1 slots in slice order (one for a 2D model), ``centre`` the slice the result is
        for."""
        timer = timer or StageTimer()
        x = normalise(np.stack(grids), self.bundle.input.normalisation)
        timer.lap("preprocess")
        return ModelInput(centre, x[np.newaxis], source_topic, payload_sha256, timer)

    def run_model(self, staged: ModelInput, runner: ModelRunner | None = None
                  ) -> Inferred | Outcome:
        """The model on one staged input (a model worker's thread; ``runner``: that
        worker's, one of ``runners``)."""
        timer = staged.timer
        timer.restart()  # the time it waited for the model is no stage's
        try:
            y = (runner or self.runner).run(staged.x)
        except Exception as exc:  # a runtime failure on one input must not stop the loop
            return self.error("inference_failed", f"runtime error ({type(exc).__name__})",
                              staged.payload_sha256, staged.source_topic, timer.timings)
        timer.lap("infer", cpu=False)
        centre = staged.centre
        return Inferred(centre.scan, y[0, 0], centre.gmap, staged.source_topic,
                        staged.payload_sha256, timer, staged.x[0, staged.x.shape[1] // 2])

    def infer(self, payload: bytes, source_topic: str, payload_sha256: str) -> Inferred | Outcome:
        """Decode, validate, preprocess and run the model in one call (2D model)."""
        staged = self.stage(payload, source_topic, payload_sha256)
        return staged if isinstance(staged, Outcome) else self.run_model(staged)

    def infer_stack(self, centre: Prepared, grids: Sequence[npt.NDArray[np.float32]],
                    source_topic: str, payload_sha256: str,
                    timer: StageTimer | None = None) -> Inferred | Outcome:
        """``stack`` and ``run_model`` in one call."""
        return self.run_model(self.stack(centre, grids, source_topic, payload_sha256, timer))

    def finish(self, inferred: Inferred) -> Outcome:
        """Second half: back to the input grid, derive the output instance, seal it."""
        timer, scan = inferred.timer, inferred.scan
        timer.restart()
        series_uid = source_uid(scan.series_instance_uid, self.deid)
        series_key = hashlib.sha256(series_uid.encode()).hexdigest()[:12]
        verdict = None
        if inferred.x_centre is not None:
            # The status names a flagged series by its pseudonym (de-identifying), else by key.
            verdict = self.domain.judge(inferred.x_centre, inferred.output, series_key,
                                        series_uid if self.deid is not None else series_key)
            timer.lap("domain")
        if verdict is not None and verdict.refuse:
            refused = self.error("domain_shift", verdict.detail(), inferred.payload_sha256,
                                 inferred.source_topic, timer.timings)
            refused.domain, refused.series_key = verdict, series_key
            return refused
        try:
            out = from_model_grid(inferred.output, inferred.gmap)
            stored = np.clip(out, 0.0, None) * np.float32(self.bundle.output.scale)
            derived = derive_instance(
                scan,
                stored,
                self.identity,
                self.bundle.output,
                device_id=self.topics.device,
                software_version=__version__,
                writer=self.writer,
                deid=self.deid,
                domain=None if verdict is None else verdict.mark(),
            )
        except Exception as exc:  # e.g. a source attribute pydicom cannot write back
            return self.error("derive_failed", f"cannot write the result ({type(exc).__name__})",
                               inferred.payload_sha256, inferred.source_topic, timer.timings)
        timer.lap("derive")
        # The idempotency key travels in the cleartext header: keyed by the site secret
        # (through the pseudonym) when de-identifying, so the source UID cannot be tested.
        message_id = result_message_id(source_uid(scan.sop_instance_uid, self.deid),
                                       self.identity.digest)
        envelope = self.sealer(derived, message_id)
        timer.lap("seal")
        return Outcome(True, "result", message_id, str(self.topics.results), envelope,
                       timings_ms=timer.timings, cpu_ms=timer.cpu, series_key=series_key,
                       domain=verdict)

    def process(self, payload: bytes, source_topic: str, payload_sha256: str) -> Outcome:
        """Both halves in one call."""
        first = self.infer(payload, source_topic, payload_sha256)
        return first if isinstance(first, Outcome) else self.finish(first)


@dataclass(frozen=True)
class Prepared:
    """A decoded scan on the model grid (not yet normalised)."""

    scan: Scan
    grid: npt.NDArray[np.float32]  # (H, W) on the model grid
    gmap: GridMap


class StageTimer:
    """Stage timings in milliseconds: ``timings`` the wall time of each stage, ``cpu`` the
    CPU time the agent itself spent on it (the stage's thread, plus the decoder process for
    ``decode``; none for ``infer``, whose runtime works on threads of its own). On a busy
    node the two differ by the time a stage waited for a core."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t = time.perf_counter()
        self._c = time.thread_time()

    def restart(self) -> None:
        self._t = time.perf_counter()
        self._c = time.thread_time()

    def lap(self, stage: str, *, extra_cpu_ms: float = 0.0, cpu: bool = True) -> None:
        """End ``stage``. ``extra_cpu_ms``: CPU spent on it elsewhere (the decoder process);
        ``cpu=False``: record no CPU time for it."""
        now, now_cpu = time.perf_counter(), time.thread_time()
        self.timings[stage] = round((now - self._t) * 1000, 3)
        if cpu:
            self.cpu[stage] = round((now_cpu - self._c) * 1000 + extra_cpu_ms, 3)
        self._t, self._c = now, now_cpu


@dataclass
class ModelInput:
    """A scan ready for the model: the normalised input tensor (1, C, H, W)."""

    centre: Prepared  # the slice the result is for
    x: npt.NDArray[np.float32]
    source_topic: str
    payload_sha256: str
    timer: StageTimer


@dataclass
class Inferred:
    """A scan between the two halves: decoded and run through the model."""

    scan: Scan
    output: npt.NDArray[np.float32]  # model output on the model grid (H, W)
    gmap: GridMap
    source_topic: str
    payload_sha256: str
    timer: StageTimer
    x_centre: npt.NDArray[np.float32] | None = None  # normalised input slice (domain score)
