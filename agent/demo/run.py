"""``iomt-agent demo``: the main job on one machine.

Two embedded amqtt brokers (edge and cloud) on free loopback ports, ``init`` into the
workdir, the bundled T1-weighted MNI152 series sent as a scanner gateway would, the agent
running as a subprocess, the cloud receiver verifying and decrypting the results, then a
summary and a PNG montage (input | synthetic output | reference), each slice turned upright
from its DICOM orientation and the columns labelled in the image.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom

from agent.cloud.receiver import receiver_from_config
from agent.config import load_config
from agent.crypto.seal import EnvelopeError
from agent.daemon.pipeline import deidentifier
from agent.demo.display import radiological
from agent.demo.embedded_broker import EmbeddedBroker
from agent.demo.mni_sample import as_stored, sample_series
from agent.demo.png import montage, write_gray_png
from agent.demo.sample_series import DemoSlab, load_demo_slab
from agent.dicom.derive import result_message_id, source_uid
from agent.model.bundle import load_bundle
from agent.model.select import servable_digests
from agent.ops.scaffold import InitOptions, write_directory
from agent.transport.mqtt import Connection, Message
from agent.transport.topics import Topics

RESULT_TIMEOUT_S = 180.0
REFUSALS = ("model_refused", "cannot_start")  # the agent's last words when it exits 2


class DemoError(Exception):
    """The demo could not run; ``str()`` is one line for the user, ``exit_code`` the status
    (2: the agent refused its config or bundle, 1: anything else)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _say(text: str) -> None:
    print(text, flush=True)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")


