"""Staged rollout: a release for a group's canary devices first, then ``promote`` (all of
the group) or ``halt`` (the group's last release for all devices, again).

A canary release names its devices in the signed target (``custom.rollout``:
``{"stage": "canary", "devices": ["site/device", ...]}``); other nodes of the group leave it
alone. ``promote`` signs the same target again with ``{"stage": "all"}`` (nodes that have it
download nothing), and refuses while a canary has not activated it or after one rejected it
or rolled it back: the rollout halts by itself there, since each canary rolls a failing
model back on its own (``agent.daemon.updates``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.config import BrokerConfig
from agent.errors import AgentError
from agent.fleet.overview import collect
from agent.fleet.publish import publish_tar, refresh
from agent.fleet.repo import Release, earlier_bundle, last_custom


class RolloutError(AgentError):
    """A staged-rollout step that cannot go on (the message says why)."""


def pick_canaries(broker: BrokerConfig, group: str, count: int) -> list[str]:
    """The first ``count`` online devices of the group ("site/device"), by name."""
    online = [f"{s.get('site')}/{s.get('device_id')}" for s in collect(broker, group)
              if s.get("state") == "online"]
    if len(online) < count:
        raise RolloutError(f"--canary {count}: only {len(online)} device(s) of group "
                           f"{group} are online")
    return online[:count]


def canary_verdict(statuses: list[dict[str, Any]], devices: list[str],
                   version: str) -> str | None:
    """None when every canary serves ``version``; else why not (one sentence)."""
    by_name = {f"{s.get('site')}/{s.get('device_id')}": s for s in statuses}
    for device in devices:
        status = by_name.get(device)
        update = (status or {}).get("update") or {}
        if status is None:
            return f"canary {device} has no status on the broker"
        if update.get("version") == version and update.get("state") in ("rejected",
                                                                         "rolled_back"):
            return (f"canary {device} {update['state'].replace('_', ' ')} {version}: "
                    f"{update.get('reason')}: {update.get('detail', '')}"[:300])
        if update.get("version") != version or update.get("state") != "active":
            return (f"canary {device} is not serving {version} yet (update "
                    f"{update.get('state')} {update.get('version')})")
    return None


def promote(repo: Path, group: str, broker: BrokerConfig, *, timeout: float = 60.0) -> Release:
    """The canary release for the whole group, once every canary serves it."""
    custom = last_custom(repo, group)
    rollout = custom.get("rollout") or {}
    if rollout.get("stage") != "canary":
        raise RolloutError(f"group {group}'s last release is not a canary release: "
                           "nothing to promote")
    problem = canary_verdict(collect(broker, group), list(rollout.get("devices", [])),
                             str(custom.get("version")))
    if problem:
        raise RolloutError(f"not promoted: {problem} (`fleet halt` gives the canaries the "
                           "group's previous bundle again)")
    return refresh(repo, group, broker, timeout=timeout,
                   custom={**custom, "rollout": {"stage": "all"}})


def halt(repo: Path, group: str, broker: BrokerConfig, *, timeout: float = 60.0) -> Release:
    """Stop a canary release: the group's last release for all devices, as a new one."""
    if ((last_custom(repo, group).get("rollout") or {}).get("stage")) != "canary":
        raise RolloutError(f"group {group} has no canary release to halt (use `fleet "
                           "rollback --to VERSION` to go back)")
    tar, custom = earlier_bundle(repo, group, None)
    return publish_tar(repo, group, broker, tar, custom, timeout=timeout)
