"""Tests for agent.png: the grayscale PNG writer (decoded by hand) and the montage helper."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from agent.demo import bitmap_font
from agent.demo.png import LABEL_MARGIN, montage, to_uint8, write_gray_png

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == SIGNATURE
    pos, out = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        out.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    return out


def _decode(path: Path) -> np.ndarray:
    chunks = _chunks(path.read_bytes())
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    w, h, depth, color, compression, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, compression, filt, interlace) == (8, 0, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == h * (w + 1)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all()  # filter type None on every scanline
    return rows[:, 1:]


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 4), (64, 64)])
def test_write_gray_png_round_trip(tmp_path: Path, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "out.png"
    write_gray_png(path, image)
    data = path.read_bytes()
    assert data.startswith(SIGNATURE)
    w, h = struct.unpack(">II", data[16:24])  # IHDR width, height
    assert (h, w) == shape
    np.testing.assert_array_equal(_decode(path), image)


def test_non_contiguous_views_are_written_correctly(tmp_path: Path) -> None:
    base = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10)
    for view in (base.T, base[::2, ::3], base[:, ::-1]):
        path = tmp_path / "view.png"
        write_gray_png(path, view)
        np.testing.assert_array_equal(_decode(path), view)


def test_to_uint8_windows_on_nonzero_percentiles() -> None:
    image = np.zeros((10, 10), dtype=np.float32)
    image[2:8, 2:8] = np.linspace(100.0, 1100.0, 36).reshape(6, 6)
    out = to_uint8(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert (out[image == 0] == 0).all()
    assert out[2, 2] == 0  # the 1st percentile maps to black
    assert out[7, 7] == 255  # beyond the 99.5th percentile: clipped white
    assert np.all(np.diff(out[2:8, 2:8].ravel().astype(int)) >= 0)  # monotonic


def test_to_uint8_degenerate_images() -> None:
    assert (to_uint8(np.zeros((4, 4))) == 0).all()
    flat = to_uint8(np.full((4, 4), 7, dtype=np.int16))
    assert flat.dtype == np.uint8 and len(np.unique(flat)) == 1


def _ramp(h: int, w: int, scale: float) -> np.ndarray:
    return np.arange(1, h * w + 1, dtype=np.float64).reshape(h, w) * scale


def test_montage_shape_and_placement() -> None:
    a, b, c = _ramp(10, 20, 1.0), _ramp(12, 8, 50.0), _ramp(5, 5, 0.01)
    out = montage([[a, b], [c]], gap=4)
    cell_h, cell_w = 12, 20  # the largest tile sets the cell size
    assert out.dtype == np.uint8
    assert out.shape == (2 * cell_h + 4, 2 * cell_w + 4)
    # Each tile is windowed on its own and placed at the top left of its cell.
    np.testing.assert_array_equal(out[:10, :20], to_uint8(a))
    np.testing.assert_array_equal(out[:12, 24:32], to_uint8(b))
    np.testing.assert_array_equal(out[16:21, :5], to_uint8(c))
    for tile in (to_uint8(a), to_uint8(b), to_uint8(c)):
        assert tile.min() == 0 and tile.max() == 255
    mask = np.zeros(out.shape, dtype=bool)
    mask[:10, :20] = mask[:12, 24:32] = mask[16:21, :5] = True
    assert not out[~mask].any()  # padding, gaps and the empty cell are black


@pytest.mark.parametrize(("rows", "gap", "shape"), [
    ([[np.ones((8, 8))]], 4, (8, 8)),
    ([[np.ones((8, 8))] * 3], 2, (8, 28)),
    ([[np.ones((8, 8))]] * 3, 0, (24, 8)),
])
def test_montage_shapes(rows: list[list[np.ndarray]], gap: int,
                        shape: tuple[int, int]) -> None:
    assert montage(rows, gap=gap).shape == shape


def test_montage_png_end_to_end(tmp_path: Path) -> None:
    y, x = np.mgrid[0:32, 0:48]
    image = montage([[x.astype(float) + 1, y.astype(float) + 1]])
    write_gray_png(tmp_path / "m.png", image)
    np.testing.assert_array_equal(_decode(tmp_path / "m.png"), image)


def test_montage_labels_its_columns_in_the_image(tmp_path: Path) -> None:
    tiles = [[_ramp(20, 60, 1.0), _ramp(20, 60, 2.0)], [_ramp(20, 60, 3.0), _ramp(20, 60, 4.0)]]
    plain = montage(tiles, gap=4)
    out = montage(tiles, gap=4, labels=["T1W", "OUT 2"])
    band = bitmap_font.GLYPH_H * 2 + 2 * LABEL_MARGIN  # "OUT 2" fits at twice the size
    assert out.shape == (plain.shape[0] + band, plain.shape[1])
    np.testing.assert_array_equal(out[band:], plain)  # the tiles, moved down
    for col, label in enumerate(["T1W", "OUT 2"]):
        ink = bitmap_font.render(label, 2)
        x = col * 64 + (60 - ink.shape[1]) // 2  # centred over its column
        drawn = out[LABEL_MARGIN : LABEL_MARGIN + ink.shape[0], x : x + ink.shape[1]]
        np.testing.assert_array_equal(drawn == 255, ink)
    assert int((out[:band] == 255).sum()) == sum(
        int(bitmap_font.render(t, 2).sum()) for t in ["T1W", "OUT 2"])  # nothing else
    write_gray_png(tmp_path / "m.png", out)
    np.testing.assert_array_equal(_decode(tmp_path / "m.png"), out)


def test_montage_labels_shrink_to_fit_or_are_refused() -> None:
    tiles = [[np.ones((8, 40))]]
    label = "ABCDEF"  # 35 pixels at size 1, 70 at size 2
    out = montage(tiles, labels=[label])
    assert out.shape[0] == 8 + bitmap_font.GLYPH_H + 2 * LABEL_MARGIN
    with pytest.raises(ValueError, match="wide"):
        montage(tiles, labels=["ABCDEFGH"])  # 47 pixels
    with pytest.raises(ValueError, match="labels"):
        montage(tiles, labels=["A", "B"])
