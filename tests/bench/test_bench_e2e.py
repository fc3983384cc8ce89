"""The end-to-end benchmark's parts that run without brokers: its scans, the naive script's
per-slice job, and the summaries (bench/; the broker rounds are `make bench`)."""

from __future__ import annotations

import io
import os

import numpy as np
import pydicom

from agent.model.bundle import load_bundle
from agent.ops.scaffold import default_bundle
from bench import procs, report, slices
from bench.naive_script import NaiveTranslator
from bench.rounds import Flood


def test_scans_come_at_both_matrices_over_one_field_of_view() -> None:
    vols = slices.volumes()
    assert [v.matrix for v in vols] == [256, 320]
    for v in vols:
        assert v.t1.dtype == np.uint16
        assert abs(v.matrix * v.spacing_mm[1] - 256.0) < 1e-6  # same 256 mm field of view
    payloads = slices.payloads(vols, 30)
    assert len(payloads) == 30
    headers = [pydicom.dcmread(io.BytesIO(p), stop_before_pixels=True) for p in payloads]
    assert {h.Rows for h in headers} == {256, 320}
    assert len({h.SOPInstanceUID for h in headers}) == 30


def test_naive_script_returns_the_raw_array_on_the_source_grid() -> None:
    bundle_dir = default_bundle()
    assert bundle_dir is not None
    vols = slices.volumes()
    naive = NaiveTranslator(bundle_dir)
    for vol, payload in ((v, slices.payloads([v], 1)[0]) for v in vols):
        out = np.frombuffer(naive.translate(payload), dtype=np.uint16)
        assert out.size == vol.matrix * vol.matrix
        assert out.max() > 100  # the model ran on the image, not on zeros
    assert len(slices.model_inputs(vols[:1], load_bundle(bundle_dir))) == len(vols[0].t1)


def test_ratios_are_taken_round_by_round() -> None:
    a, b = report.Contestant(), report.Contestant()
    a.rounds = [Flood(10, 1.0), Flood(10, 2.0), Flood(10, 1.0)]
    b.rounds = [Flood(10, 2.0), Flood(10, 2.0), Flood(10, 4.0)]
    a.cpu_s = [0.5, 0.5, 0.5]
    assert report.pairwise_ratio(a, b) == {"median": 2.0, "min": 1.0, "max": 4.0}
    assert a.cpu_ms_per_slice() == 50.0
    assert a.cores_busy() == 1.5 / 4.0
    stages = report.stage_medians([{"stages_ms": {"infer": 3.0, "seal": 1.0}, "total_ms": 5},
                                   {"stages_ms": {"infer": 5.0, "seal": 1.0}, "total_ms": 7}])
    assert stages == {"infer": 4.0, "seal": 1.0, "sum_of_stages": 5.0, "total_ms": 6.0}
    own = report.stage_medians([{"stages_ms": {"seal": 1.0}, "cpu_ms": {"decode": 2.0,
                                                                      "seal": 1.0}},
                                {"stages_ms": {"seal": 1.0}, "cpu_ms": {"decode": 1.0,
                                                                      "seal": 1.0}}])
    assert own["own_cpu_ms"] == 2.5


def test_the_cpu_bound_ceiling_is_the_ratio_of_machine_cpu_per_slice() -> None:
    agent, raw = report.Contestant(), report.Contestant()
    agent.rounds = raw.rounds = [Flood(100, 2.0), Flood(100, 2.0)]
    agent.machine_cpu_s = [3.6, 3.8]  # 37 ms of the machine's CPU per slice
    raw.machine_cpu_s = [2.3, 2.3]  # 23 ms
    assert report.cpu_bound_ratio(agent, raw) == 23.0 / 37.0
    assert agent.summary()["machine_cores_busy"] == 7.4 / 4.0
    assert report.cpu_bound_ratio(agent, report.Contestant()) is None


def test_machine_and_process_tree_cpu_are_read_from_proc() -> None:
    before_machine, before_tree = procs.machine_busy_s(), procs.tree_cpu_s(os.getpid())
    end = procs.cpu_s(os.getpid()) + 0.2
    while procs.cpu_s(os.getpid()) < end:  # burn 0.2 s of CPU in this process
        pass
    assert procs.tree_cpu_s(os.getpid()) - before_tree >= 0.19
    # /proc/stat's per-CPU ticks are sampled apart from the process's own, and a tick the
    # hypervisor stole counts as steal, not as busy: a fresh clone's run read 0.18 s here.
    assert procs.machine_busy_s() - before_machine >= 0.1
