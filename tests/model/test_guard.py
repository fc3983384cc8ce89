"""The int8 accuracy guard on real models: a small float conv net quantized to int8 QDQ by
onnxruntime passes; the same int8 model with one weight scale corrupted is refused. The
shipped reference bundle is checked the same way once it carries its golden set."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.backends import BackendError, ModelRunner, RunnerOptions, open_runner
from agent.model.bundle import BundleError, ModelBundle, load_bundle
from agent.model.guard import (
    GuardFailed,
    GuardReport,
    check_guard,
    format_db,
    report_json,
    run_guard,
    verify_bundle,
)
from tests.bundles import (
    SHIPPED_BUNDLES,
    corrupt_weight_scale,
    make_scale_bundle,
    quantize_qdq,
    smooth_inputs,
)

GRID = 32
FLOOR_DB = 25.0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def conv_net(path: Path) -> None:
    """input [N, 1, 32, 32] -> Conv 8 -> Relu -> Conv 8 -> Relu -> Conv 1 -> output."""
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "input"
    for i, (cout, cin) in enumerate([(8, 1), (8, 8), (1, 8)]):
        w = rng.normal(0, 1.0 / math.sqrt(9 * cin), (cout, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.05, cout).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "output" if i == 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [out], pads=[1, 1, 1, 1]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            out = f"r{i}"
        prev = out
    graph = helper.make_graph(
        nodes, "guard-test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    runner = open_runner("onnxruntime", str(path), RunnerOptions())
    try:
        return runner.run(x)
    finally:
        runner.close()


def write_bundle(root: Path, served: Path, *, golden: tuple[np.ndarray, np.ndarray] | None,
                 precision: str = "int8", floor: float = FLOOR_DB) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if served.parent != root:
        shutil.copy(served, root / "model.int8.onnx")
    meta: dict[str, object] = {
        "format": 1, "name": "guard-test", "version": "0.0.1", "task": "test",
        "precision": precision,
        "input": {"modality": "MR", "shape": [GRID, GRID], "pixel_spacing_mm": [1.0, 1.0]},
        "output": {"modality": "MR", "scale": 1000.0},
        "backends": {"onnxruntime": {"path": "model.int8.onnx",
                                     "sha256": _sha(root / "model.int8.onnx")}},
    }
    if golden is not None:
        np.savez_compressed(root / "golden.npz", input=golden[0], reference_output=golden[1])
        meta["golden"] = {"path": "golden.npz", "sha256": _sha(root / "golden.npz"),
                          "min_psnr_db": floor}
    (root / "bundle.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    d = tmp_path_factory.mktemp("guard-models")
    conv_net(d / "model.fp32.onnx")
    quantize_qdq(d / "model.fp32.onnx", d / "model.int8.onnx")
    corrupt_weight_scale(d / "model.int8.onnx", d / "model.broken.onnx")
    x = smooth_inputs(4, seed=2)  # held out from the calibration batches
    ref = run_model(d / "model.fp32.onnx", x)
    np.savez(d / "golden-arrays.npz", input=x, reference_output=ref)
    yield {"fp32": d / "model.fp32.onnx", "int8": d / "model.int8.onnx",
           "broken": d / "model.broken.onnx", "golden": d / "golden-arrays.npz"}


def golden_of(models: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    with np.load(models["golden"]) as g:
        return g["input"], g["reference_output"]


def guard(bundle_dir: Path) -> GuardReport:
    bundle = load_bundle(bundle_dir)
    runner = open_runner("onnxruntime", str(bundle.backend_file("onnxruntime").path),
                         RunnerOptions())
    try:
        return run_guard(bundle, runner)
    finally:
        runner.close()


# --- the verdicts -------------------------------------------------------------------


def test_guard_accepts_the_int8_model(models: dict[str, Path], tmp_path: Path) -> None:
    report = guard(write_bundle(tmp_path / "b", models["int8"], golden=golden_of(models)))
    assert report.ok, report.reason
    assert report.worst_psnr_db is not None and report.psnr_db is not None
    assert FLOOR_DB <= report.worst_psnr_db <= report.psnr_db < math.inf  # int8 != fp32
    assert len(report.inputs) == 4 and all(g.latency_ms > 0 for g in report.inputs)
    assert report.ssim is not None and report.ssim > 0.9
    assert report.max_abs_error is not None and report.mae is not None
    assert 0 < report.mae <= report.max_abs_error
    assert report.runtime == "onnxruntime" and report.min_psnr_db == FLOOR_DB
    assert "PASS" in report.render() and f"floor {FLOOR_DB:g} dB" in report.render()


def test_guard_rejects_the_int8_model_with_a_corrupted_scale(
    models: dict[str, Path], tmp_path: Path
) -> None:
    root = write_bundle(tmp_path / "b", models["broken"], golden=golden_of(models))
    report = guard(root)
    assert not report.ok
    assert report.worst_psnr_db is not None and report.worst_psnr_db < FLOOR_DB - 5
    assert "misses its fidelity floor" in report.reason and f"< {FLOOR_DB:g} dB" in report.reason
    assert "FAIL" in report.render()
    bundle = load_bundle(root)
    runner = open_runner("onnxruntime", str(bundle.backend_file("onnxruntime").path),
                         RunnerOptions())
    with pytest.raises(GuardFailed) as info:
        check_guard(bundle, runner)
    assert isinstance(info.value, BundleError)  # `run` already maps this to exit 2
    assert info.value.report.worst_psnr_db == report.worst_psnr_db


def test_floor_is_compared_on_the_worst_input(models: dict[str, Path], tmp_path: Path) -> None:
    """One bad input among good ones fails, even when the pooled PSNR would pass."""
    x, ref = golden_of(models)
    ref = ref.copy()
    ref[3] += 0.05 * float(ref.max() - ref.min())  # input 3 off by a constant: ~26 dB
    root = write_bundle(tmp_path / "b", models["int8"], golden=(x, ref), floor=30.0)
    report = guard(root)
    assert report.psnr_db is not None and report.worst_psnr_db is not None
    assert report.worst_psnr_db < 30.0 <= report.psnr_db  # pooled alone would pass
    assert not report.ok and "worst input 3" in report.reason


def test_identical_outputs_give_infinite_psnr_and_json_stays_valid(
    models: dict[str, Path], tmp_path: Path
) -> None:
    report = guard(write_bundle(tmp_path / "b", models["fp32"], golden=golden_of(models),
                                precision="fp32"))
    assert report.ok and report.psnr_db == math.inf
    data = json.loads(report_json(report))
    assert data["psnr_db"] == "inf" and data["ok"] is True and len(data["inputs"]) == 4
    json.dumps(report.summary(), allow_nan=False)


def test_non_finite_output_fails(tmp_path: Path) -> None:
    """output = sqrt(input - 2): NaN for every golden input."""
    graph = helper.make_graph(
        [helper.make_node("Sub", ["input", "two"], ["d"]), helper.make_node("Sqrt", ["d"],
                                                                           ["output"])],
        "nan", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, GRID, GRID])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "nan.onnx"))
    x = smooth_inputs(2, seed=3)
    report = guard(write_bundle(tmp_path / "b", tmp_path / "nan.onnx", golden=(x, x)))
    assert not report.ok and "non-finite" in report.reason


# --- bundles without a usable golden set --------------------------------------------


def test_int8_bundle_without_golden_set_fails(models: dict[str, Path], tmp_path: Path) -> None:
    report = guard(write_bundle(tmp_path / "b", models["int8"], golden=None))
    assert not report.ok and not report.has_golden
    assert "no golden set" in report.reason


def test_fp32_bundle_without_golden_set_passes_with_a_warning(tmp_path: Path) -> None:
    root = make_scale_bundle(tmp_path / "scale")  # the other tests' fp32 bundle
    bundle = load_bundle(root)
    runner = open_runner("onnxruntime", str(bundle.backend_file("onnxruntime").path),
                         RunnerOptions())
    report = check_guard(bundle, runner)
    assert report.ok and report.warning is not None and "no golden set" in report.warning
    assert "warning: no golden set" in report.render()


WHERE = "bundle guard-test: golden.npz"


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"input": "x"}, f"{WHERE} has no array 'reference_output' (expected 'input' and "
                         "'reference_output')"),
        ({"reference_output": "x"}, f"{WHERE} has no array 'input' (expected 'input' and "
                                    "'reference_output')"),
        ({"input": "x", "reference_output": "short"},
         f"{WHERE}: 4 inputs but 2 reference outputs"),
        ({"input": "wrong_grid", "reference_output": "x"},
         f"{WHERE}: input is [4, 1, 16, 16], the input contract says [N, 1, 32, 32]"),
        ({"input": "ints", "reference_output": "x"},
         f"{WHERE}: input is int16 [4, 1, 32, 32], expected float32 [N, C, H, W] with N >= 1"),
        ({"input": "x", "reference_output": "ints"}, f"{WHERE}: reference_output is int16 "
                                                     "[4, 1, 32, 32], expected float32 "
                                                     "[N, C, H, W] with N >= 1"),
        ({"input": "flat", "reference_output": "x"},
         f"{WHERE}: input is float32 [32, 32], expected float32 [N, C, H, W] with N >= 1"),
        ({"input": "empty", "reference_output": "empty"},
         f"{WHERE}: input is float32 [0, 1, 32, 32], expected float32 [N, C, H, W] with "
         "N >= 1"),
    ],
)
def test_malformed_golden_set_is_a_bundle_error(
    models: dict[str, Path], tmp_path: Path, arrays: dict[str, str], message: str
) -> None:
    x, ref = golden_of(models)
    choices = {"x": x, "short": ref[:2], "wrong_grid": np.zeros((4, 1, 16, 16), np.float32),
               "ints": x.astype(np.int16), "flat": x[0, 0],
               "empty": np.zeros((0, 1, GRID, GRID), np.float32)}
    root = write_bundle(tmp_path / "b", models["int8"], golden=(x, ref))
    np.savez(root / "golden.npz", **{k: choices[v] for k, v in arrays.items()})
    meta = json.loads((root / "bundle.json").read_text())
    meta["golden"]["sha256"] = _sha(root / "golden.npz")
    (root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as ei:
        guard(root)
    assert str(ei.value) == message


@pytest.mark.parametrize("content", ["pickled", "not-a-zip"])
def test_a_golden_file_numpy_cannot_read_safely_is_a_bundle_error(
        models: dict[str, Path], tmp_path: Path, content: str) -> None:
    """Pickled object arrays are refused (loading them could run code), so is a file that
    is not an .npz at all."""
    x, ref = golden_of(models)
    root = write_bundle(tmp_path / "b", models["int8"], golden=(x, ref))
    if content == "pickled":
        np.savez(root / "golden.npz", input=np.array([x], dtype=object), reference_output=ref)
    else:
        (root / "golden.npz").write_bytes(b"not a zip file")
    meta = json.loads((root / "bundle.json").read_text())
    meta["golden"]["sha256"] = _sha(root / "golden.npz")
    (root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as ei:
        guard(root)
    assert str(ei.value).startswith(f"{WHERE} is not a readable .npz file (")


def test_a_golden_set_for_another_grid_names_rows_then_columns(
        models: dict[str, Path], tmp_path: Path) -> None:
    x, ref = golden_of(models)
    root = write_bundle(tmp_path / "b", models["int8"], golden=(x, ref))
    meta = json.loads((root / "bundle.json").read_text())
    meta["input"]["shape"] = [GRID, 2 * GRID]
    (root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as ei:
        guard(root)
    assert str(ei.value) == (f"{WHERE}: input is [4, 1, 32, 32], the input contract says "
                             "[N, 1, 32, 64]")


# --- `iomt-agent model verify` ------------------------------------------------------


def test_verify_bundle(models: dict[str, Path], tmp_path: Path) -> None:
    good = verify_bundle(write_bundle(tmp_path / "good", models["int8"], golden=golden_of(models)))
    bad = verify_bundle(write_bundle(tmp_path / "bad", models["broken"], golden=golden_of(models)))
    assert good.ok and not bad.ok
    with pytest.raises(BundleError, match=r"bundle\.json not found"):
        verify_bundle(tmp_path / "nowhere")


def _cli_has_model_verify() -> bool:
    from agent.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["model", "verify", "x"])
    except SystemExit:
        return False
    return True


@pytest.mark.skipif(not _cli_has_model_verify(), reason="cli.py has no `model verify` yet")
def test_cli_model_verify_exit_codes(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    good = write_bundle(tmp_path / "good", models["int8"], golden=golden_of(models))
    bad = write_bundle(tmp_path / "bad", models["broken"], golden=golden_of(models))
    assert main(["model", "verify", str(good)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "PSNR" in out and "ms" in out
    assert main(["model", "verify", str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["model", "verify", str(tmp_path / "nowhere")]) == 2
    assert main(["model", "verify", "--json", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


# --- the shipped bundles ----------------------------------------------------------------


def _shipped(path: Path) -> ModelBundle:
    bundle = load_bundle(path)
    assert bundle.golden is not None, f"{path.name} ships without a golden set"
    return bundle


@pytest.mark.parametrize("shipped", SHIPPED_BUNDLES, ids=lambda p: p.name)
def test_guard_accepts_the_shipped_bundle(shipped: Path) -> None:
    _shipped(shipped)
    report = verify_bundle(shipped)
    assert report.ok, report.reason


@pytest.mark.parametrize("shipped", SHIPPED_BUNDLES, ids=lambda p: p.name)
def test_guard_rejects_the_shipped_int8_model_with_a_corrupted_scale(
    tmp_path: Path, shipped: Path
) -> None:
    bundle = _shipped(shipped)
    assert bundle.golden is not None
    root = tmp_path / "broken"
    shutil.copytree(shipped, root)
    served = bundle.backend_file("onnxruntime").path.relative_to(shipped.resolve())
    corrupt_weight_scale(root / served, root / served)
    meta = json.loads((root / "bundle.json").read_text())
    meta["backends"]["onnxruntime"]["sha256"] = _sha(root / served)
    (root / "bundle.json").write_text(json.dumps(meta))
    report = verify_bundle(root)
    assert not report.ok and "misses its fidelity floor" in report.reason


class FixedRunner(ModelRunner):
    """A runner with fixed outputs (no kernels involved): the same figures on every CPU."""

    runtime = "fixed"

    def __init__(self, x: np.ndarray, outputs: np.ndarray) -> None:
        self._by_input = {x[i : i + 1].tobytes(): outputs[i : i + 1] for i in range(len(x))}

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._by_input[np.ascontiguousarray(batch, dtype=np.float32).tobytes()]


@pytest.mark.parametrize(("floor", "ok"), [(30.0, False), (25.0, True)])
def test_the_gate_is_the_worst_input_not_the_pooled_figure(
        tmp_path: Path, floor: float, ok: bool) -> None:
    """Four golden inputs, three reproduced exactly and one off by 5 % of the range:
    that input scores 26.0 dB, the pooled figure 32.0 dB. A 30 dB floor refuses it (the
    pooled figure alone would pass), a 25 dB floor lets it through."""
    from tests.bundles import scale_model

    x = smooth_inputs(4, seed=2)
    ref = (0.5 * x).astype(np.float32)
    span = float(ref.max() - min(0.0, float(ref.min())))
    got = ref.copy()
    got[3] += np.float32(0.05 * span)
    scale_model(tmp_path / "served.onnx")
    root = write_bundle(tmp_path / "b", tmp_path / "served.onnx", golden=(x, ref), floor=floor)
    report = run_guard(load_bundle(root), FixedRunner(x, got))
    assert report.psnr_db == pytest.approx(20 * math.log10(1 / 0.05) + 10 * math.log10(4))
    assert report.worst_psnr_db == pytest.approx(20 * math.log10(1 / 0.05))
    assert report.ok is ok
    if not ok:
        assert "worst input 3" in report.reason


def test_a_fixed_output_report_renders_serialises_and_takes_another_fix(tmp_path: Path) -> None:
    """The figures of the fixed-output case above, as `model verify` prints them and as
    its --json and the GuardFailed error carry them."""
    from tests.bundles import scale_model

    x = smooth_inputs(4, seed=2)
    ref = (0.5 * x).astype(np.float32)
    got = ref.copy()
    span = float(ref.max() - min(0.0, float(ref.min())))
    got[3] += np.float32(0.05 * span)
    got[2] += np.float32(0.01 * span)  # 40 dB, so that no figure is 0 or inf but input 0/1
    scale_model(tmp_path / "served.onnx")
    root = write_bundle(tmp_path / "b", tmp_path / "served.onnx", golden=(x, ref), floor=30.0)
    report = run_guard(load_bundle(root), FixedRunner(x, got))
    assert not report.ok and report.mae and report.max_abs_error and report.ssim
    rows = report.render().splitlines()
    assert rows[2].split() == ["input", "PSNR", "dB", "MAE", "max", "err", "SSIM", "ms"]
    assert rows[3].split()[:2] == ["0", "inf"] and rows[5].split()[:2] == ["2", "40.00"]
    assert rows[6].split()[:2] == ["3", "26.02"]
    pooled = rows[7].split()
    assert pooled[:2] == ["pooled", format_db(report.psnr_db)]
    assert float(pooled[2]) == pytest.approx(report.mae, rel=1e-3)
    assert float(pooled[3]) == pytest.approx(report.max_abs_error, rel=1e-3)
    assert float(pooled[4]) == pytest.approx(report.ssim, abs=1e-4)
    latencies = sorted(g.latency_ms for g in report.inputs)
    assert float(pooled[5]) == pytest.approx(latencies[2], abs=0.01) and pooled[6] == "(median)"
    assert rows[-1] == f"FAIL: {report.reason}" and "\n".join(rows) == report.render()
    text = report_json(report)
    assert text.startswith('{\n  "bundle"')  # indented for people
    data = json.loads(text)
    assert data["inputs"][0]["psnr_db"] == "inf" and data["psnr_db"] == round(report.psnr_db, 6)
    assert data["inputs"][3]["psnr_db"] == pytest.approx(26.0206, abs=1e-3)
    assert data["min_psnr_db"] == 30.0 and data["ok"] is False
    assert str(GuardFailed(report)) == report.reason
    assert report.fix and report.reason.endswith(report.fix)
    other = report.with_fix("serve it with onnxruntime")
    assert other.fix == "serve it with onnxruntime"
    assert other.reason == report.reason[: -len(report.fix)] + "serve it with onnxruntime"
    assert other.psnr_db == report.psnr_db and other.inputs == report.inputs
    passed = run_guard(load_bundle(root), FixedRunner(x, ref))  # exact: inf, and a pass
    assert passed.with_fix("x").reason == passed.reason
    assert passed.render().splitlines()[-1].startswith("PASS: ")


def test_non_finite_outputs_fail_with_a_cause_and_one_golden_input_is_enough(
        tmp_path: Path) -> None:
    from tests.bundles import scale_model

    x = smooth_inputs(1, seed=3)  # a golden set of one input is valid
    ref = (0.5 * x).astype(np.float32)
    scale_model(tmp_path / "served.onnx")
    root = write_bundle(tmp_path / "b", tmp_path / "served.onnx", golden=(x, ref), floor=30.0)
    exact = run_guard(load_bundle(root), FixedRunner(x, ref))
    assert exact.ok and len(exact.inputs) == 1
    pooled = exact.render().splitlines()[-2].split()
    assert pooled[:5] == ["pooled", "inf", "0", "0", "1.0000"]  # an exact match shows zeros
    bad = ref.copy()
    bad[0, 0, 0, 0] = np.nan
    report = run_guard(load_bundle(root), FixedRunner(x, bad))
    assert not report.ok and report.cause and report.explanation and report.fix
    assert report.shortfall == "1 non-finite output value(s) on the golden set on this CPU"
    assert report.reason == f"{report.shortfall}; {report.explanation}: {report.fix}"


def test_a_failure_without_a_known_cause_reads_shortfall_then_fix(
        models: dict[str, Path], tmp_path: Path) -> None:
    report = guard(write_bundle(tmp_path / "b", models["int8"], golden=None))
    assert report.explanation is None and report.cause is None
    assert report.shortfall == ("int8 model guard-test 0.0.1 has no golden set, so nothing "
                                "shows it has not drifted from its fp32 reference")
    assert report.fix == "rebuild the bundle with golden.npz and golden.min_psnr_db"
    assert report.reason == f"{report.shortfall}: {report.fix}"


class SlowRunner(FixedRunner):
    """Fixed outputs; golden input ``i`` takes ``20 i`` ms on ``clock`` (a clock it moves
    itself, so the figures do not depend on how busy the machine is)."""

    def __init__(self, x: np.ndarray, outputs: np.ndarray, clock: list[float]) -> None:
        super().__init__(x, outputs)
        self._delay = {x[i : i + 1].tobytes(): 0.02 * i for i in range(len(x))}
        self._clock = clock

    def run(self, batch: np.ndarray) -> np.ndarray:
        self._clock[0] += self._delay[np.ascontiguousarray(batch, dtype=np.float32).tobytes()]
        return super().run(batch)


def test_the_rendered_latency_is_the_median_input(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.model import guard
    from tests.bundles import scale_model

    x = smooth_inputs(4, seed=2)
    ref = (0.5 * x).astype(np.float32)
    scale_model(tmp_path / "served.onnx")
    root = write_bundle(tmp_path / "b", tmp_path / "served.onnx", golden=(x, ref), floor=30.0)
    clock = [1000.0]
    monkeypatch.setattr(guard.time, "perf_counter", lambda: clock[0])
    report = run_guard(load_bundle(root), SlowRunner(x, ref, clock))
    latencies = sorted(g.latency_ms for g in report.inputs)
    assert latencies == pytest.approx([0.0, 20.0, 40.0, 60.0])  # so the rank matters
    pooled = report.render().splitlines()[-2].split()
    assert pooled[5] == f"{latencies[2]:.2f}" and pooled[6] == "(median)"


def test_verify_bundle_feeds_the_tensors_the_bundle_names(tmp_path: Path) -> None:
    """A model whose tensors are not called input/output: `model verify` must use the names
    bundle.json gives (the runtime refuses the defaults)."""
    shape = ["N", 1, GRID, GRID]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["scan", "k"], ["synth"])], "named",
        [helper.make_tensor_value_info("scan", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("synth", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(0.5, dtype=np.float32), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "served.onnx"))
    x = smooth_inputs(2, seed=5)
    root = write_bundle(tmp_path / "b", tmp_path / "served.onnx",
                        golden=(x, (0.5 * x).astype(np.float32)), floor=40.0)
    meta = json.loads((root / "bundle.json").read_text())
    meta["input"]["tensor_name"], meta["output"]["tensor_name"] = "scan", "synth"
    (root / "bundle.json").write_text(json.dumps(meta))
    report = verify_bundle(root)
    assert report.ok and report.psnr_db == math.inf and len(report.inputs) == 2


def _fixed_case(tmp_path: Path, floor: float = 30.0) -> tuple[Path, np.ndarray, np.ndarray]:
    from tests.bundles import scale_model

    x = smooth_inputs(4, seed=2)
    ref = (0.5 * x).astype(np.float32)
    scale_model(tmp_path / "served.onnx")
    root = write_bundle(tmp_path / "b", tmp_path / "served.onnx", golden=(x, ref), floor=floor)
    return root, x, ref


def test_the_status_summary_carries_every_figure_and_cause_and_fix_only_on_failure(
        tmp_path: Path) -> None:
    root, x, ref = _fixed_case(tmp_path)
    got = ref.copy()
    got[3] += np.float32(0.05 * float(ref.max()))
    failed = run_guard(load_bundle(root), FixedRunner(x, got))
    assert failed.cause and failed.fix
    assert failed.summary() == {
        "ok": False, "runtime": "fixed", "min_psnr_db": 30.0,
        "psnr_db": round(failed.psnr_db or 0, 6),
        "worst_psnr_db": round(failed.worst_psnr_db or 0, 6),
        "mae": round(failed.mae or 0, 6), "max_abs_error": round(failed.max_abs_error or 0, 6),
        "golden_inputs": 4, "reason": failed.reason, "cause": failed.cause, "fix": failed.fix}
    assert failed.summary()["worst_psnr_db"] == pytest.approx(26.0206, abs=1e-3)
    passed = run_guard(load_bundle(root), FixedRunner(x, ref))
    assert passed.summary() == {
        "ok": True, "runtime": "fixed", "min_psnr_db": 30.0, "psnr_db": "inf",
        "worst_psnr_db": "inf", "mae": 0.0, "max_abs_error": 0.0, "golden_inputs": 4,
        "reason": passed.reason}


def test_a_model_that_returns_the_wrong_shape_fails_on_that_input(tmp_path: Path) -> None:
    root, x, ref = _fixed_case(tmp_path)
    wrong = np.concatenate([ref, ref], axis=1)  # two channels where the reference has one
    report = run_guard(load_bundle(root), FixedRunner(x, wrong))
    assert not report.ok and report.bundle == "guard-test" and report.runtime == "fixed"
    assert report.min_psnr_db == 30.0 and report.inputs == ()
    assert report.shortfall == ("golden input 0: the model returns [1, 2, 32, 32], the "
                                "reference is [1, 1, 32, 32]")
    assert report.fix == ("the bundle's model file does not match its golden set: rebuild "
                          "the bundle")
    assert report.reason == f"{report.shortfall}: {report.fix}"


def test_an_fp32_bundle_without_golden_set_says_so_as_its_reason(tmp_path: Path) -> None:
    from tests.bundles import scale_model

    scale_model(tmp_path / "served.onnx")
    root = write_bundle(tmp_path / "b", tmp_path / "served.onnx", golden=None,
                        precision="fp32")
    report = run_guard(load_bundle(root), FixedRunner(np.zeros((1, 1, GRID, GRID), np.float32),
                                                      np.zeros((1, 1, GRID, GRID), np.float32)))
    note = "no golden set: an fp32 model is its own reference, nothing to compare"
    assert report.ok and report.reason == note and report.warning == note


def test_latencies_are_milliseconds_of_each_input(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.model import guard

    root, x, ref = _fixed_case(tmp_path)
    clock = [50.0]
    monkeypatch.setattr(guard.time, "perf_counter", lambda: clock[0])
    report = run_guard(load_bundle(root), SlowRunner(x, ref, clock))
    assert [g.latency_ms for g in report.inputs] == pytest.approx(
        [20.0 * g.index for g in report.inputs])


class FailingRunner(FixedRunner):
    def __init__(self, x: np.ndarray, outputs: np.ndarray, error: Exception) -> None:
        super().__init__(x, outputs)
        self._error = error

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise self._error


@pytest.mark.parametrize(("error", "shortfall"), [
    (BackendError("the session failed"), "the runtime failed on the golden set: the session "
                                         "failed"),
    (RuntimeError("boom"), "the runtime failed on the golden set (RuntimeError: boom)"),
])
def test_a_runtime_that_fails_on_the_golden_set_is_a_failed_report(
        tmp_path: Path, error: Exception, shortfall: str) -> None:
    root, x, ref = _fixed_case(tmp_path)
    report = run_guard(load_bundle(root), FailingRunner(x, ref, error))
    assert not report.ok and report.bundle == "guard-test" and report.min_psnr_db == 30.0
    assert report.shortfall == shortfall
    assert report.fix == 'serve it on another runtime or set model.backend = "auto"'
    assert report.reason == f"{shortfall}: {report.fix}"


def test_a_psnr_exactly_at_the_floor_passes_and_the_reasons_give_the_figures(
        tmp_path: Path) -> None:
    root, x, ref = _fixed_case(tmp_path)
    got = ref.copy()
    got[3] += np.float32(0.05 * float(ref.max()))
    first = run_guard(load_bundle(root), FixedRunner(x, got))
    assert first.worst_psnr_db is not None and first.psnr_db is not None
    worst, pooled = first.worst_psnr_db, first.psnr_db
    assert first.reason.startswith(
        f"int8 model guard-test 0.0.1 on fixed misses its fidelity floor on this CPU: golden "
        f"PSNR {worst:.2f} dB < 30 dB (pooled {pooled:.2f} dB, worst input 3); ")
    assert first.cause and first.explanation and first.reason.endswith(first.fix or "?")
    at = write_bundle(tmp_path / "at", tmp_path / "served.onnx", golden=(x, ref), floor=worst)
    report = run_guard(load_bundle(at), FixedRunner(x, got))
    assert report.ok and report.worst_psnr_db == worst
    assert report.reason == (f"golden PSNR {worst:.2f} dB (worst of pooled {pooled:.2f} and 4 "
                             f"input(s)) >= floor {worst:g} dB")
