"""Models in a running agent between real Mosquitto brokers: a reload that the guard refuses
(the previous model keeps serving), a reload that activates a new model, and a 2.5D model
assembling a shuffled, duplicated series across a SIGKILL."""

from __future__ import annotations

import io
import json
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from agent.demo.sample_series import build_series, load_demo_slab
from tests.bundles import expected_context_output, make_context_bundle
from tests.conftest import Mosquitto
from tests.integration.harness import REFERENCE_BUNDLE, Recorder, cli, spawn
from tests.site import site_uid

pytestmark = pytest.mark.integration


@pytest.fixture
def brokers(mosquitto_factory: Callable[[str], Mosquitto]) -> tuple[Mosquitto, Mosquitto]:
    return mosquitto_factory("edge"), mosquitto_factory("cloud")


def _init(tmp: Path, edge: Mosquitto, cloud: Mosquitto, bundle: Path, extra: str = "") -> Path:
    r = cli("init", str(tmp / "node"), "--edge-url", edge.url, "--cloud-url", cloud.url,
            "--site", "site-a", "--device-id", "node-1", "--bundle", str(bundle))
    assert r.returncode == 0, r.stderr
    config = tmp / "node" / "agent.toml"
    config.write_text(config.read_text().replace('format = "auto"', 'format = "json"') + extra)
    return config


