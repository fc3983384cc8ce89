"""The family side by side: lite (2D) vs full (2.5D) on the same held-out slices, every
runtime x precision -> the measured block of models/README.md.

Gates (the build fails otherwise): the full model is at least 1 dB PSNR (brain) better
than lite, fp32 against fp32 and int8 against int8 on onnxruntime, and its through-plane
MAE is lower (recipes/evaluate.py defines it).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from recipes import config
from recipes.model_card import RUNTIME_LABELS, machine_line, precision_label
from recipes.timing import load_timings, record_timing

README = config.MODELS_DIR / "README.md"
README_BEGIN = "<!-- measured:begin -->"
README_END = "<!-- measured:end -->"
MIN_GAIN_DB = 1.0


def table(evals: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| model | precision | runtime | GMAC / slice | size | latency / slice | PSNR brain "
        "| SSIM brain | MAE brain | through-plane MAE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ev in evals.items():
        for key, m in ev["models"].items():
            rows.append(
                f"| {name} | {precision_label(ev, key)} | {RUNTIME_LABELS[m['runtime']]} "
                f"| {ev['gmac_per_slice']:.2f} | {m['size_bytes'] / 1024:.0f} KiB "
                f"| {m['latency_ms']:.1f} ms | {m['psnr_brain_db']:.2f} dB "
                f"| {m['ssim_brain']:.4f} | {m['mae_brain']:.4f} | {m['through_plane_mae']:.4f} |"
            )
    return "\n".join(rows)


def gates(lite: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"min_gain_db": MIN_GAIN_DB}
    ok = True
    for precision in ("fp32", "int8"):
        key = f"onnxruntime_{precision}"
        a, b = lite["models"][key], full["models"][key]
        gain = round(b["psnr_brain_db"] - a["psnr_brain_db"], 2)
        consistency = round(a["through_plane_mae"] - b["through_plane_mae"], 5)
        out[precision] = {"psnr_gain_db": gain, "through_plane_mae_improvement": consistency}
        ok = ok and gain >= MIN_GAIN_DB and consistency > 0
    out["passed"] = ok
    return out


def _share(lite: dict[str, Any], full: dict[str, Any], precision: str) -> str:
    a = lite["models"][f"onnxruntime_{precision}"]["through_plane_mae"]
    b = full["models"][f"onnxruntime_{precision}"]["through_plane_mae"]
    return f"{a - b:.4f} ({(a - b) / a * 100:.0f} %)"


def update_readme(block_text: str) -> None:
    """Replace the block between the README markers."""
    text = README.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{README} lacks the {README_BEGIN} ... {README_END} block")
    block = f"{README_BEGIN}\n{block_text}\n{README_END}"
    README.write_text(pattern.sub(lambda _m: block, text), encoding="utf-8")


def main() -> None:
    start = time.perf_counter()
    evals = {name: json.loads(spec.build("eval.json").read_text(encoding="utf-8"))
             for name, spec in config.SHIPPED.items()}
    lite, full = evals[config.LITE.name], evals[config.FULL.name]
    verdict = gates(lite, full)
    config.BUILD_DIR.joinpath("compare.json").write_text(json.dumps(verdict, indent=2) + "\n",
                                                         encoding="utf-8")
    record_timing("compare", time.perf_counter() - start)
    builds = []
    for name in evals:
        timings = load_timings(name)
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        builds.append(f"{name}: {sum(timings.values()) / 60:.1f} min ({steps})")
    g = verdict
    z0, z1 = lite["holdout_z_mm"]
    update_readme(
        table(evals)
        + f"\n\nHeld-out slab: {lite['holdout_slices']} axial slices, MNI z {z0:+.0f} to "
        f"{z1:+.0f} mm, the same for both models. full vs lite (onnxruntime): PSNR "
        f"{g['fp32']['psnr_gain_db']:+.2f} dB (fp32) and {g['int8']['psnr_gain_db']:+.2f} dB "
        f"(int8); through-plane MAE lower by {_share(lite, full, 'fp32')} (fp32) and "
        f"{_share(lite, full, 'int8')} (int8). "
        f"Machine: {machine_line()}.\n\nLast build, wall time on 2 cores (train, export and "
        "export_tflite as recorded in `records/` when the bundles were re-quantized "
        "without training, `make requantize`): "
        + "; ".join(builds) + "."
    )
    print(json.dumps(verdict, indent=2))
    if not verdict["passed"]:
        raise SystemExit("the full model does not beat lite by the gates (build/compare.json)")


if __name__ == "__main__":
    main()
