"""The retained status document (``iomt/{site}/{device}/status``; docs/protocol.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.daemon.reload import now_iso

if TYPE_CHECKING:
    from agent.daemon.service import Agent


def agent_status(agent: Agent, state: str = "online") -> dict[str, Any]:
    """What the agent publishes, retained, on its status topic."""
    inbox, outbox, counts = agent.store.snapshot()
    series = agent.stages.series
    return {
        "v": 1,
        "state": state,
        "site": agent.topics.site,
        "device_id": agent.topics.device,
        "agent_version": __version__,
        "model": agent.model.summary(),
        **({"model_refused": agent.model_refused} if agent.model_refused else {}),
        **({"update": agent.fleet.status()} if agent.fleet else {}),
        **({"series": {"open": series.counts[0], "waiting": series.counts[1],
                       "held": agent.store.held_count()}} if series else {}),
        "deid": agent.deid.summary() if agent.deid else {"enabled": False},
        "domain": agent.stages.translator.domain.summary(),
        "seal": agent.sealer.summary(),
        "inbox_depth": inbox,
        "outbox_depth": outbox,
        "results_unclaimed": agent.outbox.unclaimed,
        "results_awaiting_receipt": agent.outbox.awaiting_receipt,
        "backpressure": agent.pressure.summary(),
        "brokers": {c.name: {"connected": c.connected,
                             **({} if c.connected or not c.last_error
                                else {"error": c.last_error})}
                    for c in (agent.edge, agent.cloud)},
        "processed": counts.get("processed", 0),
        "failed": counts.get("failed", 0),
        "last_latency_ms": agent.stages.last_latency_ms,
        "updated": now_iso(),
    }
