"""Tests for agent.topics: topic validation, the topic builders and filter matching."""

from __future__ import annotations

import pytest

from agent.transport.topics import Topic, TopicError, Topics, check_level, fleet


@pytest.mark.parametrize("value", ["a/+/b", "a/#", "+", "#", "a/b+", "a/#b", "sport/ten#"])
def test_concrete_topics_refuse_wildcards(value: str) -> None:
    with pytest.raises(TopicError, match="wildcards"):
        Topic(value)


@pytest.mark.parametrize("value", ["", "a\x00b", "x" * 65536])
def test_invalid_topic_strings(value: str) -> None:
    with pytest.raises(TopicError, match="invalid topic"):
        Topic(value)
    with pytest.raises(TopicError):
        Topic(value, filter=True)


def test_topic_length_counts_utf8_bytes() -> None:
    Topic("é" * 32767)  # 65534 bytes
    with pytest.raises(TopicError):
        Topic("é" * 32768)  # 65536 bytes, though only 32768 characters


@pytest.mark.parametrize("value", ["#", "a/#", "+", "+/+", "a/+/b/#", "$share/g/a/#", "a//b"])
def test_valid_filters(value: str) -> None:
    assert str(Topic(value, filter=True)) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a/#/b", "'#' must be the last level"),
        ("#/a", "'#' must be the last level"),
        ("a/b#", "'#' must be the last level"),
        ("a/#x", "'#' must be the last level"),
        ("a/b+", "'\\+' must occupy a whole level"),
        ("a/+b/c", "'\\+' must occupy a whole level"),
        ("++", "'\\+' must occupy a whole level"),
    ],
)
def test_invalid_filters(value: str, message: str) -> None:
    with pytest.raises(TopicError, match=message):
        Topic(value, filter=True)


def test_topic_error_is_a_value_error() -> None:
    assert issubclass(TopicError, ValueError)


def test_topics_builders() -> None:
    t = Topics("site-1", "edge-1")
    assert t.scans_filter() == Topic("iomt/site-1/scans/#", filter=True)
    assert t.scans_filter(shared=True) == Topic("$share/site-1/iomt/site-1/scans/#", filter=True)
    assert str(t.scan()) == "iomt/site-1/scans/gateway"
    assert str(t.scan("ct-2")) == "iomt/site-1/scans/ct-2"
    assert t.results == Topic("iomt/site-1/edge-1/results")
    assert t.status == Topic("iomt/site-1/edge-1/status")
    assert t.errors == Topic("iomt/site-1/edge-1/errors")
    assert t.results_filter() == Topic("iomt/site-1/+/results", filter=True)
    assert t.results_filter(all_devices=False) == Topic("iomt/site-1/edge-1/results", filter=True)
    assert not t.results.filter and t.scans_filter().filter


def test_builders_match_each_other() -> None:
    t = Topics("s", "d")
    for shared in (False, True):
        f = t.scans_filter(shared=shared)
        assert f.matches(str(t.scan("scanner-1")))
        assert not f.matches("iomt/other/scans/scanner-1")
    assert t.results_filter().matches(str(t.results))
    assert t.results_filter().matches(str(Topics("s", "d2").results))
    assert not t.results_filter().matches(str(t.status))
    assert not t.results_filter(all_devices=False).matches(str(Topics("s", "d2").results))


@pytest.mark.parametrize("source", ["a/b", "+", "#", "", "$x"])
def test_scan_source_must_be_a_level(source: str) -> None:
    with pytest.raises(TopicError, match="source"):
        Topics("s", "d").scan(source)


@pytest.mark.parametrize(
    ("site", "device", "what"),
    [("a/b", "d", "site"), ("s", "d+", "device id"), ("#", "d", "site"), ("s", "", "device id")],
)
def test_topics_validate_ids(site: str, device: str, what: str) -> None:
    with pytest.raises(TopicError, match=what):
        Topics(site, device)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a/", True),  # '+' matches an empty level
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/d", False),
        ("a/#", "a", True),  # '#' also matches the parent level
        ("a/#", "a/b/c/d", True),
        ("a/#", "b/c", False),
        ("#", "anything/at/all", True),
        ("+/+", "a/b", True),
        ("+/+", "a", False),
        ("$share/g/a/+", "a/b", True),
        ("$share/g/a/+", "$share/g/a/b", False),
        ("#", "$SYS/broker/uptime", False),  # MQTT 4.7.2: wildcards never match $ topics
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
    ],
)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    assert Topic(pattern, filter=True).matches(topic) is expected


@pytest.mark.parametrize("good", ["site-1", "A", "0", "a.b_c-d", "x" * 64])
def test_check_level_accepts(good: str) -> None:
    assert check_level(good) == good


@pytest.mark.parametrize(
    "bad", ["", "a/b", "+", "#", "a+", "$SYS", "-a", ".a", "_a", "a b", "a\x00", "é", "x" * 65]
)
def test_check_level_refuses(bad: str) -> None:
    with pytest.raises(TopicError) as ei:
        check_level(bad, "group")
    assert str(ei.value).startswith(f"group {bad!r} is not a valid topic level")


def test_fleet_topics() -> None:
    assert fleet("ward-a") == Topic("iomt/fleet/ward-a")
    assert str(fleet("ward-a", "targets", "chunk-0001")) == "iomt/fleet/ward-a/targets/chunk-0001"
    with pytest.raises(TopicError, match="group"):
        fleet("a/b")
    with pytest.raises(TopicError, match="topic level"):
        fleet("g", "meta", "#")
