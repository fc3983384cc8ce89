"""A scatter plot as a PNG with numpy alone (no plotting library in the project): score (log
scale) against PSNR drop, the agent's own PNG writer and bitmap font for the labels."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from recipes import config

sys.path.insert(0, str(config.MODELS_DIR.parent))
from agent.demo import bitmap_font
from agent.demo.png import write_gray_png

W, H = 720, 480
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 36, 50
DROP_RANGE = (-2.0, 20.0)
SCORE_RANGE = (0.05, 100.0)


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: int = 1) -> None:
    glyphs = bitmap_font.render(text.upper(), scale)
    h, w = glyphs.shape
    h, w = min(h, canvas.shape[0] - y), min(w, canvas.shape[1] - x)
    if h > 0 and w > 0:
        canvas[y:y + h, x:x + w][glyphs[:h, :w]] = 0


def _px(drop: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fx = (np.clip(drop, *DROP_RANGE) - DROP_RANGE[0]) / (DROP_RANGE[1] - DROP_RANGE[0])
    lo, hi = np.log10(SCORE_RANGE[0]), np.log10(SCORE_RANGE[1])
    fy = (np.log10(np.clip(score, *SCORE_RANGE)) - lo) / (hi - lo)
    x = LEFT + fx * (W - LEFT - RIGHT)
    y = H - BOTTOM - fy * (H - TOP - BOTTOM)
    return np.round(x).astype(int), np.round(y).astype(int)


def scatter_png(path: Path, drop: np.ndarray, score: np.ndarray, shifted: np.ndarray, *,
                title: str) -> None:
    """Shifted slices as dark dots, in-distribution ones as hollow squares; dashed lines at
    score 1.0 and at a 2 dB drop."""
    canvas = np.full((H, W), 255, dtype=np.uint8)
    x0, y0 = _px(np.array([DROP_RANGE[0]]), np.array([SCORE_RANGE[0]]))
    x1, y1 = _px(np.array([DROP_RANGE[1]]), np.array([SCORE_RANGE[1]]))
    canvas[y1[0]:y0[0] + 1, x0[0]] = 0
    canvas[y0[0], x0[0]:x1[0] + 1] = 0
    for d in range(-2, 21, 2):  # x ticks
        tx, _ = _px(np.array([float(d)]), np.array([1.0]))
        canvas[y0[0]:y0[0] + 5, tx[0]] = 0
        _text(canvas, str(d), tx[0] - 6, y0[0] + 8)
    for s in (0.1, 1.0, 10.0, 100.0):  # y ticks
        _, ty = _px(np.array([0.0]), np.array([s]))
        canvas[ty[0], x0[0] - 5:x0[0]] = 0
        _text(canvas, f"{s:g}", 8, ty[0] - 3)
    _, one = _px(np.array([0.0]), np.array([1.0]))
    canvas[one[0], x0[0]:x1[0]:6] = 90
    two, _ = _px(np.array([2.0]), np.array([1.0]))
    canvas[y1[0]:y0[0]:6, two[0]] = 90
    px, py = _px(drop, score)
    for cx, cy, is_shift in zip(px, py, shifted, strict=True):
        if is_shift:
            canvas[max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2] = 0
        else:
            canvas[cy - 2:cy + 3, cx - 2] = canvas[cy - 2:cy + 3, cx + 2] = 120
            canvas[cy - 2, cx - 2:cx + 3] = canvas[cy + 2, cx - 2:cx + 3] = 120
    _text(canvas, title, LEFT, 10, 2 if bitmap_font.text_size(title, 2)[1] < W - LEFT else 1)
    _text(canvas, "PSNR drop of the output, dB", W // 2 - 100, H - 18)
    _text(canvas, "score", 8, TOP - 14)
    write_gray_png(path, canvas)