def _point_at(config: Path, bundle: Path) -> None:
    lines = [f'bundle = "{bundle}"' if line.startswith("bundle = ") else line
             for line in config.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")


def _send(config: Path, tmp: Path, payloads: list[bytes], name: str) -> None:
    out = tmp / name
    out.mkdir()
    for i, p in enumerate(payloads):
        (out / f"{i:03d}.dcm").write_bytes(p)
    r = cli("send", "--config", str(config), str(out))
    assert r.returncode == 0, r.stderr


def _statuses(rec: Recorder) -> list[dict[str, object]]:
    return [json.loads(m.payload) for m in rec.on("/status")]


def _wait_status(rec: Recorder, test: Callable[[dict[str, object]], bool],
                 timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in reversed(_statuses(rec)):
            if test(s):
                return s
        time.sleep(0.2)
    raise AssertionError(f"no such status; last: {_statuses(rec)[-1:]}")


def test_reload_refuses_a_drifted_model_and_activates_a_good_one(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    # The bad bundle: the shipped model with a floor no int8 model can reach, and without
    # its fp32 files (the ONNX one is the golden set's own source: it would pass any floor,
    # and backend = "auto", which init writes, would serve it).
    bad = tmp_path / "drifted"
    shutil.copytree(REFERENCE_BUNDLE, bad)
    meta = json.loads((bad / "bundle.json").read_text())
    meta["golden"]["min_psnr_db"] = 150.0
    meta.pop("reference")
    meta.pop("references")
    (bad / "bundle.json").write_text(json.dumps(meta))
    good = tmp_path / "next"
    shutil.copytree(REFERENCE_BUNDLE, good)
    meta = json.loads((good / "bundle.json").read_text())
    meta["version"] = "9.9.9"
    (good / "bundle.json").write_text(json.dumps(meta))

    config = _init(tmp_path, edge, cloud, REFERENCE_BUNDLE)
    cloud_rec = Recorder.start(cloud.url, "cloud", "iomt/site-a/node-1/#")
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    slab = load_demo_slab().t1
    _send(config, tmp_path, build_series(slab[:2]), "a")
    _wait_status(cloud_rec, lambda s: s.get("processed") == 2)

    _point_at(config, bad)
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for('"model_refused"')
    report = json.loads(cloud_rec.wait("/errors", 1)[-1].payload)
    assert report["reason"] == "model_refused"
    assert "misses its fidelity floor" in report["detail"]
    assert "still serving" in report["detail"]
    status = _wait_status(cloud_rec, lambda s: "model_refused" in s)
    served = json.loads((REFERENCE_BUNDLE / "bundle.json").read_text())["version"]
    assert status["model"]["version"] == served  # type: ignore[index]
    assert "150" in status["model_refused"]["reason"]  # type: ignore[index]
    # The previous model keeps serving.
    _send(config, tmp_path, build_series(slab[2:4]), "b")
    _wait_status(cloud_rec, lambda s: s.get("processed") == 4)
    assert agent.proc.poll() is None

    _point_at(config, good)
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for('"model_activated"')
    status = _wait_status(cloud_rec, lambda s: s["model"]["version"] == "9.9.9")  # type: ignore[index]
    assert "model_refused" not in status
    _send(config, tmp_path, build_series(slab[4:5]), "c")
    _wait_status(cloud_rec, lambda s: s.get("processed") == 5)
    assert agent.terminate() == 0
    cloud_rec.stop()


WEIGHTS = [0.5, 0.25, 1.0, 0.125, 0.0625]


def test_series_assembly_across_a_sigkill(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    n = 16
    bundle = make_context_bundle(tmp_path / "ctx", WEIGHTS)
    config = _init(tmp_path, edge, cloud, bundle, "\n[series]\nidle_timeout_s = 60\n")
    values = [50.0 * (i + 1) for i in range(n)]
    vol = np.stack([np.full((32, 32), v, dtype=np.uint16) for v in values])
    payloads = build_series(vol)
    order = [*range(n), 2, 7, 13]  # three redelivered
    random.Random(5).shuffle(order)
    half = len(order) // 2

    receiver = spawn(["receive", "--config", str(config), "--out", str(tmp_path / "results"),
                      "--count", str(n), "--timeout", "120"], tmp_path / "receiver.log")
    receiver.wait_for('"mqtt_connected"')
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    _send(config, tmp_path, [payloads[i] for i in order[:half]], "first")
    agent.wait_for('"series_assembly"')
    time.sleep(1.0)  # let it ingest and process what it can
    agent.kill()  # SIGKILL: held neighbours and waiting slices must survive
    agent2 = spawn(["run", "--config", str(config)], tmp_path / "agent2.log")
    agent2.wait_for('"series_assembly"')
    reloaded = agent2.events("series_assembly")[0]["held_reloaded"]
    _send(config, tmp_path, [payloads[i] for i in order[half:]], "second")
    assert receiver.proc.wait(120) == 0, receiver.text() + agent2.text()
    assert agent2.terminate() == 0

    pseudonym = site_uid(config.parent)  # results are de-identified (the default)
    index = {pseudonym(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID): i
             for i, p in enumerate(payloads)}
    seen: set[int] = set()
    for path in (tmp_path / "results").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        i = index[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        slots = [min(max(j, 0), n - 1) for j in range(i - 2, i + 3)]
        want = expected_context_output(values, WEIGHTS, slots) * 1000.0
        assert abs(float(ds.pixel_array[16, 16]) - want) <= 1.0, (i, want)
        seen.add(i)
    assert seen == set(range(n))
    assert isinstance(reloaded, int)
    # The series completed (ImagesInAcquisition): every held payload was released.
    assert '"series_closed"' in agent2.text()


FULL_BUNDLE = REFERENCE_BUNDLE.parent / "t1w-to-t2w-full"


def test_the_shipped_2_5d_model_serves_a_shuffled_series(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    """The real t1w-to-t2w-full bundle, end to end: each result equals the model run on that
    slice and its neighbours (edges repeated), computed here with the agent's own stages."""
    from agent.backends import RunnerOptions, open_runner
    from agent.model.bundle import load_bundle
    from agent.model.preprocess import from_model_grid, normalise, to_model_grid
    from agent.model.select import candidate_files

    edge, cloud = brokers
    n = 8
    slab = load_demo_slab().t1[8 : 8 + n]
    payloads = build_series(slab)
    config = _init(tmp_path, edge, cloud, FULL_BUNDLE)
    receiver = spawn(["receive", "--config", str(config), "--out", str(tmp_path / "results"),
                      "--count", str(n), "--timeout", "120"], tmp_path / "receiver.log")
    receiver.wait_for('"mqtt_connected"')
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    order = list(range(n))
    random.Random(2).shuffle(order)
    _send(config, tmp_path, [payloads[i] for i in order], "series")
    assert receiver.proc.wait(120) == 0, receiver.text() + agent.text()
    assert agent.terminate() == 0

    # init writes backend = "auto": expect what the file it chose on this CPU computes.
    start = agent.events("agent_starting")[0]
    runtime, precision = str(start["runtime"]), str(start["precision"])
    bundle = load_bundle(FULL_BUNDLE)
    served = candidate_files(bundle)[(runtime, precision)]
    runner = open_runner(runtime, str(served.path), RunnerOptions(intra_op_threads=1))
    grids = [to_model_grid(s.astype(np.float32), (1.0, 1.0), bundle.input) for s in slab]
    pseudonym = site_uid(config.parent)  # results are de-identified (the default)
    index = {pseudonym(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID): i
             for i, p in enumerate(payloads)}
    seen = set()
    for path in (tmp_path / "results").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        i = index[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        stack = np.stack([grids[min(max(i + d, 0), n - 1)][0] for d in range(-2, 3)])
        y = runner.run(normalise(stack, bundle.input.normalisation)[None])[0, 0]
        want = np.clip(from_model_grid(y, grids[i][1]), 0, None) * bundle.output.scale
        got = ds.pixel_array.astype(np.float32)
        assert np.abs(got - np.rint(want)).max() <= 1.0, i
        seen.add(i)
    runner.close()
    assert seen == set(range(n))
