"""``iomt-agent bench`` on small real bundles: the conv net of test_litert as fp32 and int8
ONNX (and TFLite where LiteRT is installed) with a golden set, and a 2.5D net (5 input
channels) without one. Few runs: nothing here asserts a timing, only that the figures are
there and consistent with each other."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.backends import RunnerOptions, open_runner
from agent.bench import BenchOptions, measure
from agent.bench.child import measure_rss
from agent.bench.macs import count_macs
from agent.bench.run import bench_bundle, plan_rows
from agent.cli import main as cli
from agent.cpu import PeakEstimate
from agent.model.bundle import load_bundle
from agent.model.choice import pick
from agent.model.guard import run_guard
from tests.backends.test_litert import (
    GRID,
    HAVE_LITERT,
    HAVE_SCHEMA,
    onnx_net,
    quantize_qdq,
    smooth_inputs,
    tflite_net,
)

FLOOR = 30.0
SHIPPED = Path(__file__).resolve().parents[2] / "models" / "t1w-to-t2w-lite"
WITH_LITERT = HAVE_LITERT and HAVE_SCHEMA


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entry(root: Path, src: Path, name: str) -> dict[str, str]:
    shutil.copy(src, root / name)
    return {"path": name, "sha256": _sha(root / name)}


def write_bundle(root: Path, files: dict[str, Path], *, golden: tuple[Any, Any] | None,
                 context: int = 0, name: str = "bench-test") -> Path:
    """A bundle with the files given: onnx_fp32 (reference), onnx_int8, tfl_fp32
    (references.litert), tfl_int8."""
    root.mkdir(parents=True)
    meta: dict[str, Any] = {
        "format": 1, "name": name, "version": "0.0.1", "task": "test", "precision": "int8",
        "input": {"modality": "MR", "shape": [GRID, GRID], "pixel_spacing_mm": [1.0, 1.0],
                  "context_slices": context},
        "output": {"modality": "MR", "scale": 1000.0},
        "backends": {}, "references": {},
    }
    names = {"onnx_fp32": "model.fp32.onnx", "onnx_int8": "model.int8.onnx",
             "tfl_fp32": "model.fp32.tflite", "tfl_int8": "model.int8.tflite"}
    for key, src in files.items():
        entry = _entry(root, src, names[key])
        if key == "onnx_fp32":
            meta["reference"] = entry
        elif key == "tfl_fp32":
            meta["references"]["litert"] = entry
        else:
            meta["backends"]["onnxruntime" if key == "onnx_int8" else "litert"] = entry
    if golden is not None:
        np.savez_compressed(root / "golden.npz", input=golden[0], reference_output=golden[1])
        meta["golden"] = {"path": "golden.npz", "sha256": _sha(root / "golden.npz"),
                          "min_psnr_db": FLOOR}
    (root / "bundle.json").write_text(json.dumps(meta))
    return root


def net_2_5d(path: Path, channels: int) -> None:
    """conv 3x3 (channels -> 4) + ReLU, conv 3x3 (4 -> 1): a 2.5D model's shape."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.2, (4, channels, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (1, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["output"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "2.5d",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, GRID, GRID])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("bench-nets")
    files = {"onnx_fp32": d / "fp32.onnx", "onnx_int8": d / "int8.onnx"}
    onnx_net(files["onnx_fp32"])
    quantize_qdq(files["onnx_fp32"], files["onnx_int8"])
    if WITH_LITERT:
        files["tfl_fp32"], files["tfl_int8"] = d / "fp32.tflite", d / "int8.tflite"
        tflite_net(files["tfl_fp32"])
        tflite_net(files["tfl_int8"], int8=True)
    x = smooth_inputs(4, seed=2)
    runner = open_runner("onnxruntime", str(files["onnx_fp32"]), RunnerOptions())
    golden = (x, runner.run(x))
    runner.close()
    return {"files": files, "golden": golden, "dir": d}


@pytest.fixture(scope="module")
def bench_json(nets: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[dict[str, Any], str]:
    """One bench run through the CLI on the test bundle and a 2.5D one without a golden
    set: (JSON, the text on stdout)."""
    d = tmp_path_factory.mktemp("bench-run")
    bundle = write_bundle(d / "bundle", nets["files"], golden=nets["golden"])
    net_2_5d(d / "2.5d.onnx", channels=3)
    other = write_bundle(d / "other", {"onnx_fp32": d / "2.5d.onnx"}, golden=None, context=1,
                         name="bench-2.5d")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["bench", "--bundle", str(bundle), "--bundle", str(other),
                    "--json", str(d / "out" / "b.json"),
                    "--runs", "6", "--throughput-runs", "3", "--threads", "1,2",
                    "--batch", "1,3", "--quiet"])
    assert code == 0
    return json.loads((d / "out" / "b.json").read_text()), out.getvalue()


