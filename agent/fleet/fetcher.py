"""python-tuf's network layer, over retained MQTT messages (docs/protocol.md, "Fleet updates").

``ngclient`` asks for URLs; ``fleet:/metadata/{version}.{role}.json`` and
``fleet:/metadata/timestamp.json`` map onto the group's metadata topics, and
``fleet:/targets/{sha256}.{name}`` onto a target's manifest and chunks. ``RetainedCache``
keeps the group's metadata messages as they arrive (a node subscribes to them for good) and
hands a target's chunks to the one download that asked for them.

The fetcher never takes more bytes than ngclient asked for (the signed length of a target,
ngclient's cap for a metadata file): a longer metadata message, a manifest that announces
more, or chunks that add up to more are refused before they are stored. A target download
has a deadline and a stall limit. Whether the bytes are the right ones is TUF's check (the
signed length and sha256 of the whole target), done by ngclient on what this returns.
"""

from __future__ import annotations

import json
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

from agent.fleet.verdict import UpdateRejected
from agent.transport.mqtt import Connection, Message
from agent.transport.topics import METADATA_ROLES, FleetTopics, Topic, TopicError

METADATA_URL = "fleet:/metadata/"
TARGETS_URL = "fleet:/targets/"
MAX_CHUNK_BYTES = 1024 * 1024  # a manifest announcing larger chunks is refused
MANIFEST_MAX_BYTES = 4096
# What the cache keeps of the group's metadata topics: ngclient's largest cap (targets, 5 MB)
# per message, and a bounded number of topics, so whoever may publish there cannot fill
# the node's memory.
METADATA_MAX_BYTES = 5_000_000
METADATA_MAX_TOPICS = 1024


def metadata_topic(topics: FleetTopics, url: str) -> Topic:
    """The topic behind one of ngclient's metadata URLs."""
    name = url.removeprefix(METADATA_URL)
    if name == url or not name.endswith(".json"):
        raise TopicError(f"not a fleet metadata URL: {url!r}")
    parts = name.removesuffix(".json").split(".")
    if len(parts) == 1 and parts[0] == "timestamp":
        return topics.metadata("timestamp")
    if len(parts) == 2 and parts[0].isdigit() and parts[1] in METADATA_ROLES:
        return topics.metadata(parts[1], int(parts[0]))
    raise TopicError(f"not a fleet metadata URL: {url!r}")


def target_address(url: str) -> tuple[str, str]:
    """(sha256, name) of one of ngclient's hash-prefixed target URLs."""
    name = url.removeprefix(TARGETS_URL)
    digest, dot, base = name.partition(".")
    if name == url or not dot or len(digest) != 64 or "/" in name:
        raise TopicError(f"not a fleet target URL: {url!r}")
    return digest, base


class RetainedCache:
    """The group's retained metadata (topic -> payload; an empty retained message deletes),
    and the live streams of target downloads. ``on_message`` runs on paho's thread."""

    def __init__(self, topics: FleetTopics, on_timestamp: Callable[[], None]) -> None:
        self.topics = topics
        self._on_timestamp = on_timestamp
        self._metadata: dict[str, bytes] = {}
        self._streams: dict[Topic, queue.Queue[Message]] = {}
        self._changed = threading.Condition()

    def on_message(self, msg: Message) -> None:
        if self.topics.metadata_filter.matches(msg.topic):
            with self._changed:
                if len(msg.payload) > METADATA_MAX_BYTES or (
                        msg.topic not in self._metadata
                        and len(self._metadata) >= METADATA_MAX_TOPICS):
                    return  # dropped; a download of it would find it absent
                if msg.payload:
                    self._metadata[msg.topic] = msg.payload
                else:
                    self._metadata.pop(msg.topic, None)
                self._changed.notify_all()
            if msg.topic == str(self.topics.metadata("timestamp")) and msg.payload:
                self._on_timestamp()
            return
        for flt, stream in list(self._streams.items()):
            if flt.matches(msg.topic):
                stream.put(msg)

    def get(self, topic: Topic, wait_s: float = 0.0) -> bytes | None:
        """The retained payload of ``topic``, waiting up to ``wait_s`` for it to arrive."""
        deadline = time.monotonic() + wait_s
        with self._changed:
            while (found := self._metadata.get(str(topic))) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return found

    def open_stream(self, flt: Topic) -> queue.Queue[Message]:
        stream: queue.Queue[Message] = queue.Queue()
        self._streams[flt] = stream
        return stream

    def close_stream(self, flt: Topic) -> None:
        self._streams.pop(flt, None)


def _too_long(what: str, got: int, limit: int) -> tuf_errors.DownloadLengthMismatchError:
    return tuf_errors.DownloadLengthMismatchError(
        f"{what}: {got} bytes offered, the signed limit is {limit}")


