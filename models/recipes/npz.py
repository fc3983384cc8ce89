"""np.savez_compressed with fixed zip timestamps, so an unchanged array set gives an
unchanged file (and sha256) on every build."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` as a compressed .npz readable by ``np.load``; the ``npz`` member
    names and array contents match what np.savez_compressed writes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