def _rows(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["runtime"], r["role"]): r for r in doc["bundles"][0]["rows"]}


def test_json_has_a_row_per_runtime_and_precision(bench_json: tuple[dict[str, Any], str]
                                                  ) -> None:
    doc, _text = bench_json
    assert doc["schema"] == "iomt-agent-bench" and doc["schema_version"] == 1
    assert [b["name"] for b in doc["bundles"]] == ["bench-test", "bench-2.5d"]
    other = doc["bundles"][1]
    assert other["item_shape"] == [3, GRID, GRID]
    assert [r["status"] for r in other["rows"]] == ["ok", "skipped", "skipped", "skipped"]
    assert doc["options"] == {"runs": 6, "latency_threads": 2, "threads": [1, 2],
                              "batches": [1, 3], "throughput_runs": 3,
                              "runtimes": ["onnxruntime", "litert"]}
    b = doc["bundles"][0]
    assert b["item_shape"] == [1, GRID, GRID] and b["inputs"] == "golden set, 4 input(s)"
    rows = _rows(doc)
    assert set(rows) == {(rt, role) for rt in ("onnxruntime", "litert")
                         for role in ("reference", "served")}
    measured = [("onnxruntime", "reference"), ("onnxruntime", "served")]
    if WITH_LITERT:
        measured += [("litert", "reference"), ("litert", "served")]
    else:
        for role in ("reference", "served"):
            assert rows["litert", role]["status"] == "skipped"
            assert "pip install ai-edge-litert" in rows["litert", role]["reason"]
    for key in measured:
        row = rows[key]
        assert row["status"] == "ok" and row["reason"] is None, key
        assert row["precision"] == ("fp32" if key[1] == "reference" else "int8")
        lat = row["latency_ms"]
        assert lat["runs"] == 6 and lat["threads"] == 2 and lat["batch"] == 1
        assert 0 < lat["min"] <= lat["median"] <= lat["p95"]
        cells = {(t["threads"], t["batch"]) for t in row["throughput"]}
        assert cells == {(1, 1), (1, 3), (2, 1), (2, 3)}
        assert all(t["items_per_s"] > 0 for t in row["throughput"])
        rss = row["rss_mib"]
        assert rss["source"] == "VmHWM" and rss["batch"] == 3
        assert 0 < rss["before_load_mib"] < rss["batch1_mib"] <= rss["batch_mib"]
        assert row["size_bytes"] > 0


def test_fidelity_fp32_against_itself_and_int8_within_the_floor(
        bench_json: tuple[dict[str, Any], str]) -> None:
    rows = _rows(bench_json[0])
    ref = rows["onnxruntime", "reference"]["fidelity"]
    assert ref["reference"] == "golden.npz reference_output"
    # the golden outputs came from this very file on this machine (other thread count)
    assert ref["worst_psnr_db"] == "inf" or ref["worst_psnr_db"] > 100
    assert ref["max_abs_error"] < 1e-5
    served = rows["onnxruntime", "served"]["fidelity"]
    assert isinstance(served["worst_psnr_db"], float)
    assert FLOOR <= served["worst_psnr_db"] <= served["psnr_db"] < 200
    assert 0 < served["max_abs_error"] < 1
    if WITH_LITERT:
        tfl = rows["litert", "reference"]["fidelity"]["worst_psnr_db"]
        assert tfl == "inf" or tfl > 90  # another runtime's fp32 kernels, same weights
        assert rows["litert", "served"]["fidelity"]["worst_psnr_db"] >= FLOOR