class MqttFetcher(FetcherInterface):
    """ngclient's fetcher for one group. ``versioned_wait_s``: how long a versioned
    snapshot or targets message that a newer timestamp names may take to arrive (retained
    messages come in the broker's order, not the publisher's); ``deadline_s`` and
    ``stall_s`` bound a target download (a rate floor adds time per byte)."""

    def __init__(self, conn: Connection, cache: RetainedCache, *, deadline_s: float = 60.0,
                 stall_s: float = 20.0, min_rate_bps: int = 64 * 1024,
                 versioned_wait_s: float = 3.0) -> None:
        self._conn = conn
        self._cache = cache
        self._topics = cache.topics
        self._deadline_s = deadline_s
        self._stall_s = stall_s
        self._min_rate = min_rate_bps
        self._versioned_wait_s = versioned_wait_s
        self.bytes_received = 0  # on the wire for targets, for the status and benchmarks

    # -- metadata ------------------------------------------------------------------------
    def _fetch(self, url: str) -> Iterator[bytes]:
        topic = metadata_topic(self._topics, url)
        # A root that is not there is the end of the root chain (ngclient probes N+1): no
        # waiting for it. Versioned snapshot/targets are named by a newer message: wait.
        is_root = "/metadata/root/" in str(topic)
        data = self._cache.get(topic, 0.0 if is_root else self._versioned_wait_s)
        if data is None:
            raise tuf_errors.DownloadHTTPError(f"no retained message on {topic}", 404)
        yield data

    def download_bytes(self, url: str, max_length: int) -> bytes:
        data = b"".join(self.fetch(url))
        if len(data) > max_length:
            raise _too_long(url, len(data), max_length)
        return data

    # -- targets -------------------------------------------------------------------------
    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        digest, name = target_address(url)
        with tempfile.TemporaryFile() as out:
            for chunk in self._chunks(digest, name, max_length):
                out.write(chunk)
            out.seek(0)
            yield out

    def _chunks(self, digest: str, name: str, max_length: int) -> Iterator[bytes]:
        """The target's chunks in order, never more than ``max_length`` bytes in all (held
        out-of-order chunks included)."""
        flt = self._topics.target_filter(digest, name)
        manifest_topic = str(self._topics.target(digest, name))
        stream = self._cache.open_stream(flt)
        self._conn.subscribe(flt)
        try:
            deadline = time.monotonic() + self._deadline_s + max_length / self._min_rate
            plan: tuple[int, int, int] | None = None  # length, chunk size, chunk count
            held: dict[int, bytes] = {}
            held_bytes = done = index = 0
            while plan is None or index < plan[2]:
                now = time.monotonic()
                if now >= deadline:
                    raise tuf_errors.SlowRetrievalError(
                        f"{name}: {done} of {plan[0] if plan else '?'} bytes before the "
                        "deadline")
                try:
                    msg = stream.get(timeout=min(deadline - now, self._stall_s))
                except queue.Empty:
                    raise tuf_errors.SlowRetrievalError(
                        f"{name}: no data for {self._stall_s:.0f} s after {done} bytes"
                    ) from None
                if msg.topic == manifest_topic:
                    plan = plan or _read_manifest(msg.payload, name, max_length)
                else:
                    position = msg.topic.rpartition("/")[2]
                    if not position.isdigit() or int(position) < index:
                        continue  # a stray level, or a chunk already taken (redelivered)
                    if int(position) not in held:
                        held_bytes += len(msg.payload)
                        held[int(position)] = msg.payload
                    if done + held_bytes > max_length:
                        raise _too_long(name, done + held_bytes, max_length)
                while plan is not None and index in held:
                    chunk = held.pop(index)
                    held_bytes -= len(chunk)
                    expected = min(plan[1], plan[0] - index * plan[1])
                    if len(chunk) != expected:
                        raise UpdateRejected(
                            "target_too_long" if len(chunk) > expected else "target_mismatch",
                            f"{name}: chunk {index} holds {len(chunk)} bytes, the manifest "
                            f"says {expected}")
                    done += len(chunk)
                    self.bytes_received += len(chunk)
                    index += 1
                    yield chunk
        finally:
            self._conn.unsubscribe(flt)
            self._cache.close_stream(flt)


def _read_manifest(payload: bytes, name: str, max_length: int) -> tuple[int, int, int]:
    """(length, chunk size, chunks) of a target manifest, checked against the signed
    length before one chunk is taken."""
    if len(payload) > MANIFEST_MAX_BYTES:
        raise _too_long(f"{name} manifest", len(payload), MANIFEST_MAX_BYTES)
    try:
        doc = json.loads(payload)
        length, size, count = int(doc["length"]), int(doc["chunk_size"]), int(doc["chunks"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UpdateRejected("target_mismatch",
                             f"{name}: the target manifest is not valid JSON: {exc}") from None
    if length > max_length:
        raise _too_long(f"{name} (manifest)", length, max_length)
    if not 0 < size <= MAX_CHUNK_BYTES or length < 0 or count != math.ceil(length / size):
        raise UpdateRejected("target_mismatch", f"{name}: inconsistent manifest: length "
                             f"{length}, chunk size {size}, {count} chunks")
    return length, size, count
