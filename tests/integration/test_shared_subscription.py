"""Scale-out on one site: three agents share the site's scans (``$share/{site}/...``) on a
real Mosquitto; one is SIGKILLed mid-stream, the other two go on, the killed one is restarted
(as systemd's Restart=on-failure does) and every one of 600 slices comes out once."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.demo.sample_series import build_series
from tests.bundles import make_context_bundle
from tests.conftest import Mosquitto
from tests.integration.harness import Proc, cli, spawn

pytestmark = pytest.mark.integration

N = 600
AGENTS = 3


def _configs(tmp: Path, edge: Mosquitto, cloud: Mosquitto) -> list[Path]:
    """One node directory, three agent configs: own device id, state dir and client ids;
    the same keys (the receiver trusts the one device key under each id)."""
    bundle = make_context_bundle(tmp / "bundle", [1.0])  # 2D, 32 x 32: cheap inference
    r = cli("init", str(tmp / "node"), "--edge-url", edge.url, "--cloud-url", cloud.url,
            "--site", "site-a", "--device-id", "node-1", "--bundle", str(bundle))
    assert r.returncode == 0, r.stderr
    base = (tmp / "node" / "agent.toml").read_text()
    base = base.replace('format = "auto"', 'format = "json"')
    base = base.replace('backend = "auto"', 'backend = "onnxruntime"')
    base = base.replace('state_dir = "state"\n',
                        'state_dir = "state"\nshared_subscription = true\n')
    trusted = ", ".join(f'"node-{i}" = "keys/device-signing.pub"' for i in range(1, AGENTS + 1))
    base = base.replace('trusted_devices = { "node-1" = "keys/device-signing.pub" }',
                        f"trusted_devices = {{ {trusted} }}")
    assert "shared_subscription = true" in base and '"node-3"' in base
    configs = []
    for i in range(1, AGENTS + 1):
        path = tmp / "node" / f"agent-{i}.toml"
        path.write_text(base.replace('device_id = "node-1"', f'device_id = "node-{i}"')
                        .replace('state_dir = "state"', f'state_dir = "state-{i}"'))
        configs.append(path)
    return configs


def _scans(tmp: Path) -> Path:
    out = tmp / "scans"
    out.mkdir()
    vol = (np.arange(N * 32 * 32, dtype=np.uint32).reshape(N, 32, 32) % 3000 + 100)
    for i, payload in enumerate(build_series(vol.astype(np.uint16))):
        (out / f"{i:04d}.dcm").write_bytes(payload)
    return out


def _settled(receiver: Proc, quiet_s: float = 2.0, timeout: float = 120) -> int:
    """Results received once no new one came for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(receiver.events("result_received"))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return now
        time.sleep(0.2)
    raise AssertionError("results kept coming")


def test_three_agents_split_600_slices_and_a_killed_one_loses_nothing(
    tmp_path: Path, mosquitto_factory: Callable[[str], Mosquitto]
) -> None:
    edge, cloud = mosquitto_factory("edge"), mosquitto_factory("cloud")
    configs = _configs(tmp_path, edge, cloud)
    scans = _scans(tmp_path)
    receiver = spawn(["receive", "--config", str(configs[0]), "--out", str(tmp_path / "out"),
                      "--count", str(N), "--timeout", "240"], tmp_path / "receiver.log")
    receiver.wait_for('"mqtt_connected"')
    agents = [spawn(["run", "--config", str(c)], tmp_path / f"agent-{i + 1}.log")
              for i, c in enumerate(configs)]
    restarted = None
    try:
        for a in agents:
            a.wait_for('"mqtt_connected"', 2)
        time.sleep(0.5)  # every SUBSCRIBE in before the first scan
        assert cli("send", "--config", str(configs[0]), str(scans)).returncode == 0
        victim = agents[1]
        victim.wait_for('"slice_processed"', 40)
        victim.kill()  # SIGKILL mid-stream
        before_kill = len(victim.events("slice_processed"))
        settled = _settled(receiver)
        by_device = Counter(str(e["device_id"]) for e in receiver.events("result_received"))
        assert by_device["node-1"] > 0 and by_device["node-3"] > 0
        restarted = spawn(["run", "--config", str(configs[1])], tmp_path / "agent-2b.log")
        assert receiver.proc.wait(240) == 0, receiver.text()[-3000:]
        received = receiver.events("result_received")
        unique = {e["message_id"] for e in received}
        assert len(unique) == N, f"{N - len(unique)} slices lost"
        done = receiver.events("receive_done")[-1]
        assert done["filed"] == N and done["error_reports"] == 0
        final = Counter(str(e["device_id"]) for e in received)
        after_restart = len(restarted.events("slice_processed"))
        # Mosquitto 2.0 deals the group's messages in turn to every member with a session,
        # connected or not: the killed agent's share waited in its session (and its inbox)
        # and the restart processed it (docs/reliability.md, "Scale-out on one site").
        assert after_restart > 0 and final["node-2"] > by_device["node-2"]
        figures = {"sent": N, "unique_results": len(unique), "lost": N - len(unique),
                   "duplicates_dropped": done["duplicates"],
                   "per_agent": dict(sorted(final.items())),
                   "killed_agent_processed_before_kill": before_kill,
                   "results_while_killed_agent_down": settled,
                   "processed_by_restarted_agent": after_restart}
        print("shared subscription figures:", json.dumps(figures))
        (tmp_path / "figures.json").write_text(json.dumps(figures))
    finally:
        for a in [*agents, restarted]:
            if a is not None:
                a.kill()
        receiver.kill()