def test_gmac_and_summary_agree_with_the_rows(bench_json: tuple[dict[str, Any], str]) -> None:
    doc, _text = bench_json
    b = doc["bundles"][0]
    # the test net: conv 1->4 and 4->1, 3x3, on 32 x 32
    assert b["gmac"] == pytest.approx(2 * 4 * 9 * GRID * GRID / 1e9)
    assert b["gmac_source"].startswith("counted from model.fp32.onnx")
    rows = _rows(doc)
    for row in rows.values():
        if row["status"] == "ok":
            assert row["gmac_per_s"] == pytest.approx(
                b["gmac"] / (row["latency_ms"]["median"] / 1000), rel=1e-3)
    summary = b["summary"]
    ratio = (rows["onnxruntime", "served"]["latency_ms"]["median"]
             / rows["onnxruntime", "reference"]["latency_ms"]["median"])
    assert summary["served_over_fp32_latency"]["onnxruntime"] == pytest.approx(ratio, rel=1e-3)
    assert summary["best_served"] in ("onnxruntime", "litert")
    auto = summary["auto"]
    assert auto["runtime"] in (["onnxruntime", "litert"] if WITH_LITERT else ["onnxruntime"])
    assert {(c["runtime"], c["precision"]) for c in auto["candidates"]} == {
        (rt, p) for rt in ("onnxruntime", "litert") for p in ("int8", "fp32")}
    # whatever this CPU makes fastest, auto serves the rule's pick of its own timings: on a
    # worker's share of the cores where it ranked there (two or more cores), else all cores
    per_worker = {(c["runtime"], c["precision"]): c["worker_ms"] for c in auto["candidates"]
                  if c["ok"] and c.get("worker_ms") is not None}
    timed = per_worker or {(c["runtime"], c["precision"]): c["median_ms"]
                           for c in auto["candidates"] if c["ok"]}
    assert (auto["runtime"], auto["precision"]) == pick(timed, "int8")
    assert auto["reason"].startswith(f"{auto['precision']} on {auto['runtime']}")
    peak = doc["machine"]["peak_gmac_per_s"]
    assert peak["estimate"] is True and "MACs per cycle" in peak["formula"]


def test_the_table_fits_a_terminal(bench_json: tuple[dict[str, Any], str]) -> None:
    _doc, text = bench_json
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].startswith("machine: ")
    assert any(line.startswith("== bench-test 0.0.1 (int8)") for line in lines)
    table = [line for line in lines if line.startswith(("onnxruntime ", "litert "))]
    assert any("model.int8.onnx" in line for line in table)
    assert any(line.startswith("int8 / fp32 latency") for line in lines)
    assert any(line.startswith('backend = "auto" would choose: ') for line in lines)
    assert any(line.startswith("  why: int8 on ") or line.startswith("  why: fp32 on ")
               for line in lines)
    assert any("an estimate" in line for line in lines)
    # the second bundle: 3 channels, no served file, so no choice; then both compared
    assert any(line.startswith("== bench-2.5d 0.0.1 (int8): 3 x 32 x 32 per item")
               for line in lines)
    assert any(line.startswith('backend = "auto" would serve nothing: ') for line in lines)
    assert any(line.startswith("best served file per bundle") for line in lines)


def test_2_5d_bundle_without_golden_set(nets: dict[str, Any], tmp_path: Path) -> None:
    """5 input channels (2 context slices each side); fidelity against the fp32 row, GMAC
    counted from the graph; int8 without a golden set: auto serves nothing, and says why."""
    fp32 = tmp_path / "fp32.onnx"
    net_2_5d(fp32, channels=5)
    root = write_bundle(tmp_path / "b", {"onnx_fp32": fp32, "onnx_int8": fp32}, golden=None,
                        context=2, name="bench-2.5d")
    bundle = load_bundle(root)
    result = bench_bundle(bundle, BenchOptions(runs=4, threads=(1,), batches=(2,),
                                               throughput_runs=3, runtimes=("onnxruntime",)),
                          PeakEstimate(10.0, 40.0, "test"))
    assert result.item_shape == (5, GRID, GRID)
    assert result.inputs == "4 random inputs (no golden set)"
    assert result.gmac == pytest.approx((5 * 4 + 4 * 1) * 9 * GRID * GRID / 1e9)
    rows = {r.role: r for r in result.rows}
    assert set(rows) == {"reference", "served"}  # --runtime onnxruntime: no litert rows
    for row in rows.values():
        assert row.latency is not None and row.fidelity is not None, row.reason
        assert row.fidelity.reference == "the onnxruntime fp32 row's outputs"
        assert row.fidelity.worst_psnr_db == math.inf  # the same file twice
        assert row.peak_gmacs == (10.0 if row.role == "reference" else 40.0)
    assert result.auto is not None and result.auto.runtime is None
    assert "no golden set" in result.auto.reason


