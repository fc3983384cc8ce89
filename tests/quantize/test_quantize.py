"""``iomt-agent model quantize`` end to end: small float ONNX conv nets (nets.py), calibrated
on real DICOMs written from the shipped MNI152 slab, and the bundles they give checked with
the agent's own loader and guard."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from agent.backends import RunnerOptions, open_runner  # noqa: E402
from agent.demo.sample_series import build_series  # noqa: E402
from agent.model.bundle import InputContract, load_bundle  # noqa: E402
from agent.model.guard import verify_bundle  # noqa: E402
from agent.quantize import cpu, tflite  # noqa: E402
from agent.quantize.inputs import collect_inputs, split_inputs  # noqa: E402
from agent.quantize.progress import Progress  # noqa: E402
from tests.quantize.nets import GRID, contract, conv_net, quantize  # noqa: E402


def test_quantize_end_to_end(tmp_path: Path, dicoms: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    conv_net(tmp_path / "net.onnx")
    original = (tmp_path / "net.onnx").read_bytes()
    code, out = quantize(tmp_path, dicoms, tmp_path / "net.onnx", contract(tmp_path / "c.toml"),
                         "--per-layer")
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert (tmp_path / "net.onnx").read_bytes() == original  # the operator's file is untouched
    assert (out / "model.fp32.onnx").read_bytes() == original
    bundle = load_bundle(out)  # every sha256 checked
    assert bundle.precision == "int8" and bundle.golden is not None
    assert bundle.golden.min_psnr_db == 30.0
    assert bundle.reference is not None and bundle.reference.path.name == "model.fp32.onnx"
    # Conv MACs on 64 x 64: 4 x (1 x 3 x 3) + 4 x (4 x 1 x 1) + 1 x (4 x 3 x 3) per pixel.
    assert bundle.gmac == pytest.approx(64 * 64 * (36 + 16 + 36) / 1e9, rel=1e-5)
    assert verify_bundle(out, intra_op_threads=1).ok
    # The domain reference from the same DICOMs: fitted on calibration, held out for the rest.
    assert bundle.domain is not None and bundle.domain.spec.fit_slices >= 8
    assert "calibration inputs of the operator's DICOMs" in bundle.domain.spec.fit_source
    # The guard's figure where it was built, for a node whose kernels give less to compare.
    built = load_bundle(out).golden  # bundle.json was written again after the guard
    assert built is not None and built.recorded_cpu
    assert built.recorded_psnr_db["onnxruntime"] >= built.min_psnr_db

    with np.load(out / "golden.npz") as golden:
        x, ref = golden["input"], golden["reference_output"]
    assert x.shape == (4, 1, GRID, GRID) and ref.shape == (4, 1, GRID, GRID)
    fp32 = open_runner("onnxruntime", str(tmp_path / "net.onnx"), RunnerOptions(1))
    np.testing.assert_allclose(fp32.run(x), ref, rtol=1e-5, atol=1e-6)

    report = json.loads((out / "quantize-report.json").read_text())
    assert report["domain"]["built"] is True
    data = report["data"]
    assert data["files_seen"] == 26 and data["usable_inputs"] == 24
    assert data["golden_inputs"] == 4 and data["calibration_inputs"] == 20
    assert sum(data["skipped"].values()) == 2 and data["skipped"]["not_dicom"] >= 1
    assert {s["reason"] for s in data["skipped_files"]} == set(data["skipped"])
    assert report["float_nodes"] == [] and report["guard"]["onnxruntime"]["ok"]
    assert report["quantization"]["weights_reason"] and report["quantization"]["weight_codes"]
    assert {e["node"] for e in report["per_layer"]} >= {"conv1", "fragile", "conv3"}
    final = report["fidelity"]["final"]
    assert final["worst_psnr_db"] >= 33.0 and len(final["inputs"]) == 4
    assert "not for diagnostic use" in (out / "MODEL_CARD.md").read_text().lower()
    assert "kept in float: none" in printed.out
    assert "quantize: decode DICOM" in printed.err and "\r" not in printed.err  # not a TTY
    assert "skipped notes.txt: not_dicom" in printed.err  # names on the console only
    assert "notes.txt" not in (out / "quantize-report.json").read_text()


def test_model_contract_mismatch_exits_2(tmp_path: Path, dicoms: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    conv_net(tmp_path / "net.onnx", grid=32)
    code, out = quantize(tmp_path, dicoms, tmp_path / "net.onnx", contract(tmp_path / "c.toml"))
    err = capsys.readouterr().err
    assert code == 2
    assert "[N, 1, 32, 32]" in err and "[N, 1, 64, 64]" in err
    assert not out.exists()


def test_sensitivity_pass_keeps_fragile_node_in_float(tmp_path: Path, dicoms: Path) -> None:
    conv_net(tmp_path / "net.onnx", fragile=True)
    code, out = quantize(tmp_path, dicoms, tmp_path / "net.onnx", contract(tmp_path / "c.toml"),
                         "--target-cpu", "no-dot-product")
    assert code == 0
    report = json.loads((out / "quantize-report.json").read_text())
    assert report["fidelity"]["all_int8"]["holds"] is False
    assert report["fidelity"]["all_int8"]["golden_worst_psnr_db"] < 30.0
    assert report["float_nodes"] == ["fragile"]
    assert report["sensitivity"]["ranking"][0]["node"] == "fragile"
    # Saturation-safe weights for that fleet: 8-bit codes with limited pair sums (every int8
    # weight here is a Conv's), not reduce_range's 7 bits.
    assert report["quantization"]["saturation_safe"] is True
    assert report["quantization"]["reduce_range"] is False
    assert "limited pair sums" in report["quantization"]["weight_codes"]
    assert verify_bundle(out, intra_op_threads=1).ok
    served = onnx.load(str(out / "model.int8.onnx")).graph
    inputs = {i for n in served.node if n.name == "fragile" for i in n.input}
    assert "fragile_w" in inputs  # its weights stayed float (no DequantizeLinear)


def test_unreachable_floor_exits_1(tmp_path: Path, dicoms: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    conv_net(tmp_path / "net.onnx", fragile=True)
    code, out = quantize(tmp_path, dicoms, tmp_path / "net.onnx",
                         contract(tmp_path / "c.toml", floor=140.0), "--max-float-nodes", "1")
    assert code == 1
    assert "misses the fidelity floor 140 dB" in capsys.readouterr().err
    assert not out.exists()


def test_two_and_a_half_d(tmp_path: Path, dicoms: Path) -> None:
    conv_net(tmp_path / "net.onnx", channels=3)
    code, out = quantize(tmp_path, dicoms, tmp_path / "net.onnx",
                         contract(tmp_path / "c.toml", context=1), "--golden", "3")
    assert code == 0
    bundle = load_bundle(out)
    assert bundle.input.context_slices == 1 and bundle.input_channels == 3
    with np.load(out / "golden.npz") as golden:
        assert golden["input"].shape == (3, 3, GRID, GRID)
    assert verify_bundle(out, intra_op_threads=1).ok


def test_series_stacks_follow_the_slice_normal(tmp_path: Path) -> None:
    """Files named against slice order still stack as [previous, self, next], edges
    repeated, each stack divided by its centre slice."""
    n = 5
    volume = np.zeros((n, 32, 32), np.uint16)
    for i in range(n):
        volume[i, 8:24, 8:24] = 1000 + 100 * i
    for i, payload in enumerate(build_series(volume, series_description="t1")):
        (tmp_path / f"{n - i:02d}.dcm").write_bytes(payload)  # reversed names
    ic = InputContract(modality="MR", shape=(32, 32), pixel_spacing_mm=(1.0, 1.0),
                       context_slices=1)
    got = collect_inputs(tmp_path, ic)
    assert len(got.inputs) == n and not got.skipped
    for j, item in enumerate(got.inputs):
        value = [1000 + 100 * min(max(j + d, 0), n - 1) for d in (-1, 0, 1)]
        np.testing.assert_allclose(item.array[:, 16, 16], np.array(value) / value[1], rtol=1e-5)
    assert [i.position_mm for i in got.inputs] == sorted(i.position_mm or 0 for i in got.inputs)


def test_split_is_deterministic_and_disjoint() -> None:
    split = split_inputs(30, golden=4, calibration=16, check=5)
    assert split == split_inputs(30, golden=4, calibration=16, check=5)
    assert not set(split.golden) & set(split.calibration)
    assert len(split.golden) == 4 and len(split.calibration) == 16
    assert set(split.check) <= set(split.calibration) and len(split.check) == 5
    assert 0 not in split.golden and 29 not in split.golden  # held out from inside the range


@pytest.mark.parametrize(("text", "machine", "safe"), [
    ("flags\t: fpu sse2 avx2 fma\n", "x86_64", True),
    ("flags\t: fpu sse2 avx2 avx512f avx512_vnni\n", "x86_64", False),
    ("flags\t: fpu sse2 avx2 avx_vnni\n", "x86_64", False),
    ("Features\t: fp asimd evtstrm crc32 cpuid\n", "aarch64", True),
    ("Features\t: fp asimd asimddp crc32\n", "aarch64", False),
])
def test_safe_weights_follow_the_cpu(tmp_path: Path, text: str, machine: str,
                                     safe: bool) -> None:
    (tmp_path / "cpuinfo").write_text(text)
    decision = cpu.decide_weights("host", tmp_path / "cpuinfo", machine)
    assert decision.saturation_safe is safe and decision.reason
    assert cpu.decide_weights("host", tmp_path / "missing", machine).saturation_safe
    assert cpu.decide_weights("dot-product").saturation_safe is False
    assert cpu.decide_weights("no-dot-product").saturation_safe is True


def test_tflite_without_converter_fails_up_front(tmp_path: Path, dicoms: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(tflite, "converter_installed", lambda: False)
    conv_net(tmp_path / "net.onnx")
    code, out = quantize(tmp_path, dicoms, tmp_path / "net.onnx", contract(tmp_path / "c.toml"),
                         "--tflite")
    assert code == 2
    assert "iomt-edge-agent[convert]" in capsys.readouterr().err
    assert not out.exists()


def test_existing_bundle_dir_needs_force(tmp_path: Path, dicoms: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    conv_net(tmp_path / "net.onnx")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep.txt").write_text("x")
    code, _out = quantize(tmp_path, dicoms, tmp_path / "net.onnx", contract(tmp_path / "c.toml"))
    assert code == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "bundle" / "keep.txt").is_file()


def test_too_few_usable_files_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.dcm").write_bytes(b"\0" * 200)
    conv_net(tmp_path / "net.onnx")
    code, _out = quantize(tmp_path, tmp_path / "d", tmp_path / "net.onnx",
                          contract(tmp_path / "c.toml"))
    err = capsys.readouterr().err
    assert code == 2 and "0 usable input(s) from 1 file(s)" in err and "not_dicom: 1" in err


def test_progress_bar_only_on_a_tty() -> None:
    tty, plain = io.StringIO(), io.StringIO()
    for stream, is_tty in ((tty, True), (plain, False)):
        with Progress(stream, tty=is_tty).stage("calibrate", 3) as stage:
            for _ in range(3):
                stage.tick()
    assert "\r" in tty.getvalue() and "[" + "#" * 28 + "] 3/3" in tty.getvalue()
    assert plain.getvalue().splitlines()[0] == "quantize: calibrate (3)..."
    assert "\r" not in plain.getvalue()


@pytest.mark.skipif(not tflite.converter_installed(), reason="needs the convert extra")
def test_tflite_export_passes_the_litert_guard(tmp_path: Path, dicoms: Path) -> None:
    conv_net(tmp_path / "net.onnx")
    code, out = quantize(tmp_path, dicoms, tmp_path / "net.onnx", contract(tmp_path / "c.toml"),
                         "--tflite")
    assert code == 0
    bundle = load_bundle(out)
    assert set(bundle.backends) == {"onnxruntime", "litert"} and "litert" in bundle.references
    assert verify_bundle(out, runtime="litert", intra_op_threads=1).ok
