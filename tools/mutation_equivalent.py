"""Surviving mutants that are equivalent (no test can tell them from the original), each with
the reason, for ``tools/mutation_score.py``.

A mutant is matched by its module, its function (the last part of mutmut's mangled name)
and text of its first changed line before (``orig``) and after (``mutant``) the mutation,
so an entry outlives mutmut's renumbering when the code around it changes. A survivor
that no entry matches is a gap in the tests, not an equivalent: it counts against the score.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Equivalent:
    module: str
    function: str
    orig: str  # text of the original line
    mutant: str  # text of the mutated line ("" for any mutation of that line)
    reason: str


EQUIVALENTS: tuple[Equivalent, ...] = (
    # -- agent/cloud/receiver.py ---------------------------------------------------------
    Equivalent("agent.cloud.receiver", "_uid_path_part", 'str(value or "")', "XXXX",
               "an absent UID is refused either way: neither '' nor 'XXXX' is digits and "
               "dots"),
    Equivalent("agent.cloud.receiver", "file", "stop_before_pixels=True",
               "stop_before_pixels=None",
               "reading the pixel data too gives the same UIDs, only later"),
    Equivalent("agent.cloud.receiver", "file", "stop_before_pixels=True",
               "stop_before_pixels=False",
               "reading the pixel data too gives the same UIDs, only later"),
    Equivalent("agent.cloud.receiver", "file", "stop_before_pixels=True",
               "plaintext), )",
               "reading the pixel data too gives the same UIDs, only later"),
    Equivalent("agent.cloud.receiver", "quarantine", '.with_suffix(".tmp")', ".TMP",
               "the temporary file's name: it is renamed onto the final name either way"),
    Equivalent("agent.cloud.receiver", "_durable_write", '.with_suffix(".tmp")', ".TMP",
               "the temporary file's name: it is renamed onto the final name either way"),
    # -- agent/daemon/store.py -----------------------------------------------------------
    Equivalent("agent.daemon.store", "drop_oldest", "freed = added = 0", "freed = added = 1",
               "both counters start one higher: the loop and the final sum use only their "
               "difference"),
    Equivalent("agent.daemon.store", "delivered", "if _disk_full(exc):", "",
               "a DELETE cannot be made to hit SQLITE_FULL in a unit test (max_page_count "
               "stops growth, not deletes); a full tmpfs runs this path in "
               "tests/integration/test_full_stores.py (root), outside the mutation selection"),
    Equivalent("agent.daemon.store", "delivered", 'raise DiskFull("the state directory', "",
               "as above: only a really full filesystem reaches this line"),
    # -- agent/daemon/outbox.py ----------------------------------------------------------
    Equivalent("agent.daemon.outbox", "__init__", 'self.drain_deadline = float("inf")',
               'float("INF")', 'float() reads "INF" as infinity too'),
    Equivalent("agent.daemon.outbox", "_publish", "if room > 0:", "if room >= 0:",
               "with no room the query asks for LIMIT 0 and gets no rows"),
    Equivalent("agent.daemon.outbox", "_publish",
               "if row.id in self._inflight or row.id in self._held:", "",
               "the new-rows query starts after the last id sent and ids are AUTOINCREMENT: a "
               "row in flight or held was sent before, so it never comes back there"),
    Equivalent("agent.daemon.outbox", "_publish", "continue", "break",
               "as above: the skip never happens, so stopping instead changes nothing"),
    Equivalent("agent.daemon.outbox", "_send", "qos=1, on_done=", "",
               "Connection.publish's default QoS is 1"),
    Equivalent("agent.daemon.outbox", "_verdict", "verdict = Verdict(Delivery.REFUSED", "",
               "_hold treats every verdict that is not UNCLAIMED as a refusal"),
    Equivalent("agent.daemon.outbox", "_delivered", "self._claimed_topics.add(row.topic)", "",
               "every unclaimed answer takes the topic out of the set again, and a second "
               "release only re-dates rows that are already due or in flight"),
    Equivalent("agent.daemon.outbox", "_awaiting", "self._receipted_in_flight.discard(row.id)",
               "", "the row is gone from the store and AUTOINCREMENT never reuses its id: the "
               "stale entry is never matched (one set entry per receipt that beat its PUBACK)"),
    Equivalent("agent.daemon.outbox", "_awaiting", "self._held[row.id] = _Held(row.topic", "",
               "an awaiting row's topic is read only by the unclaimed release, which skips "
               "awaiting rows"),
    Equivalent("agent.daemon.outbox", "_awaiting", "False, True)", "None, True)",
               "None is as false as False"),
    Equivalent("agent.daemon.outbox", "_forget", "self._held.pop(row_id, None)", "",
               "raises only when on_receipt drops the row between _publish's two locks, a race "
               "no test can time"),
    # -- agent/dicom/series.py -----------------------------------------------------------
    Equivalent("agent.dicom.series", "observed_spacing", "strict=False)]", "",
               "the two lists differ in length by one by construction; None and the default "
               "are False too"),
    Equivalent("agent.dicom.series", "find", "if m.position_mm > position + spacing:", "",
               "an early stop of the search: gaps between slices are at least three quarters "
               "of the spacing, so no slice within a quarter of the target can follow one "
               "that is past it"),
    Equivalent("agent.dicom.series", "_stack", "for d in range(1, k + 1):", "range(k + 1)",
               "d = 0 finds the centre itself (no other slice lies within a quarter spacing "
               "of it) and writes the same id"),
    Equivalent("agent.dicom.series", "releasable", "m.position_mm + d * spacing",
               "m.position_mm - d * spacing", "d runs over -k..k: the same slots"),
    Equivalent("agent.dicom.series", "slice_info", 'rounded = ",".join', "",
               "the group key is hashed: the same slices get the same key either way"),
    Equivalent("agent.dicom.series", "slice_info", 'ds.get("AcquisitionNumber", "") or ""', "",
               "an absent or empty AcquisitionNumber is one value either way inside the "
               "hashed key"),
    # -- agent/model/guard.py ------------------------------------------------------------
    Equivalent("agent.model.guard", "render", "{self.ssim or 0:>7.4f}", "",
               "the pooled row is printed only when the golden set ran, and then ssim is set"),
    Equivalent("agent.model.guard", "report_json", "allow_nan=False", "",
               "as_dict already writes NaN as null and infinity as \"inf\""),
    Equivalent("agent.model.guard", "load_golden", "allow_pickle=False", "allow_pickle=None",
               "numpy's default is False, and None is as false"),
    Equivalent("agent.model.guard", "load_golden", "allow_pickle=False", "golden.path, )",
               "numpy's default is False"),
    Equivalent("agent.model.guard", "load_golden", ".astype(np.float32, copy=False)", "",
               "a copy or not: the same values (the arrays are not written to)"),
    Equivalent("agent.model.guard", "run_guard", "ref64 = ref.astype(np.float64)",
               "astype(None)", "astype(None) is float64"),
    Equivalent("agent.model.guard", "run_guard", "(time.perf_counter() - started) * 1000",
               "* 1001", "0.1 % of a latency that is reported, never gated"),
    Equivalent("agent.model.guard", "verify_bundle", "intra_op_threads: int = 0",
               "intra_op_threads: int = 1", "the thread count of `model verify`: it changes "
               "the speed, not the figures"),
    Equivalent("agent.model.guard", "verify_bundle", "RunnerOptions(intra_op_threads=",
               "RunnerOptions(input_name=", "the same: without it the runner's default, 0 "
               "(every core), is what the argument's default gives"),
)


def explain(module: str, function: str, orig: str, mutant: str) -> str | None:
    """The reason a survivor is equivalent, or None when no entry matches it."""
    for e in EQUIVALENTS:
        if (e.module == module and e.function == function and e.orig in orig
                and (not e.mutant or e.mutant in mutant)):
            return e.reason
    return None
