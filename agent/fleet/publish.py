"""``iomt-agent fleet publish``: pack a bundle, sign a release, put it on the cloud broker.

The messages of a release (``release_messages``), all retained QoS 1, in this order: every
root version, the target's manifest and chunks, the versioned targets and snapshot, and the
timestamp last (a node starts a refresh when the timestamp changes). Then the previous
release's versioned metadata and chunks are cleared (an empty retained message), unless the
new release reuses them.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.config import BrokerConfig
from agent.errors import AgentError
from agent.fleet.archive import pack_bundle
from agent.fleet.repo import (
    TARGET_NAME,
    Release,
    earlier_bundle,
    previous_release,
    record_release,
    resign_release,
    sign_release,
)
from agent.model.bundle import load_bundle
from agent.transport.mqtt import Connection, Verdict
from agent.transport.topics import FleetTopics, Topic

CHUNK_BYTES = 256 * 1024  # well inside the default message caps of the common brokers

Messages = list[tuple[Topic, bytes]]


class PublishError(AgentError):
    """The broker could not be reached or refused a message."""


def release_messages(topics: FleetTopics, release: Release,
                     chunk_bytes: int = CHUNK_BYTES) -> Messages:
    """Every retained message of ``release``, in publishing order."""
    count = math.ceil(len(release.target) / chunk_bytes)
    manifest = json.dumps({"v": 1, "length": len(release.target), "chunk_size": chunk_bytes,
                           "chunks": count, "sha256": release.sha256},
                          separators=(",", ":")).encode()
    out: Messages = [(topics.metadata("root", v), data) for v, data in sorted(
        release.roots.items())]
    out.append((topics.target(release.sha256, TARGET_NAME), manifest))
    out += [(topics.target_chunk(release.sha256, TARGET_NAME, i),
             release.target[i * chunk_bytes:(i + 1) * chunk_bytes]) for i in range(count)]
    out += [(topics.metadata("targets", release.version), release.targets),
            (topics.metadata("snapshot", release.version), release.snapshot),
            (topics.metadata("timestamp"), release.timestamp)]
    return out


def stale_messages(topics: FleetTopics, previous: dict[str, Any] | None,
                   release: Release) -> Messages:
    """Empty retained messages that clear what the previous release left."""
    if previous is None:
        return []
    old = int(previous["version"])
    out: Messages = [(topics.metadata("targets", old), b""),
                     (topics.metadata("snapshot", old), b"")]
    if previous["sha256"] != release.sha256:
        out.append((topics.target(previous["sha256"], TARGET_NAME), b""))
        out += [(topics.target_chunk(previous["sha256"], TARGET_NAME, i), b"")
                for i in range(int(previous["chunks"]))]
    return out


def unreachable(broker: BrokerConfig, last_error: str | None) -> str:
    """The sentence for a broker that never answered (``last_error``: the connection's)."""
    why = (last_error or "").removeprefix(f"cannot reach {broker.url}: ") or "no answer"
    return f"cannot reach the broker {broker.url}: {why}"


@contextmanager
def _undone_unless_sent(keep: Path) -> Iterator[None]:
    """A release signed but not on the broker (it is down, it refused) leaves the group's
    files as they were: the repository keeps describing what the nodes can fetch, so a
    later ``refresh`` or ``promote`` does not sign a target the broker never got. (The
    version counter stays advanced: TUF versions only have to grow.)"""
    existed = {f for f in keep.rglob("*") if f.is_file()}  # none before a first release
    # History tars are only ever added, never rewritten: deleting new ones is enough.
    before = {f: f.read_bytes() for f in existed
              if not (f.parent.name == "history" and f.suffix == ".tar")}
    try:
        yield
    except BaseException:
        for f in (f for f in keep.rglob("*") if f.is_file() and f not in existed):
            f.unlink()
        for f, data in before.items():
            f.write_bytes(data)
        raise


def send_retained(broker: BrokerConfig, messages: Messages, *, timeout: float = 60.0,
                  client_id: str | None = None) -> None:
    """Publish ``messages`` retained at QoS 1 and wait until the broker took each."""
    conn = Connection(broker, client_id or f"iomt-fleet-publisher-{time.monotonic_ns()}",
                      name="cloud")
    conn.start()
    try:
        if not conn.wait_connected(min(timeout, 15.0)):
            raise PublishError(unreachable(broker, conn.last_error))
        done = threading.Semaphore(0)
        refused: list[str] = []

        def on_done(verdict: Verdict) -> None:
            if not verdict.ok:
                refused.append(verdict.reason)
            done.release()

        for topic, payload in messages:
            conn.publish(topic, payload, qos=1, retain=True, on_done=on_done)
        deadline = time.monotonic() + timeout
        for _ in messages:
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise PublishError(f"the broker {broker.url} did not acknowledge every "
                                   f"message within {timeout:.0f} s")
        if refused:
            raise PublishError(f"the broker refused {len(refused)} message(s): {refused[0]} "
                               "(check its ACL and message_size_limit)")
    finally:
        conn.stop()


def publish(repo: Path, bundle_dir: Path, group: str, broker: BrokerConfig, *,
            chunk_bytes: int = CHUNK_BYTES, timeout: float = 60.0,
            canaries: list[str] | None = None) -> Release:
    """Check the bundle (strict schema, every sha256), pack it, sign a release, publish
    it retained under ``iomt/fleet/{group}/``. ``canaries`` ("site/device"): only those
    devices take it until ``fleet promote``."""
    bundle = load_bundle(bundle_dir)
    custom: dict[str, Any] = {"bundle": bundle.name, "version": bundle.version}
    if canaries:
        custom["rollout"] = {"stage": "canary", "devices": sorted(canaries)}
    return publish_tar(repo, group, broker, pack_bundle(bundle_dir), custom,
                       chunk_bytes=chunk_bytes, timeout=timeout)


def rollback(repo: Path, group: str, version: str, broker: BrokerConfig, *,
             chunk_bytes: int = CHUNK_BYTES, timeout: float = 60.0) -> Release:
    """Give ``group`` an earlier bundle again, as a new release: a forward step in TUF's
    versions (nodes never accept older metadata), back in what serves."""
    tar, custom = earlier_bundle(repo, group, version)
    return publish_tar(repo, group, broker, tar, custom, chunk_bytes=chunk_bytes,
                       timeout=timeout)


def publish_tar(repo: Path, group: str, broker: BrokerConfig, tar: bytes,
                custom: dict[str, Any], *, chunk_bytes: int = CHUNK_BYTES,
                timeout: float = 60.0) -> Release:
    """Sign ``tar`` as the group's new release and publish all of it."""
    topics = FleetTopics(group)
    previous = previous_release(repo, group)
    with _undone_unless_sent(repo / "groups" / group):
        release = sign_release(repo, group, tar, custom)
        messages = release_messages(topics, release, chunk_bytes)
        send_retained(broker, messages + stale_messages(topics, previous, release),
                      timeout=timeout)
    record_release(repo, release, math.ceil(len(release.target) / chunk_bytes))
    return release


def refresh(repo: Path, group: str, broker: BrokerConfig, *, timeout: float = 60.0,
            custom: dict[str, Any] | None = None) -> Release:
    """Sign the group's last release again (new versions, fresh expiry) and publish its
    metadata; the chunks on the broker stay as they are (same target)."""
    topics = FleetTopics(group)
    previous = previous_release(repo, group)
    with _undone_unless_sent(repo / "groups" / group):
        release = resign_release(repo, group, custom=custom)
        metadata = [(t, p) for t, p in release_messages(topics, release)
                    if "/metadata/" in str(t)]
        send_retained(broker, metadata + stale_messages(topics, previous, release),
                      timeout=timeout)
    chunks = int(previous["chunks"]) if previous else 0
    record_release(repo, release, chunks)
    return release