def test_rows_that_cannot_run_keep_their_reason(nets: dict[str, Any], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Not installed, and a file the runtime cannot load: rows with a reason, the others
    measured."""
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    root = write_bundle(tmp_path / "b", {"onnx_fp32": nets["files"]["onnx_fp32"],
                                         "onnx_int8": garbage}, golden=nets["golden"])
    bundle = load_bundle(root)
    with monkeypatch.context() as m:
        m.setattr("agent.bench.run.runtime_installed", lambda rt: False)
        planned = {r.role: r.reason for r in plan_rows(bundle, ("onnxruntime",))}
    assert planned["reference"] == "onnxruntime is not installed (pip install onnxruntime)"
    result = bench_bundle(bundle, BenchOptions(runs=3, threads=(1,), batches=(1,),
                                               throughput_runs=3, runtimes=("onnxruntime",)),
                          PeakEstimate(None, None, "clock unknown"))
    rows = {r.role: r for r in result.rows}
    assert rows["served"].latency is None
    assert (rows["served"].reason or "").startswith("cannot load: onnxruntime cannot load")
    assert rows["reference"].latency is not None and rows["reference"].gmac_per_s
    assert rows["reference"].peak_gmacs is None  # no clock, no peak, no crash


def test_a_fixed_batch_model_keeps_its_batch_1_figures(tmp_path: Path) -> None:
    """An ONNX file exported with batch 1 fixed: the batch-3 cell is empty with a note,
    latency and batch-1 memory are measured."""
    fixed = tmp_path / "fixed.onnx"
    onnx_net(fixed)
    model = onnx.load(str(fixed))
    for tensor in (*model.graph.input, *model.graph.output):
        tensor.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(fixed))
    bundle = load_bundle(write_bundle(tmp_path / "b", {"onnx_fp32": fixed}, golden=None))
    result = bench_bundle(bundle, BenchOptions(runs=3, threads=(1,), batches=(1, 3),
                                               throughput_runs=3, runtimes=("onnxruntime",)),
                          PeakEstimate(None, None, "clock unknown"))
    row = next(r for r in result.rows if r.role == "reference")
    assert row.latency is not None
    assert [(t.threads, t.batch) for t in row.throughput] == [(1, 1)]
    assert len(row.notes) == 1 and row.notes[0].startswith("batch 3 fails")
    assert row.rss is not None and row.rss.batch1_mib > 0 and row.rss.batch_mib is None


def test_no_litert_fp32_file_is_a_reason_not_a_crash(nets: dict[str, Any],
                                                     tmp_path: Path) -> None:
    files = {k: v for k, v in nets["files"].items() if k != "tfl_fp32"}
    bundle = load_bundle(write_bundle(tmp_path / "b", files, golden=nets["golden"]))
    reasons = {(r.runtime, r.role): r.reason for r in plan_rows(bundle, ("litert",))}
    assert reasons["litert", "reference"] == (
        "bundle.json lists no fp32 file for litert (references.litert)")


def test_not_a_bundle_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["bench", "--bundle", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path} is not a model bundle: bundle.json not found" in err
    assert capsys.readouterr().out == ""


def test_a_bad_golden_set_exits_2_before_measuring(nets: dict[str, Any], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    x, ref = nets["golden"]
    root = write_bundle(tmp_path / "b", nets["files"], golden=(x, ref[:2]))
    assert cli(["bench", "--bundle", str(root), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "4 inputs but 2 reference outputs" in captured.err and captured.out == ""


def test_nothing_measurable_exits_1(nets: dict[str, Any], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    files = {k: v for k, v in nets["files"].items() if k.startswith("onnx")}
    root = write_bundle(tmp_path / "b", files, golden=nets["golden"])
    assert cli(["bench", "--bundle", str(root), "--runtime", "litert", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "bundle.json lists no int8 file for litert (backends.litert)" in captured.out
    assert 'backend = "auto" would serve nothing' in captured.out
    assert "no configuration could be measured" in captured.err


def test_flags_reach_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[list[Path], Path | None, BenchOptions]] = []
    monkeypatch.setattr("agent.bench.main",
                        lambda paths, out, options: seen.append((paths, out, options)) or 0)
    assert cli(["bench"]) == 0
    paths, out, opts = seen[-1]
    assert paths == [] and out is None  # [] = every bundle under models/
    assert (opts.runs, opts.throughput_runs, opts.batches, opts.threads) == (40, 8, (1, 4), ())
    assert opts.runtimes == ("onnxruntime", "litert") and opts.progress is not None
    assert cli(["bench", "--quick", "--runs", "99", "--bundle", "a", "--bundle", "b",
                "--json", "o.json", "--threads", "4,1,4", "--runtime", "litert",
                "--quiet"]) == 0
    paths, out, opts = seen[-1]
    assert paths == [Path("a"), Path("b")] and out == Path("o.json")
    assert (opts.runs, opts.throughput_runs, opts.auto_rounds) == (10, 3, 1)
    assert opts.threads == (1, 4) and opts.latency_threads == 4
    assert opts.runtimes == ("litert",) and opts.progress is None


@pytest.mark.parametrize("flags", [["--runs", "1"], ["--batch", "0"], ["--threads", "x"],
                                   ["--runtime", "tensorrt"]])
def test_bad_arguments_exit_2(flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli(["bench", *flags])
    assert exc.value.code == 2


def test_fidelity_matches_the_guard(nets: dict[str, Any], tmp_path: Path) -> None:
    """The bench's PSNR and max error are the guard's, on the same outputs."""
    bundle = load_bundle(write_bundle(tmp_path / "b", nets["files"], golden=nets["golden"]))
    runner = open_runner("onnxruntime", str(nets["files"]["onnx_int8"]), RunnerOptions())
    report = run_guard(bundle, runner)
    x, ref = nets["golden"]
    fig = measure.fidelity(np.concatenate([runner.run(x[i : i + 1]) for i in range(len(x))]),
                           ref, "golden")
    runner.close()
    assert fig.worst_psnr_db == pytest.approx(report.worst_psnr_db)
    assert fig.psnr_db == pytest.approx(report.psnr_db)
    assert fig.max_abs_error == pytest.approx(report.max_abs_error)
    assert fig.data_range == pytest.approx(report.data_range)


def test_take_turns_rotates_who_goes_first() -> None:
    calls: list[tuple[str, int]] = []
    tasks = {k: (lambda r, k=k: calls.append((k, r))) for k in "abc"}
    seconds = measure.take_turns(tasks, rounds=4, warmup=1)
    assert {k: len(v) for k, v in seconds.items()} == {"a": 4, "b": 4, "c": 4}
    timed = calls[3:]  # after one untimed warm-up call each
    firsts = [timed[i * 3][0] for i in range(4)]
    assert firsts == ["a", "b", "c", "a"]
    assert [k for k, _ in timed[3:6]] == ["b", "c", "a"]


def test_latency_figures() -> None:
    lat = measure.latency([0.001 * v for v in range(1, 21)], threads=2)
    assert lat.median_ms == pytest.approx(10.5) and lat.p95_ms == pytest.approx(19.05)
    assert lat.min_ms == pytest.approx(1.0) and lat.runs == 20
    tp = measure.throughput([0.5, 0.25, 1.0], threads=1, batch=4)
    assert tp.items_per_s == pytest.approx(8.0)


def test_rss_probe_is_not_fooled_by_a_big_parent(nets: dict[str, Any]) -> None:
    """A child's ru_maxrss on Linux starts at its parent's RSS; the probe's must not."""
    ballast = np.ones(200 * 2**20 // 8)  # 200 MiB resident here
    rss = measure_rss("onnxruntime", nets["files"]["onnx_int8"], threads=1, batch=2,
                      item_shape=(1, GRID, GRID), input_name="input", output_name="output")
    assert ballast.sum() > 0
    assert 0 < rss.before_load_mib < 150 and rss.batch1_mib > rss.before_load_mib


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped bundle in this checkout")
def test_macs_of_the_shipped_bundle_match_its_model_card() -> None:
    """bundle.json compute.gmac (the recipe counts Conv MACs in torch; here they come from
    the ONNX graphs): 0.767 for lite 1.1.0, fp32 and int8 alike."""
    fp32 = count_macs(SHIPPED / "model.fp32.onnx", "input", (1, 256, 256))
    int8 = count_macs(SHIPPED / "model.int8.onnx", "input", (1, 256, 256))
    gmac = json.loads((SHIPPED / "bundle.json").read_text())["compute"]["gmac"]
    assert fp32 == int8 and round(fp32 / 1e9, 3) == gmac