def run_demo(workdir: Path, *, slices: int = 24, bundle: Path | None = None) -> int:
    slab = load_demo_slab()
    slices = max(1, min(slices, slab.t1.shape[0]))
    for sub in ("keys", "state", "results", "input"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)

    edge, cloud = EmbeddedBroker(), EmbeddedBroker()
    edge.start()
    cloud.start()
    _say(f"[1/5] embedded brokers: edge {edge.url}, cloud {cloud.url} (amqtt, MQTT 3.1.1)")
    agent_proc: subprocess.Popen[bytes] | None = None
    clients: list[Connection] = []  # stopped before the brokers, however the demo ends
    try:
        config_path = write_directory(
            InitOptions(workdir, edge.url, cloud.url, site="demo-site", device_id="edge-1",
                        bundle=bundle, protocol="3.1.1", force=True)
        )
        config = load_config(config_path)
        model = load_bundle(config.model.bundle)
        # backend = "auto" picks the served file at start: expect any of their result ids.
        digests = sorted(servable_digests(model))
        _say(f"[2/5] init: {config_path} (model {model.name} {model.version}, "
             f"backend {config.model.backend})")

        series = sample_series(slices, slab)
        (workdir / "input").mkdir()
        sop_of: dict[str, str] = {}
        deid = deidentifier(config.deid)  # the site's secret: its results' ids are keyed
        for i, payload in enumerate(series):
            (workdir / "input" / f"slice{i:03d}.dcm").write_bytes(payload)
            sop = str(pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True).SOPInstanceUID)
            sop_of.update((result_message_id(source_uid(sop, deid), d), sop) for d in digests)
        _say(f"[3/5] sample series: {slices} axial T1w slices of the MNI152 template, "
             f"{slab.t1.shape[2]}x{slab.t1.shape[1]} at {slab.spacing_mm[0]:g} mm")

        # The cloud consumer subscribes first: a broker keeps results only for known sessions.
        assert config.receiver is not None
        receiver = receiver_from_config(config, workdir / "results")
        topics = Topics(config.agent.site, config.agent.device_id)
        sent_at: dict[str, float] = {}
        latency_ms: dict[str, float] = {}
        rejected: list[str] = []
        all_in = threading.Event()
        lock = threading.Lock()

        def on_result(msg: Message) -> None:
            try:
                got = receiver.handle(msg.payload)
            except EnvelopeError as exc:
                rejected.append(exc.reason)
            else:
                if got is not None:
                    with lock:
                        sop = sop_of.get(got.message_id)
                        if sop in sent_at:
                            latency_ms[got.message_id] = (time.perf_counter() - sent_at[sop]) * 1e3
                        if len(latency_ms) >= slices:
                            all_in.set()
            consumer.ack(msg)

        consumer = Connection(config.cloud, "demo-cloud-consumer", name="cloud",
                              subscriptions=(topics.results_filter(),), on_message=on_result,
                              manual_ack=True)
        clients.append(consumer)
        consumer.start()
        consumer.wait_connected(10)

        log_path = workdir / "agent.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log_path.open("wb") as log_file:
            agent_proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(config_path)],
                stdout=log_file, stderr=subprocess.STDOUT, env=env,
            )
        _wait_for_log(log_path, '"mqtt_connected"', count=2, timeout=60, proc=agent_proc)
        _say(f"[4/5] agent running (pid {agent_proc.pid}, log {log_path})")

        gateway = Connection(config.edge, "demo-scanner-gateway", name="edge")
        gateway.start()
        gateway.wait_connected(10)
        t0 = time.perf_counter()
        for payload in series:
            sop = str(pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True).SOPInstanceUID)
            sent_at[sop] = time.perf_counter()
            gateway.publish(topics.scan("scanner-1"), payload, qos=1)
        all_in.wait(RESULT_TIMEOUT_S)
        elapsed = time.perf_counter() - t0
        gateway.stop()
    finally:
        for client in clients:
            client.stop()
        code = _stop_agent(agent_proc)
        edge.stop()
        cloud.stop()

    verified = len(latency_ms)
    stage_rows = _stage_rows(workdir / "agent.log")
    _say("[5/5] results verified and decrypted by the cloud consumer\n")
    rows = [
        ("slices sent", f"{slices}"),
        ("results verified + decrypted", f"{verified}"),
        ("results rejected", f"{len(rejected)}"),
        *stage_rows,
        ("end-to-end latency p50 / p95 (ms)",
         f"{_median(list(latency_ms.values())):.0f} / {_p95(list(latency_ms.values())):.0f}"),
        ("throughput (slices/s)", f"{verified / elapsed:.1f}" if elapsed > 0 else "-"),
        ("agent exit code after SIGTERM", f"{code}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        _say(f"  {name:<{width}}  {value}")
    png = _write_montage(workdir, slab, slices)
    _say(f"\noutput series: {workdir / 'results'}\nmontage (input | synthetic T2w | "
         f"simulated reference): {png}")
    ok = verified == slices and not rejected and code == 0
    _say("demo OK" if ok else "demo FAILED: not every slice came back verified")
    return 0 if ok else 1


def _wait_for_log(path: Path, needle: str, *, count: int, timeout: float,
                  proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if text.count(needle) >= count:
            return
        if proc.poll() is not None:
            code = proc.returncode
            raise DemoError(f"the agent exited with status {code} before it connected: "
                            f"{_last_refusal(text)} (log: {path})", 2 if code == 2 else 1)
        time.sleep(0.2)
    raise DemoError(f"the agent did not connect to the embedded brokers within "
                    f"{timeout:.0f} s (log: {path})")


def _last_refusal(log_text: str) -> str:
    """The agent's own words for why it would not start: the last refusal event's reason
    and fix, or the last line of its log."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            event = json.loads(line[line.index("{"):])
        except (ValueError, json.JSONDecodeError):
            continue
        if isinstance(event, dict) and event.get("event") in REFUSALS:  # the reason ends
            return f"{event['event']}: {event.get('reason') or event.get('error')}"  # in its fix
    return lines[-1][-500:] if lines else "it wrote nothing"


def _stop_agent(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _stage_rows(log_path: Path) -> list[tuple[str, str]]:
    """The summary's per-stage lines from the agent's ``slice_processed`` events: the
    median wall time of each stage and, beside it, the median CPU time the agent spent on
    it (they differ by the time a stage waited for a core the model held), then the
    agent's own work per slice: its CPU time in every stage but the model's."""
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    own: list[float] = []
    totals: list[float] = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"slice_processed"' not in line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        for name, ms in event.get("stages_ms", {}).items():
            wall.setdefault(name, []).append(float(ms))
        for name, ms in event.get("cpu_ms", {}).items():
            cpu.setdefault(name, []).append(float(ms))
        if event.get("cpu_ms"):
            own.append(sum(float(ms) for ms in event["cpu_ms"].values()))
        totals.append(float(event.get("total_ms", 0)))
    rows = []
    for name, times in wall.items():
        if name in cpu:
            rows.append((f"median {name} (ms, wall / CPU)",
                         f"{_median(times):.1f} / {_median(cpu[name]):.1f}"))
        else:
            rows.append((f"median {name} (ms, wall)", f"{_median(times):.1f}"))
    if own:
        rows.append(("agent's own work per slice (CPU ms)", f"{_median(own):.1f}"))
    if totals:
        rows.append(("median total per slice (ms, wall)", f"{_median(totals):.1f}"))
    return rows


MONTAGE_LABELS = ["T1W INPUT", "SYNTHETIC T2W", "SIMULATED T2W"]


def _write_montage(workdir: Path, slab: DemoSlab, slices: int) -> Path:
    """Input | output | reference for the first, middle and last slice, each turned into
    the usual axial view (anterior up, the patient's right on the left) from its header."""
    inputs = sorted((pydicom.dcmread(p) for p in (workdir / "input").glob("*.dcm")),
                    key=lambda ds: int(ds.InstanceNumber))
    outputs = {int(ds.InstanceNumber): ds
               for ds in (pydicom.dcmread(p) for p in (workdir / "results").rglob("*.dcm"))}
    reference = as_stored(slab.t2_reference[:slices])  # laid out as the input's pixels
    picks = sorted({0, slices // 2, slices - 1}) if slices > 2 else list(range(slices))
    rows = []
    for i in picks:
        source = inputs[i]
        output = outputs.get(int(source.InstanceNumber))
        if output is None:
            continue
        rows.append([radiological(source.pixel_array, source.ImageOrientationPatient),
                     radiological(output.pixel_array, output.ImageOrientationPatient),
                     radiological(reference[i], source.ImageOrientationPatient)])
    path = workdir / "montage.png"
    if rows:
        write_gray_png(path, montage(rows, labels=MONTAGE_LABELS))
    return path
