"""A model refused at start says why and what to do, through the commands a site engineer
runs (``run``, ``config check``, ``model verify``, ``demo``).

The shipped bundles pass on every CPU, so the case of a CPU whose int8 kernels give less
than the build machine's is made deterministically: a copy of the lite bundle whose
onnxruntime int8 file has one weight scale off (a real int8 file that misses the floor
here) and whose bundle.json gives that file's sha256 (so the file is "the one it was
built with") and keeps the figure recorded at build time. Then:

* recorded figure >= floor, less here: this CPU's kernels; the fix names LiteRT, which
  passes here, and ``backend = "auto"``, and the bundle is not called drifted;
* recorded figure < floor: the bundle never passed: rebuild;
* no recorded figure: it says it cannot tell, and still names what passes here;
* the file's bytes changed but not bundle.json (sha256 mismatch): reinstall.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from tests.bundles import MODELS_DIR, corrupt_weight_scale

REPO = Path(__file__).resolve().parents[2]
LITE = MODELS_DIR / "t1w-to-t2w-lite"
URL = "mqtt://127.0.0.1:9"  # never reached: every case here stops before connecting


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _meta(bundle: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((bundle / "bundle.json").read_text())
    return meta


def _write_meta(bundle: Path, meta: dict[str, Any]) -> None:
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2))


def saturating_copy(root: Path, *, recorded: float | None = 53.16,
                    sha_updated: bool = True) -> Path:
    """The lite bundle with an onnxruntime int8 file that misses the floor on this CPU."""
    shutil.copytree(LITE, root)
    corrupt_weight_scale(root / "model.int8.onnx", root / "model.int8.onnx")
    meta = _meta(root)
    if sha_updated:
        meta["backends"]["onnxruntime"]["sha256"] = _sha(root / "model.int8.onnx")
    if recorded is None:
        meta["golden"].pop("recorded_psnr_db")
        meta["golden"].pop("recorded_cpu")
    else:
        meta["golden"]["recorded_psnr_db"]["onnxruntime"] = recorded
    _write_meta(root, meta)
    return root


def node(tmp_path: Path, bundle: Path, backend: str = "onnxruntime") -> Path:
    """``init`` a node for ``bundle`` and pin ``model.backend``."""
    assert main(["init", str(tmp_path / "node"), "--edge-url", URL, "--cloud-url", URL,
                 "--bundle", str(bundle)]) == 0
    config = tmp_path / "node" / "agent.toml"
    text = config.read_text().replace('backend = "auto"', f'backend = "{backend}"')
    config.write_text(text.replace('format = "auto"', 'format = "json"'))
    return config


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _event(stderr: str, name: str) -> dict[str, Any]:
    for line in stderr.splitlines():
        event = json.loads(line)  # JSON logging: every line is one event
        if event["event"] == name:
            return dict(event)
    raise AssertionError(f"no {name} event in:\n{stderr}")


def test_this_cpus_kernels_are_told_apart_from_drift(tmp_path: Path) -> None:
    config = node(tmp_path, saturating_copy(tmp_path / "bundle"))
    r = cli("run", "--config", str(config))
    assert r.returncode == 2, r.stderr
    refused = _event(r.stderr, "model_refused")
    assert refused["cause"] == "this_cpu"
    assert "misses its fidelity floor on this CPU" in refused["reason"]
    assert "gave 53.16 dB there on AMD EPYC" in refused["reason"]  # the build's CPU
    assert "has not drifted" in refused["reason"] and "reinstall" not in refused["reason"]
    litert = _meta(LITE)["golden"]["recorded_psnr_db"]["litert"]  # as on the build's CPU
    assert f'model.backend = "litert" (it passes on this CPU: {litert:.2f} dB)' in refused["fix"]
    assert '"auto"' in refused["fix"]
    assert "do not serve it, rebuild or reinstall" not in r.stderr

    # config check without --guard says it did not run the guard; with it, the refusal
    r = cli("config", "check", str(config))
    assert r.returncode == 0, r.stderr
    assert "the int8 accuracy guard was not run" in r.stdout and "--guard" in r.stdout
    r = cli("config", "check", "--guard", str(config))
    assert r.returncode == 2
    assert "refused by the accuracy guard" in r.stderr and 'model.backend = "litert"' in r.stderr

    # backend = "auto" serves it on this CPU (LiteRT, or an fp32 file where faster)
    config.write_text(config.read_text().replace('backend = "onnxruntime"', 'backend = "auto"'))
    r = cli("config", "check", "--guard", str(config))
    assert r.returncode == 0, r.stderr
    assert "guard: litert" in r.stdout or "guard: onnxruntime fp32" in r.stdout, r.stdout


def test_a_bundle_that_never_passed_is_to_be_rebuilt(tmp_path: Path) -> None:
    config = node(tmp_path, saturating_copy(tmp_path / "bundle", recorded=31.4))
    r = cli("run", "--config", str(config))
    assert r.returncode == 2, r.stderr
    refused = _event(r.stderr, "model_refused")
    assert refused["cause"] == "never_passed"
    assert "records 31.40 dB for it at build time" in refused["reason"]
    assert refused["fix"].startswith("rebuild the bundle") and "litert" not in refused["fix"]


def test_without_recorded_figures_it_says_it_cannot_tell(tmp_path: Path) -> None:
    config = node(tmp_path, saturating_copy(tmp_path / "bundle", recorded=None))
    r = cli("run", "--config", str(config))
    assert r.returncode == 2, r.stderr
    refused = _event(r.stderr, "model_refused")
    assert refused["cause"] == "unknown" and "cannot tell" in refused["reason"]
    assert 'model.backend = "litert"' in refused["fix"]  # what passes here is still named


def test_a_changed_file_is_to_be_reinstalled(tmp_path: Path) -> None:
    bundle = saturating_copy(tmp_path / "bundle")
    config = node(tmp_path, bundle)  # init verifies the digests: the file changes after it
    corrupt_weight_scale(bundle / "model.int8.onnx", bundle / "model.int8.onnx")
    r = cli("run", "--config", str(config))
    assert r.returncode == 2, r.stderr
    error = _event(r.stderr, "cannot_start")["error"]
    assert "model.int8.onnx has sha256" in error and "corrupted or replaced" in error
    assert error.startswith(f"model.bundle {bundle}: ")  # which bundle
    assert "reinstall the bundle" in error
    r = cli("config", "check", str(config))
    assert r.returncode == 2 and "reinstall the bundle" in r.stderr


def test_model_verify_prints_the_cause(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bundle = saturating_copy(tmp_path / "bundle")
    assert main(["model", "verify", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: " in out and "this CPU's int8 kernels in onnxruntime" in out
    assert main(["model", "verify", str(bundle), "--runtime", "litert"]) == 0


def test_demo_with_a_bundle_that_cannot_serve_is_one_line(tmp_path: Path) -> None:
    """No runtime x precision passes (only the broken int8 file is left): the agent exits 2
    at start and the demo says why in one line, without a traceback."""
    bundle = saturating_copy(tmp_path / "bundle")
    meta = _meta(bundle)
    meta["backends"].pop("litert")
    meta.pop("reference")
    meta.pop("references")
    _write_meta(bundle, meta)
    r = cli("demo", "--workdir", str(tmp_path / "demo"), "--slices", "1", "--bundle",
            str(bundle))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert "the agent exited with status 2 before it connected: model_refused" in errors[0]
    assert "no runtime serves" in errors[0] and "agent.log" in errors[0]

    r = cli("demo", "--workdir", str(tmp_path / "demo"), "--bundle", str(tmp_path / "nope"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: --bundle") and "no such directory" in r.stderr
