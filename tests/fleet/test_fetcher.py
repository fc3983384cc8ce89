"""MqttFetcher without a broker: a stub connection plays the retained messages a broker
would send on SUBSCRIBE, in any order, so the caps and deadlines are exact."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable

import pytest
from tuf.api import exceptions as tuf_errors

from agent.fleet.fetcher import MqttFetcher, RetainedCache
from agent.fleet.verdict import UpdateRejected, from_tuf
from agent.transport.mqtt import Message
from agent.transport.topics import FleetTopics, Topic

T = FleetTopics("ward-a")
DATA = bytes(range(256)) * 40  # 10240 bytes
SHA = hashlib.sha256(DATA).hexdigest()
URL = f"fleet:/targets/{SHA}.bundle.tar"


class StubConnection:
    """Calls ``on_subscribe`` with the filter; records unsubscribes."""

    def __init__(self, cache: RetainedCache, play: Callable[[Callable[[str, bytes], None]], None]):
        self.cache = cache
        self.play = play
        self.unsubscribed: list[Topic] = []

    def subscribe(self, topic: Topic) -> None:
        def send(name: str, payload: bytes) -> None:
            self.cache.on_message(Message(name, payload, 1, 0, True, False))
        threading.Thread(target=self.play, args=(send,), daemon=True).start()

    def unsubscribe(self, topic: Topic) -> None:
        self.unsubscribed.append(topic)


def _fetcher(play: Callable[[Callable[[str, bytes], None]], None], **kw: float
             ) -> tuple[MqttFetcher, StubConnection]:
    cache = RetainedCache(T, on_timestamp=lambda: None)
    conn = StubConnection(cache, play)
    return MqttFetcher(conn, cache, **kw), conn  # type: ignore[arg-type]


def _manifest(length: int = len(DATA), size: int = 1024) -> bytes:
    return json.dumps({"v": 1, "length": length, "chunk_size": size,
                       "chunks": -(-length // size)}).encode()


def _chunks(order: list[int]) -> Callable[[Callable[[str, bytes], None]], None]:
    def play(send: Callable[[str, bytes], None]) -> None:
        for i in order:
            send(str(T.target_chunk(SHA, "bundle.tar", i)), DATA[i * 1024:(i + 1) * 1024])
        send(str(T.target(SHA, "bundle.tar")), _manifest())
    return play


def test_chunks_in_any_order_come_out_in_order() -> None:
    fetcher, conn = _fetcher(_chunks([9, 3, 0, 1, 2, 8, 4, 5, 7, 6, 3]))
    with fetcher.download_file(URL, len(DATA)) as f:
        assert f.read() == DATA
    assert fetcher.bytes_received == len(DATA)
    assert conn.unsubscribed == [T.target_filter(SHA, "bundle.tar")]


def test_endless_data_stops_at_the_signed_length() -> None:
    def play(send: Callable[[str, bytes], None]) -> None:
        for i in range(10_000):  # no manifest, chunks without end
            send(str(T.target_chunk(SHA, "bundle.tar", i + 1)), b"\0" * 1024)
    fetcher, conn = _fetcher(play)
    with pytest.raises(tuf_errors.DownloadLengthMismatchError), \
            fetcher.download_file(URL, len(DATA)):
        pass
    assert fetcher.bytes_received == 0  # nothing was taken
    assert conn.unsubscribed


def test_a_stall_ends_the_download() -> None:
    fetcher, _ = _fetcher(_chunks([0, 1, 2]), stall_s=0.3)
    started = time.monotonic()
    with pytest.raises(tuf_errors.SlowRetrievalError), fetcher.download_file(URL, len(DATA)):
        pass
    assert time.monotonic() - started < 2
    assert from_tuf(tuf_errors.SlowRetrievalError("x"), "d").reason == "download_stalled"


def test_a_short_chunk_is_a_mismatch() -> None:
    def play(send: Callable[[str, bytes], None]) -> None:
        send(str(T.target(SHA, "bundle.tar")), _manifest())
        send(str(T.target_chunk(SHA, "bundle.tar", 0)), b"short")
    fetcher, _ = _fetcher(play)
    with pytest.raises(UpdateRejected) as info, fetcher.download_file(URL, len(DATA)):
        pass
    assert info.value.reason == "target_mismatch"


def test_metadata_longer_than_the_cap_is_refused_and_a_missing_root_is_a_404() -> None:
    fetcher, _ = _fetcher(lambda send: None)
    fetcher._cache.on_message(Message(str(T.metadata("timestamp")), b"x" * 100, 1, 0, True,
                                      False))
    with pytest.raises(tuf_errors.DownloadLengthMismatchError):
        fetcher.download_bytes("fleet:/metadata/timestamp.json", 99)
    assert fetcher.download_bytes("fleet:/metadata/timestamp.json", 100) == b"x" * 100
    started = time.monotonic()
    with pytest.raises(tuf_errors.DownloadHTTPError) as info:
        fetcher.download_bytes("fleet:/metadata/2.root.json", 1000)
    assert info.value.status_code == 404 and time.monotonic() - started < 0.5
    # An empty retained message deletes.
    fetcher._cache.on_message(Message(str(T.metadata("timestamp")), b"", 1, 0, True, False))
    with pytest.raises(tuf_errors.DownloadError):
        fetcher.download_bytes("fleet:/metadata/timestamp.json", 100)


def test_the_metadata_cache_is_bounded() -> None:
    from agent.fleet import fetcher as f

    cache = RetainedCache(T, on_timestamp=lambda: None)
    cache.on_message(Message(str(T.metadata("timestamp")), b"x" * (f.METADATA_MAX_BYTES + 1),
                             1, 0, True, False))
    assert cache.get(T.metadata("timestamp")) is None
    for i in range(f.METADATA_MAX_TOPICS + 10):
        cache.on_message(Message(str(T.metadata("root", i + 1)), b"{}", 1, 0, True, False))
    assert cache.get(T.metadata("root", f.METADATA_MAX_TOPICS)) == b"{}"
    assert cache.get(T.metadata("root", f.METADATA_MAX_TOPICS + 1)) is None
