"""``--tflite``: LiteRT files from the float ONNX model, with onnx2tf (ONNX -> TensorFlow ->
TFLite, channels-last) in a subprocess.

The converter is heavy (tensorflow-cpu is about 1.3 GB installed), so it lives in the
``convert`` extra and is only looked for, never imported, by the agent: it runs as
``python -m onnx2tf`` in a child process, which also keeps TensorFlow's threads, memory and
logging out of this one. onnx2tf quantizes with TensorFlow Lite's own post-training
calibration (full integer: int8 weights per channel, int8 activations and int8 I/O, which
the agent's LiteRT runner scales), fed with the same calibration inputs as the ONNX model.
Its node choices are its own: the sensitivity pass applies to the ONNX model only. The int8
file is judged like the ONNX one, through the agent's LiteRT runner and guard, and must
reach the same floor plus margin.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.backends import INSTALL_HINTS, runtime_installed
from agent.quantize.errors import CONVERT_EXTRA_HINT, BadInput, FloorNotReached, QuantizeError
from agent.quantize.report import db_value

CONVERTER_TIMEOUT_S = 1800
FP32_MATCH_DB = 60.0  # the fp32 TFLite must reproduce the fp32 ONNX model at least this well


def converter_installed() -> bool:
    """Whether onnx2tf and TensorFlow can be imported (found without importing them)."""
    return all(importlib.util.find_spec(p) is not None for p in ("onnx2tf", "tensorflow"))


def require_converter() -> None:
    """Fail up front, naming the extra, when ``--tflite`` cannot be honoured."""
    if not converter_installed():
        raise BadInput("--tflite needs the ONNX -> TFLite converter (onnx2tf with "
                       f"tensorflow-cpu, about 1.5 GB), which is not installed: run "
                       f"`{CONVERT_EXTRA_HINT}`, or quantize without --tflite")
    if not runtime_installed("litert"):
        raise BadInput("--tflite checks the converted model on LiteRT, which is not "
                       f"installed: run `{INSTALL_HINTS['litert']}`")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _convert(fp32: Path, work: Path, input_name: str,
             calibration: Sequence[npt.NDArray[np.float32]]) -> Path:
    out = work / "tflite"
    model = work / "model.onnx"  # onnx2tf names its files after the model file
    shutil.copyfile(fp32, model)
    nhwc = np.stack(calibration).transpose(0, 2, 3, 1).astype(np.float32)
    data = work / "tflite-calibration.npy"
    np.save(data, nhwc)
    c, h, w = calibration[0].shape
    zeros, ones = str([[[[0.0] * c]]]), str([[[[1.0] * c]]])  # data is already normalised
    cmd = [sys.executable, "-m", "onnx2tf", "-i", str(model), "-o", str(out), "-n",
           "-ois", f"{input_name}:1,{c},{h},{w}", "-coion", "-oiqt",
           "-cind", input_name, str(data), zeros, ones]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                              timeout=CONVERTER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise QuantizeError(f"--tflite: onnx2tf ran past {CONVERTER_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise QuantizeError(f"--tflite: onnx2tf failed (exit {done.returncode}):\n{tail}")
    return out


def export_tflite(fp32: Path, work: Path, stage: Path, input_name: str,
                  calibration: Sequence[npt.NDArray[np.float32]],
                  judge: Callable[[Path, list[str], str], Any], target: float) -> dict[str, Any]:
    """Write ``model.fp32.tflite`` and ``model.int8.tflite`` into ``stage`` and judge them;
    ``judge(path, float_nodes, runtime)`` is the quantize run's guard on a candidate."""
    started = time.perf_counter()
    out = _convert(fp32, work, input_name, calibration)
    files = {"fp32": out / "model_float32.tflite", "int8": out / "model_full_integer_quant.tflite"}
    missing = [str(p.name) for p in files.values() if not p.is_file()]
    if missing:
        raise QuantizeError(f"--tflite: onnx2tf did not write {', '.join(missing)}")
    fp32_judged = judge(files["fp32"], [], "litert")
    if fp32_judged.worst_db < FP32_MATCH_DB:
        raise QuantizeError(f"--tflite: the converted fp32 TFLite model differs from the ONNX "
                            f"model ({fp32_judged.worst_db:.1f} dB < {FP32_MATCH_DB:g} dB): "
                            "the conversion is not faithful")
    int8 = judge(files["int8"], [], "litert")
    if int8.worst_db < target:
        raise FloorNotReached(f"--tflite: the int8 TFLite model reaches {int8.worst_db:.2f} dB "
                              f"worst-case PSNR against fp32, below the floor + margin "
                              f"{target:g} dB (the ONNX model passed): quantize without "
                              "--tflite, or lower the floor in the contract")
    shutil.copyfile(files["fp32"], stage / "model.fp32.tflite")
    shutil.copyfile(files["int8"], stage / "model.int8.tflite")
    tf = _version("tensorflow-cpu") if _version("tensorflow") == "?" else _version("tensorflow")
    return {"ok": True, "converter": f"onnx2tf {_version('onnx2tf')}, tensorflow {tf}",
            "quantization": "TFLite full integer (int8 I/O), per-channel weights",
            "fp32_vs_onnx_worst_psnr_db": db_value(fp32_judged.worst_db),
            "int8": int8.step(target), "seconds": round(time.perf_counter() - started, 1)}
