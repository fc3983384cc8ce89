"""The domain-shift score in a running agent between real Mosquitto brokers: an
in-distribution series goes out unmarked, a shifted one (a T2-weighted series sent as T1w)
goes out marked under policy "serve" and is refused with reason domain_shift under
"refuse"; a bundle without domain.json serves and its status says no_domain_reference.
One node directory throughout, so the runtime choice (backend = "auto") is made once."""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from agent.demo.sample_series import build_series, load_demo_slab
from tests.conftest import Mosquitto
from tests.integration.harness import REFERENCE_BUNDLE, Recorder, cli, spawn
from tests.site import site_uid

pytestmark = pytest.mark.integration

SLICES = slice(8, 11)


@pytest.fixture
def brokers(mosquitto_factory: Callable[[str], Mosquitto]) -> tuple[Mosquitto, Mosquitto]:
    return mosquitto_factory("edge"), mosquitto_factory("cloud")


def _init(tmp: Path, edge: Mosquitto, cloud: Mosquitto, bundle: Path) -> Path:
    r = cli("init", str(tmp / "node"), "--edge-url", edge.url, "--cloud-url", cloud.url,
            "--site", "site-a", "--device-id", "node-1", "--bundle", str(bundle))
    assert r.returncode == 0, r.stderr
    config = tmp / "node" / "agent.toml"
    config.write_text(config.read_text().replace('format = "auto"', 'format = "json"'))
    return config


def _send(config: Path, folder: Path, payloads: list[bytes]) -> None:
    folder.mkdir()
    for i, p in enumerate(payloads):
        (folder / f"{i:03d}.dcm").write_bytes(p)
    r = cli("send", "--config", str(config), str(folder))
    assert r.returncode == 0, r.stderr


def _status(rec: Recorder, test: Callable[[dict[str, object]], bool],
            timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in reversed(rec.on("/status")):
            s = json.loads(m.payload)
            if test(s):
                return s  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"no such status; last: {rec.on('/status')[-1:]}")


def test_a_shifted_series_is_flagged_then_refused_an_in_distribution_one_is_not(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    edge, cloud = brokers
    demo = load_demo_slab()
    in_domain = build_series(demo.t1[SLICES], series_description="T1w in distribution")
    # The simulated T2w partner sent as a T1w series: the wrong contrast altogether.
    shifted = build_series(demo.t2_reference[SLICES], series_description="T1w (really T2w)")
    n = len(in_domain)
    config = _init(tmp_path, edge, cloud, REFERENCE_BUNDLE)
    cloud_rec = Recorder.start(cloud.url, "cloud", "iomt/site-a/node-1/#")
    receiver = spawn(["receive", "--config", str(config), "--out", str(tmp_path / "results"),
                      "--count", str(2 * n), "--timeout", "120"], tmp_path / "receiver.log")
    receiver.wait_for('"mqtt_connected"')
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    _send(config, tmp_path / "both", in_domain + shifted)  # one send: one process start
    assert receiver.proc.wait(120) == 0, receiver.text() + agent.text()
    assert agent.terminate() == 0  # its last word is a status with every count in it
    status = _status(cloud_rec, lambda s: s["state"] == "offline" and s.get("processed") == 2 * n)
    domain = status["domain"]
    assert isinstance(domain, dict)
    assert domain["policy"] == "serve"
    assert domain["slices_scored"] == 2 * n
    assert domain["flagged"] == n and domain["refused"] == 0
    pseudonym = site_uid(config.parent)
    shifted_series = pydicom.dcmread(io.BytesIO(shifted[0])).SeriesInstanceUID
    assert domain["last_flagged_series"] == pseudonym(shifted_series)
    marked = {True: 0, False: 0}
    for path in (tmp_path / "results").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        flagged = ds[0x00711003].value == "FLAGGED"
        marked[flagged] += 1
        assert ds[0x00710010].value == "IOMT-EDGE-AGENT DOMAIN"
        score = float(ds[0x00711001].value)
        if flagged:
            assert ds.ImageComments.startswith("DOMAIN SHIFT WARNING") and score >= 1.0
        else:
            assert "ImageComments" not in ds and score < 1.0
    assert marked == {True: n, False: n}
    assert len(agent.events("domain_shift")) == n
    assert all(e["action"] == "served_marked" for e in agent.events("domain_shift"))

    # The same site under policy "refuse": the shifted series becomes error reports.
    config.write_text(config.read_text().replace('policy = "serve"', 'policy = "refuse"', 1))
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent2.log")
    agent.wait_for('"mqtt_connected"', 2)
    refused = build_series(demo.t2_reference[SLICES], series_description="T1w (really T2w)")
    _send(config, tmp_path / "refused", refused)
    reports = [json.loads(m.payload) for m in cloud_rec.wait("/errors", n)]
    assert {r["reason"] for r in reports} == {"domain_shift"}
    assert "training domain" in reports[0]["detail"]
    assert agent.terminate() == 0
    status = _status(cloud_rec, lambda s: s["state"] == "offline" and s.get("failed") == n)
    assert status["domain"]["policy"] == "refuse"  # type: ignore[index]
    assert status["domain"]["refused"] == n  # type: ignore[index]

    # A bundle without domain.json (the same model: the runtime choice is cached) serves,
    # unscored, and says so.
    bundle = tmp_path / "no-reference"
    shutil.copytree(REFERENCE_BUNDLE, bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta.pop("domain")
    (bundle / "bundle.json").write_text(json.dumps(meta))
    (bundle / "domain.json").unlink()
    config.write_text("\n".join(f'bundle = "{bundle}"' if line.startswith("bundle = ") else line
                                for line in config.read_text().splitlines()) + "\n")
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent3.log")
    agent.wait_for('"mqtt_connected"', 2)
    _send(config, tmp_path / "unscored", build_series(demo.t2_reference[SLICES][:1],
                                                       series_description="T1w (really T2w)"))
    assert cloud_rec.wait("/results", 2 * n + 1)  # served, although it is the shifted series
    assert agent.events("domain_reference_missing")
    assert agent.terminate() == 0
    status = _status(cloud_rec,
                     lambda s: s["state"] == "offline" and s.get("processed") == 2 * n + 1)
    assert status["domain"] == {"policy": "refuse", "note": "no_domain_reference"}
    cloud_rec.stop()
