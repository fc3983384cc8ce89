"""A 2.5D model and a shared subscription do not go together (docs/reliability.md,
"Scale-out on one site"): refused at start, and refused on reload while the 2D model
serves on."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon.service import Agent
from agent.errors import AgentError
from agent.ops.scaffold import InitOptions, write_directory
from tests.bundles import make_context_bundle


def _node(tmp: Path, weights: list[float], shared: bool) -> Path:
    bundle = make_context_bundle(tmp / "bundle", weights)
    config = write_directory(InitOptions(
        directory=tmp / "node", edge_url="mqtt://127.0.0.1:1", cloud_url="mqtt://127.0.0.1:1",
        site="site-1", device_id="edge-1", bundle=bundle))
    text = config.read_text().replace('backend = "auto"', 'backend = "onnxruntime"')
    if shared:
        text = text.replace('state_dir = "state"\n',
                            'state_dir = "state"\nshared_subscription = true\n')
    config.write_text(text)
    return config


def test_a_2_5d_model_with_a_shared_subscription_is_refused_at_start(tmp_path: Path) -> None:
    config = _node(tmp_path, [0.25, 1.0, 0.25], shared=True)
    with pytest.raises(AgentError, match=r"2\.5D .*shared_subscription = false"):
        Agent(load_config(config), config)


def test_a_2_5d_model_without_sharing_starts(tmp_path: Path) -> None:
    config = _node(tmp_path, [0.25, 1.0, 0.25], shared=False)
    agent = Agent(load_config(config), config)
    assert agent.model.context == 1
    agent.model.close()
    agent.store.close()


def test_a_reload_to_a_2_5d_model_is_refused_while_sharing(tmp_path: Path) -> None:
    config = _node(tmp_path, [1.0], shared=True)  # 2D: may share
    agent = Agent(load_config(config), config)
    try:
        make_context_bundle(tmp_path / "bundle", [0.25, 1.0, 0.25])  # the same path, now 2.5D
        agent.reload_now()
        assert agent.model.context == 0  # the 2D model still serves
        assert agent.model_refused is not None
        assert "shared_subscription" in agent.model_refused["reason"]
    finally:
        agent.model.close()
        agent.store.close()


def test_a_reread_names_the_sections_only_a_restart_applies(tmp_path: Path) -> None:
    """SIGHUP applies [model] and [seal]; a changed [limits] or [edge] is named in the log
    instead of being silently ignored, and a file that does not parse changes nothing."""
    from structlog.testing import capture_logs

    from agent.daemon.reload import reread_config
    from agent.daemon.sealing import Sealer

    config_path = _node(tmp_path, [1.0], shared=False)
    running = load_config(config_path)
    sealer = Sealer(running.seal, "edge-1")
    serving = sealer.summary()
    with capture_logs() as logs:
        assert reread_config(config_path, running, sealer) is True  # same keys, read again
    assert [e for e in logs if e["event"] == "reload_needs_restart"] == []
    text = config_path.read_text()
    config_path.write_text(text.replace("pixel_budget = 16777216", "pixel_budget = 1000000")
                           .replace('url = "mqtt://127.0.0.1:1"', 'url = "mqtt://127.0.0.1:2"',
                                    1))
    with capture_logs() as logs:
        reread_config(config_path, running, sealer)
    [told] = [e for e in logs if e["event"] == "reload_needs_restart"]
    assert told["sections"] == ["edge", "limits"] and "systemctl restart" in told["fix"]
    config_path.write_text("[seal\n")
    with capture_logs() as logs:
        assert reread_config(config_path, running, sealer) is False
    assert logs == [] and sealer.summary() == serving
