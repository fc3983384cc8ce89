"""Demo sample shipped in the agent wheel: the held-out slab of the MNI T1 template with its
simulated T2 reference -> agent/samples/mni152_t1w_slab.npz (+ NOTICE.txt).

Keys: ``t1`` uint16 [24, 256, 256] (T1 scaled so the slab maximum is 1000),
``t2_reference`` uint16 [24, 256, 256] (simulated T2 * 1000, CSF == 1000),
``spacing_mm`` float64 [3] = (row, column, slice), ``first_slice_z_mm`` float64 scalar.
Slice axes: rows = MNI x (left -> right), columns = MNI y (posterior -> anterior).
"""

from __future__ import annotations

import time

import numpy as np

from recipes import config
from recipes.notice import MNI_COPYRIGHT, SIMULATED_T2, TEMPLATE_SOURCE
from recipes.npz import save_npz
from recipes.timing import record_timing

SAMPLE_NPZ = config.SAMPLES_DIR / "mni152_t1w_slab.npz"
NOTICE = config.SAMPLES_DIR / "NOTICE.txt"
MAX_BYTES = 1_500_000


def to_uint16(values: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.clip(np.rint(values), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return out


def main() -> None:
    start = time.perf_counter()
    data = np.load(config.DATA_NPZ)
    idx = data["holdout_idx"]
    t1 = data["t1"][idx]
    t1_scale = 1000.0 / float(t1.max())
    config.SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    save_npz(
        SAMPLE_NPZ,
        t1=to_uint16(t1 * t1_scale),
        t2_reference=to_uint16(data["t2"][idx] * config.OUTPUT_SCALE),
        spacing_mm=np.array([1.0, 1.0, 1.0], dtype=np.float64),
        first_slice_z_mm=np.array(data["z_mm"][idx[0]], dtype=np.float64),
    )
    size = SAMPLE_NPZ.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{SAMPLE_NPZ} is {size} bytes, over the {MAX_BYTES} budget")
    r0, c0 = (int(v) for v in data["pad"])
    NOTICE.write_text(
        f"""mni152_t1w_slab.npz: {len(idx)} axial slices (MNI z {data["z_mm"][idx[0]]:+.0f} to \
{data["z_mm"][idx[-1]]:+.0f} mm, 1 mm apart) of the
{TEMPLATE_SOURCE}

Slices are 197 x 233 zero-padded (centred) to 256 x 256: {r0} rows and {c0} columns of padding
before the data. Rows run along MNI x (left to right), columns along MNI y (posterior to
anterior). 't1' is the template scaled so the slab maximum is 1000; 't2_reference' is the
simulated T2 (CSF = 1000). These slices were held out from training and calibration of the
reference models (t1w-to-t2w-lite, t1w-to-t2w-full).

{SIMULATED_T2}

Not for diagnostic use.

The MNI ICBM152 template is distributed under this notice:

{MNI_COPYRIGHT}
""",
        encoding="utf-8",
    )
    print(f"wrote {SAMPLE_NPZ} ({size} bytes) and {NOTICE.name}")
    record_timing("sample", time.perf_counter() - start)


if __name__ == "__main__":
    main()
