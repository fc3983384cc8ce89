"""A fleet switch between a 2.5D and a 2D model in a running agent between real Mosquitto
brokers, while slices flow, and back. Mid-series the 2.5D model holds a processed slice (a
neighbour) and has slices waiting for theirs: after the switch to 2D the held slice is
released and the waiting ones go through the 2D model, as a SIGHUP reload does. Then a 2.5D
release is published while single-slice series keep arriving, and a whole series after it
goes through the 2.5D model. Every slice gives exactly one result, and each result's pixels
are what the model its DerivationDescription names computes for it: none lost, none made by
a mix of both. The models are the tests' smallest (32 x 32, fp32, one convolution)."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from agent.demo.sample_series import build_series
from tests.bundles import expected_context_output, make_context_bundle
from tests.conftest import Mosquitto
from tests.integration.harness import Recorder, cli, spawn
from tests.integration.test_models_live import _init, _send, _wait_status
from tests.site import site_uid

pytestmark = pytest.mark.integration

GROUP = "ward-a"
WEIGHTS = [0.5, 0.25, 1.0, 0.125, 0.0625]  # the 2.5D model: slots -2 .. +2
FLAT = [2.0]  # the 2D model: twice the normalised slice
A, B, C = 10, 6, 3  # slices of series A (switched mid-series), B (after), C (1-slice series)


def _series(n: int, step: float) -> tuple[list[bytes], list[float]]:
    values = [step * (i + 1) for i in range(n)]
    vol = np.stack([np.full((32, 32), v, dtype=np.uint16) for v in values])
    return build_series(vol), values


def _versioned(bundle: Path, out: Path, version: str) -> Path:
    shutil.copytree(bundle, out)
    meta = json.loads((out / "bundle.json").read_text())
    meta["version"] = version
    (out / "bundle.json").write_text(json.dumps(meta))
    return out


def _expected(model: str, values: list[float], i: int) -> float:
    if model == "test-flat":
        return expected_context_output(values, FLAT, [i]) * 1000.0
    slots = [min(max(j, 0), len(values) - 1) for j in range(i - 2, i + 3)]
    return expected_context_output(values, WEIGHTS, slots) * 1000.0


def test_a_fleet_switch_between_a_2_5d_and_a_2d_model_while_slices_flow(
        tmp_path: Path, mosquitto_factory: Callable[[str], Mosquitto]) -> None:
    edge, cloud = mosquitto_factory("edge"), mosquitto_factory("cloud")
    repo = tmp_path / "repo"
    assert cli("fleet", "init-repo", str(repo)).returncode == 0
    context = make_context_bundle(tmp_path / "ctx", WEIGHTS)
    flat = _versioned(make_context_bundle(tmp_path / "flat0", FLAT, name="test-flat"),
                      tmp_path / "flat", "2.0.0")
    config = _init(tmp_path, edge, cloud, context,
                   f'\n[series]\nidle_timeout_s = 60\n\n[fleet]\ngroup = "{GROUP}"\n'
                   f'root = "{repo / "root.json"}"\n')
    rec = Recorder.start(cloud.url, "cloud", "iomt/site-a/node-1/status")
    receiver = spawn(["receive", "--config", str(config), "--out", str(tmp_path / "results"),
                      "--count", str(A + B + C), "--timeout", "180"], tmp_path / "receiver.log")
    receiver.wait_for('"mqtt_connected"')
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 3)

    def publish(bundle: Path) -> list[str]:
        return ["fleet", "publish", "--repo", str(repo), "--bundle", str(bundle), "--group",
                GROUP, "--broker", cloud.url]

    def series_of(s: dict[str, object]) -> dict[str, int]:
        got = s.get("series")
        return got if isinstance(got, dict) else {}

    # 2.5D -> 2D mid-series: half of A in, one slice processed and held, the rest waiting.
    a, a_values = _series(A, 50.0)
    _send(config, tmp_path, a[:5], "a1")
    agent.wait_for('"slice_processed"')  # slice 2: its neighbours are all in
    r = cli(*publish(flat), timeout=120)
    assert r.returncode == 0, r.stderr
    agent.wait_for('"model_activated"', timeout=120)
    active = _wait_status(rec, lambda s: s["model"]["name"] == "test-flat")  # type: ignore[index]
    assert active["model"]["name"] == "test-flat" and "series" not in active  # type: ignore[index]
    _send(config, tmp_path, a[5:], "a2")

    # 2D -> 2.5D while single-slice series keep arriving (each is one result either way).
    back = spawn(publish(_versioned(context, tmp_path / "ctx3", "3.0.0")),
                 tmp_path / "publish.log")
    singles = [_series(1, 300.0 + 10 * k) for k in range(C)]
    _send(config, tmp_path, [p for payloads, _v in singles for p in payloads], "c")
    assert back.proc.wait(120) == 0, back.text()
    agent.wait_for('"model_activated"', 2, timeout=120)
    assert agent.events("model_activated")[-1]["model"] == "test-context"
    b, b_values = _series(B, 70.0)
    _send(config, tmp_path, b, "b")

    assert receiver.proc.wait(180) == 0, receiver.text() + agent.text()
    assert agent.terminate() == 0
    done = _wait_status(rec, lambda s: s.get("processed") == A + B + C)  # the last one
    assert done["failed"] == 0 and series_of(done).get("held") == 0

    pseudonym = site_uid(config.parent)  # results are de-identified (the default)
    sources: dict[str, tuple[str, int, list[float]]] = {}
    for name, (payloads, values) in {"a": (a, a_values), "b": (b, b_values),
                                      **{f"c{k}": s for k, s in enumerate(singles)}}.items():
        for i, p in enumerate(payloads):
            uid = pseudonym(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID)
            sources[uid] = (name, i, values)
    by_model: dict[str, list[tuple[str, int]]] = {"test-context": [], "test-flat": []}
    for path in (tmp_path / "results").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        name, i, values = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        model = next(m for m in by_model if m in str(ds.DerivationDescription))
        want = _expected(model, values, i)
        assert abs(float(ds.pixel_array[16, 16]) - want) <= 1.0, (name, i, model, want)
        by_model[model].append((name, i))
    every = sorted(by_model["test-context"] + by_model["test-flat"])
    assert every == sorted(sources[u][:2] for u in sources)  # each slice once: none lost
    a_context = {i for name, i in by_model["test-context"] if name == "a"}
    # Of A only slice 2 went through the 2.5D model (with its neighbours, checked above):
    # the four waiting slices and the second half through the 2D one; all of B through 2.5D.
    assert a_context == {2}
    assert {i for name, i in by_model["test-context"] if name == "b"} == set(range(B))
    rec.stop()
