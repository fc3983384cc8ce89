"""agent.cloud.consumer.report: how `iomt-agent receive` ends (its summary line and exit status)."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from agent.cloud.consumer import Ending, ReceiveSummary, Tally, report


def _summary(ending: Ending = Ending.COUNT, *, connected: bool = True,
             signal_name: str | None = None, **tally: int) -> ReceiveSummary:
    return ReceiveSummary(Tally(**tally), ending, connected, "iomt-s-cloud-receiver",
                          "mqtt://cloud:1883", Path("out/quarantine"),
                          takeover_evidence="the broker said: Session taken over",
                          signal_name=signal_name)


def _run(summary: ReceiveSummary, count: int | None) -> tuple[int, list[dict[str, object]]]:
    with capture_logs() as logs:
        rc = report(summary, count)
    return rc, logs


def test_all_results_filed() -> None:
    rc, logs = _run(_summary(filed=3), 3)
    assert rc == 0
    assert [e["event"] for e in logs] == ["receive_done"]
    assert "note" not in logs[0]


def test_results_filed_by_an_earlier_run_count_and_are_called_duplicates() -> None:
    rc, logs = _run(_summary(earlier=3, repeats=1), 3)
    assert rc == 0
    [done] = logs
    assert (done["filed"], done["already_filed"], done["duplicates"]) == (0, 3, 4)
    assert "all 3 results were filed by an earlier run" in str(done["note"])


def test_a_timeout_says_how_many_scans_the_agent_rejected() -> None:
    rc, logs = _run(_summary(Ending.TIMEOUT, filed=1, errors=2), 3)
    assert rc == 1
    assert [e["event"] for e in logs] == ["receive_done", "receive_timeout"]
    assert logs[1]["error_reports"] == 2
    assert "2 scans were rejected by the agent" in str(logs[1]["detail"])
    # Error reports do not stand in for results.
    assert _run(_summary(filed=3, errors=2), 3)[0] == 0


def test_a_timeout_short_of_the_count() -> None:
    rc, logs = _run(_summary(Ending.TIMEOUT, filed=1), 3)
    assert rc == 1
    assert logs[-1]["event"] == "receive_timeout" and logs[-1]["accounted"] == 1
    assert "detail" not in logs[-1]
    # Without --count a timeout is the normal end.
    assert _run(_summary(Ending.TIMEOUT, filed=1), None)[0] == 0


def test_a_broker_never_reached_is_named_not_the_results() -> None:
    rc, logs = _run(_summary(Ending.TIMEOUT, connected=False), 3)
    assert rc == 1
    assert [e["event"] for e in logs] == ["receive_done", "cloud_broker_unreachable"]
    assert logs[1]["url"] == "mqtt://cloud:1883"


def test_taken_over() -> None:
    rc, logs = _run(_summary(Ending.TAKEN_OVER, filed=2), 5)
    assert rc == 1
    assert logs[-1]["event"] == "receiver_taken_over"
    assert logs[-1]["error"] == "another receiver with this client id took over"
    assert "receiver.client_id" in str(logs[-1]["fix"])


def test_signals_end_with_one_summary_line() -> None:
    rc, logs = _run(_summary(Ending.SIGNAL, signal_name="SIGINT", filed=1, rejected=1,
                             quarantined=1), 5)
    assert rc == 130
    [line] = logs
    assert line["event"] == "receive_stopped" and line["signal"] == "SIGINT"
    assert line["quarantine"] == "out/quarantine"
    assert _run(_summary(Ending.SIGNAL, signal_name="SIGTERM"), 5)[0] == 0


def test_a_timeout_with_nothing_arrived_names_what_it_listened_to() -> None:
    """A site typo (`st-mary`): all zeros used to be the whole story."""
    summary = _summary(Ending.TIMEOUT)
    summary.results_filter = "iomt/st-mary/+/results"
    rc, logs = _run(summary, 2)
    assert rc == 1
    assert logs[-1]["detail"] == "nothing arrived on iomt/st-mary/+/results"
    assert "agent.site" in str(logs[-1]["fix"])


def test_a_timeout_with_results_quarantined_points_at_them() -> None:
    rc, logs = _run(_summary(Ending.TIMEOUT, rejected=3), 3)
    assert rc == 1
    assert "3 results could not be opened and went to the quarantine" in str(
        logs[-1]["detail"])
