"""A minimal grayscale PNG writer (no imaging library needed) and a montage helper that
labels its columns in the image itself."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.demo import bitmap_font

LABEL_MARGIN = 4  # pixels above and below a column label


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
            gap: int = 4, labels: list[str] | None = None) -> npt.NDArray[np.uint8]:
    """Tile images (each windowed on its own) into one 8-bit image, row by row.

    ``labels``: one caption per column, drawn in white above it (bitmap font, twice its
    size where it fits the column, else at its own size; ValueError if not even that)."""
    tiles = [[to_uint8(im) for im in row] for row in rows]
    h = max(t.shape[0] for row in tiles for t in row)
    w = max(t.shape[1] for row in tiles for t in row)
    ncols = max(len(row) for row in tiles)
    if labels is not None and len(labels) != ncols:
        raise ValueError(f"{len(labels)} labels for {ncols} columns")
    scale = _label_scale(labels, w) if labels else 0
    top = bitmap_font.GLYPH_H * scale + 2 * LABEL_MARGIN if labels else 0
    out = np.zeros((top + len(tiles) * (h + gap) - gap, ncols * (w + gap) - gap), dtype=np.uint8)
    for c, label in enumerate(labels or []):
        ink = bitmap_font.render(label, scale)
        x = c * (w + gap) + (w - ink.shape[1]) // 2
        out[LABEL_MARGIN : LABEL_MARGIN + ink.shape[0], x : x + ink.shape[1]][ink] = 255
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = top + r * (h + gap), c * (w + gap)
            out[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return out


def _label_scale(labels: list[str], width: int) -> int:
    widest = max(bitmap_font.text_size(label)[1] for label in labels)
    if widest > width:
        raise ValueError(f"a label is {widest} pixels wide, the columns {width}")
    return 2 if 2 * widest <= width else 1
