"""bundle.json goes through its one schema: every problem is reported with its key path, and
what the writers produce is exactly what the loader accepts."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.model.bundle import BundleError, load_bundle, read_manifest
from agent.model.manifest import BundleManifest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.parent for p in (REPO / "models").glob("*/bundle.json"))
LITE = REPO / "models" / "t1w-to-t2w-lite"


def _meta() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((LITE / "bundle.json").read_text(encoding="utf-8"))
    return data


def _write(root: Path, meta: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def _problems(root: Path) -> list[str]:
    with pytest.raises(BundleError) as info:
        load_bundle(root, verify=False)
    return info.value.problems


@pytest.mark.parametrize("bundle", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_bundle_json_is_what_the_schema_writes(bundle: Path) -> None:
    text = (bundle / "bundle.json").read_text(encoding="utf-8")
    assert read_manifest(bundle).to_json() == text


def _drop_output(m: dict[str, Any]) -> None:
    del m["output"]


def _shape_text(m: dict[str, Any]) -> None:
    m["input"]["shape"] = "256x256"


def _unknown_top(m: dict[str, Any]) -> None:
    m["golden_set"] = m.pop("golden")


def _unknown_nested(m: dict[str, Any]) -> None:
    m["input"]["normalisation"]["pct"] = 99.0


def _outside(m: dict[str, Any]) -> None:
    m["backends"]["onnxruntime"]["path"] = "../elsewhere/model.int8.onnx"


def _absolute(m: dict[str, Any]) -> None:
    m["reference"]["path"] = "/etc/passwd"


def _short_digest(m: dict[str, Any]) -> None:
    m["backends"]["litert"]["sha256"] = "abc123"


def _unknown_runtime(m: dict[str, Any]) -> None:
    m["backends"]["tensorrt"] = m["backends"]["onnxruntime"]


def _unlabelled(m: dict[str, Any]) -> None:
    m["output"]["series_description"] = "T2w"


def _floor_text(m: dict[str, Any]) -> None:
    m["golden"]["min_psnr_db"] = "high"


@pytest.mark.parametrize(("change", "problem"), [
    (_drop_output, "output: required key is missing"),
    (_shape_text, "input.shape:"),
    (_unknown_top, "golden_set: unknown key"),
    (_unknown_nested, "input.normalisation.pct: unknown key"),
    (_outside, "backends.onnxruntime.path: must be a path inside the bundle"),
    (_absolute, "reference.path: must be a path inside the bundle"),
    (_short_digest, "backends.litert.sha256: String should match pattern"),
    (_unknown_runtime, "backends.tensorrt.[key]:"),
    (_unlabelled, "output.series_description: must contain 'NOT FOR DIAGNOSTIC USE'"),
    (_floor_text, "golden.min_psnr_db:"),
])
def test_malformed_bundle_json_names_the_key_path(
    tmp_path: Path, change: Any, problem: str,
) -> None:
    meta = copy.deepcopy(_meta())
    change(meta)
    problems = _problems(_write(tmp_path / "b", meta))
    assert any(p.startswith(problem) for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    meta = _meta()
    _drop_output(meta)
    _short_digest(meta)
    _unknown_top(meta)
    problems = _problems(_write(tmp_path / "b", meta))
    assert len(problems) == 3, problems


def test_newer_format_says_upgrade_the_agent(tmp_path: Path) -> None:
    meta = _meta() | {"format": 2}
    (message,) = _problems(_write(tmp_path / "b", meta))
    assert "format 2" in message and "newer agent" in message


def test_not_json_and_not_an_object(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "bundle.json").write_text("{", encoding="utf-8")
    assert "cannot read JSON" in _problems(root)[0]
    (root / "bundle.json").write_text("[1, 2]", encoding="utf-8")
    assert "JSON object" in _problems(root)[0]


def test_a_symlink_that_leaves_the_bundle_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "b"
    shutil.copytree(LITE, root)
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(root / "model.int8.onnx", outside)
    (root / "model.int8.onnx").symlink_to(outside)
    (message,) = _problems(root)
    assert "backends.onnxruntime.path" in message and "outside the bundle" in message


def test_a_replaced_file_fails_its_digest(tmp_path: Path) -> None:
    root = tmp_path / "b"
    shutil.copytree(LITE, root)
    (root / "golden.npz").write_bytes(b"not the golden set")
    with pytest.raises(BundleError, match=r"golden: golden.npz has sha256 .* corrupted"):
        load_bundle(root)


def test_the_loaded_bundle_carries_the_manifest_values() -> None:
    manifest = BundleManifest.model_validate(_meta())
    assert BundleManifest.model_validate(json.loads(manifest.to_json())) == manifest
    bundle = load_bundle(LITE)
    assert bundle.input.shape == manifest.input.shape
    assert bundle.input.input_name == manifest.input.tensor_name
    assert bundle.output.scale == manifest.output.scale
    assert bundle.golden is not None and manifest.golden is not None
    assert bundle.golden.min_psnr_db == manifest.golden.min_psnr_db
