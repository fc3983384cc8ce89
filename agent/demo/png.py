"""A minimal grayscale PNG writer (no imaging library needed) and a montage helper."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def write_gray_png(path: Path, image: npt.NDArray[np.uint8]) -> None:
    """Write an 8-bit grayscale image."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {image.ndim}-D {image.dtype}")
    h, w = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(h))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )
    path.write_bytes(data)


def to_uint8(image: npt.NDArray[np.floating] | npt.NDArray[np.integer]) -> npt.NDArray[np.uint8]:
    """Window an image to 8 bits between its 1st and 99.5th percentile of non-zero pixels."""
    img = np.asarray(image, dtype=np.float32)
    nz = img[img > 0]
    lo, hi = (float(np.percentile(nz, 1)), float(np.percentile(nz, 99.5))) if nz.size else (0, 1)
    if hi <= lo:  # a flat image: show it mid-grey rather than black
        lo, hi = lo - 1, lo + 1
    return np.asarray(np.clip((img - lo) / (hi - lo) * 255.0, 0, 255), dtype=np.uint8)


def montage(rows: list[list[npt.NDArray[np.floating] | npt.NDArray[np.integer]]],
            gap: int = 4) -> npt.NDArray[np.uint8]:
    """Tile images (each windowed on its own) into one 8-bit image, row by row."""
    tiles = [[to_uint8(im) for im in row] for row in rows]
    h = max(t.shape[0] for row in tiles for t in row)
    w = max(t.shape[1] for row in tiles for t in row)
    ncols = max(len(row) for row in tiles)
    out = np.zeros((len(tiles) * (h + gap) - gap, ncols * (w + gap) - gap), dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = r * (h + gap), c * (w + gap)
            out[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return out
