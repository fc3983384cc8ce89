"""Failover across a real three-node RabbitMQ cluster (the cloud broker), a node SIGKILLed
mid-stream. Slow (the cluster takes about a minute to form on two cores): marked
``cluster``, run by ``make test-cluster`` (which .ci/run calls), not by ``make test``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.demo.sample_series import build_series
from tests.bundles import make_scale_bundle
from tests.conftest import Mosquitto
from tests.integration.harness import cli, spawn
from tests.integration.rabbitmq import Cluster, rabbitmq_installed

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

N = 200


def _config(tmp: Path, edge: Mosquitto, cluster: Cluster) -> Path:
    bundle = make_scale_bundle(tmp / "bundle")
    first, *rest = cluster.nodes
    r = cli("init", str(tmp / "node"), "--edge-url", edge.url, "--cloud-url", first.url,
            "--site", "site-a", "--device-id", "node-1", "--protocol", "3.1.1",
            "--bundle", str(bundle))
    assert r.returncode == 0, r.stderr
    config = tmp / "node" / "agent.toml"
    failover = ", ".join(f'"{n.url}"' for n in rest)
    text = config.read_text().replace('format = "auto"', 'format = "json"')
    text = text.replace('backend = "auto"', 'backend = "onnxruntime"')
    text = text.replace(f'url = "{first.url}"\n',
                        f'url = "{first.url}"\nfailover_urls = [{failover}]\n')
    assert "failover_urls" in text
    config.write_text(text)
    return config


def _scans(tmp: Path, n: int) -> Path:
    out = tmp / "scans"
    out.mkdir()
    vol = (np.arange(n * 16 * 16, dtype=np.uint16).reshape(n, 16, 16) % 4000) + 10
    vol = np.repeat(np.repeat(vol, 16, axis=1), 16, axis=2)  # 256 x 256, the model's grid
    for i, payload in enumerate(build_series(vol)):
        (out / f"{i:04d}.dcm").write_bytes(payload)
    return out


def test_a_cluster_node_killed_mid_stream_loses_no_result(
    tmp_path: Path, mosquitto_factory: Callable[[str], Mosquitto]
) -> None:
    if not rabbitmq_installed():
        pytest.fail("rabbitmq-server is not installed: `make test-cluster` installs it")
    cluster = Cluster(tmp_path / "rabbitmq")
    agent = receiver = None
    try:
        cluster.start()
        first = cluster.nodes[0]
        assert len(cluster.running_nodes(first)) == 3
        edge = mosquitto_factory("edge")
        config = _config(tmp_path, edge, cluster)
        scans = _scans(tmp_path, N)
        receiver = spawn(["receive", "--config", str(config), "--out", str(tmp_path / "out"),
                          "--count", str(N), "--timeout", "400"], tmp_path / "receiver.log")
        receiver.wait_for('"mqtt_connected"')
        time.sleep(1.0)  # the SUBSCRIBE creates the session's queue
        queues = cluster.queues(first)
        assert "mqtt-subscription-" in queues and "quorum" in queues, queues
        agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
        agent.wait_for('"mqtt_connected"', 2)
        assert cli("send", "--config", str(config), str(scans)).returncode == 0
        receiver.wait_for('"result_received"', N // 4, timeout=300)
        cluster.kill(first)  # SIGKILL: the node both clients are connected to
        killed_at = len(receiver.events("result_received"))
        assert receiver.proc.wait(400) == 0, receiver.text()[-3000:]
        done = receiver.events("receive_done")[-1]
        delivered = len({e["message_id"] for e in receiver.events("result_received")})
        assert delivered == N, f"{N - delivered} results lost"
        assert done["filed"] == N and done["rejected"] == 0
        failovers = agent.events("mqtt_failover")
        assert any(e["broker"] == "cloud" for e in failovers), agent.text()[-3000:]
        assert receiver.events("mqtt_failover")
        later = [e for e in agent.events("mqtt_connected") if e["broker"] == "cloud"][1:]
        assert later and all(e["url"] != first.url for e in later)
        assert agent.terminate() == 0
        figures = {"sent": N, "delivered_unique": delivered, "lost": N - delivered,
                   "duplicates_dropped": done["duplicates"], "received_before_kill": killed_at,
                   "agent_failovers": len(failovers),
                   "receiver_failovers": len(receiver.events("mqtt_failover"))}
        print("cluster failover figures:", json.dumps(figures))
    finally:
        for p in (agent, receiver):
            if p is not None:
                p.kill()
        cluster.stop()
