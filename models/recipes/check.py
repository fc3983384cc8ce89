"""Verify the committed bundles and sample without rebuilding: digests (through the agent's
own loader), golden-set shapes, int8-vs-reference PSNR >= min_psnr_db, sample keys."""

from __future__ import annotations

import sys

import numpy as np

from recipes import config
from recipes.metrics import psnr
from recipes.runtime import make_session
from recipes.sample import SAMPLE_NPZ

sys.path.insert(0, str(config.MODELS_DIR.parent))
from agent.model.bundle import load_bundle


def check_bundle(spec: config.ModelSpec) -> str:
    bundle = load_bundle(spec.bundle_dir, verify=True)
    if bundle.input.context_slices != spec.context:
        raise SystemExit(f"{spec.name}: context_slices {bundle.input.context_slices}, "
                         f"the recipe says {spec.context}")
    norm = bundle.input.normalisation
    if (norm.method, norm.percentile, norm.clip_max) != (
        "robust_max",
        config.NORM_PERCENTILE,
        config.NORM_CLIP_MAX,
    ):
        raise SystemExit(f"bundle normalisation {norm} differs from the recipe's")
    assert bundle.golden is not None and bundle.reference is not None
    golden = np.load(bundle.golden.path)
    x, ref = golden["input"], golden["reference_output"]
    if x.shape != (4, spec.in_channels, config.GRID, config.GRID) or x.dtype != np.float32:
        raise SystemExit(f"golden input has shape {x.shape} {x.dtype}")
    if ref.shape != (4, 1, config.GRID, config.GRID) or ref.dtype != np.float32:
        raise SystemExit(f"golden reference_output has shape {ref.shape} {ref.dtype}")
    served = bundle.backend_file("onnxruntime").path
    got = make_session(served).run([bundle.output.output_name], {bundle.input.input_name: x})[0]
    rng = float(ref.max())
    worst = min(psnr(got, ref, rng), *(psnr(g, r, rng) for g, r in zip(got, ref, strict=True)))
    if worst < bundle.golden.min_psnr_db:
        raise SystemExit(f"{spec.name}: golden PSNR {worst:.2f} dB < floor "
                         f"{bundle.golden.min_psnr_db}")
    fp32 = make_session(bundle.reference.path).run(["output"], {"input": x})[0]
    if not np.allclose(fp32, ref, atol=1e-4):
        raise SystemExit("fp32 reference model does not reproduce golden reference_output")
    return (f"{bundle.name} {bundle.version}: golden int8-vs-fp32 PSNR {worst:.2f} dB "
            f">= {bundle.golden.min_psnr_db} dB")


def main() -> None:
    lines = [check_bundle(spec) for spec in config.SHIPPED.values()]
    sample = np.load(SAMPLE_NPZ)
    for key, dtype, shape in (
        ("t1", np.uint16, (config.HOLDOUT_COUNT, config.GRID, config.GRID)),
        ("t2_reference", np.uint16, (config.HOLDOUT_COUNT, config.GRID, config.GRID)),
        ("spacing_mm", np.float64, (3,)),
        ("first_slice_z_mm", np.float64, ()),
    ):
        if sample[key].dtype != dtype or sample[key].shape != shape:
            raise SystemExit(f"sample {key}: {sample[key].dtype} {sample[key].shape}")
    print("ok: " + "; ".join(lines) + f"; sample {SAMPLE_NPZ.name} well-formed")


if __name__ == "__main__":
    main()
