"""A 5 x 7 pixel bitmap font for labels drawn into images (capitals, digits, a little
punctuation), so that a PNG can carry its own captions without an imaging library."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

GLYPH_W, GLYPH_H = 5, 7
ADVANCE = GLYPH_W + 1  # one blank column between letters

# Each glyph: 7 rows of 5 pixels, top to bottom, "#" ink and "." blank.
_GLYPHS: dict[str, str] = {
    'A': ".###. #...# #...# ##### #...# #...# #...#",
    'B': "####. #...# #...# ####. #...# #...# ####.",
    'C': ".###. #...# #.... #.... #.... #...# .###.",
    'D': "####. #...# #...# #...# #...# #...# ####.",
    'E': "##### #.... #.... ####. #.... #.... #####",
    'F': "##### #.... #.... ####. #.... #.... #....",
    'G': ".###. #...# #.... #.### #...# #...# .####",
    'H': "#...# #...# #...# ##### #...# #...# #...#",
    'I': ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    'J': "..### ...#. ...#. ...#. ...#. #..#. .##..",
    'K': "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    'L': "#.... #.... #.... #.... #.... #.... #####",
    'M': "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    'N': "#...# #...# ##..# #.#.# #..## #...# #...#",
    'O': ".###. #...# #...# #...# #...# #...# .###.",
    'P': "####. #...# #...# ####. #.... #.... #....",
    'Q': ".###. #...# #...# #...# #.#.# #..#. .##.#",
    'R': "####. #...# #...# ####. #.#.. #..#. #...#",
    'S': ".#### #.... #.... .###. ....# ....# ####.",
    'T': "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    'U': "#...# #...# #...# #...# #...# #...# .###.",
    'V': "#...# #...# #...# #...# #...# .#.#. ..#..",
    'W': "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    'X': "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    'Y': "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    'Z': "##### ....# ...#. ..#.. .#... #.... #####",
    '0': ".###. #...# #..## #.#.# ##..# #...# .###.",
    '1': "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    '2': ".###. #...# ....# ...#. ..#.. .#... #####",
    '3': "####. ....# ....# .###. ....# ....# ####.",
    '4': "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    '5': "##### #.... ####. ....# ....# #...# .###.",
    '6': "..##. .#... #.... ####. #...# #...# .###.",
    '7': "##### ....# ...#. ..#.. .#... .#... .#...",
    '8': ".###. #...# #...# .###. #...# #...# .###.",
    '9': ".###. #...# #...# .#### ....# ...#. .##..",
    ' ': "..... ..... ..... ..... ..... ..... .....",
    "'": "..#.. ..#.. .#... ..... ..... ..... .....",
    '(': "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ')': ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    '+': "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    ',': "..... ..... ..... ..... .##.. ..#.. .#...",
    '-': "..... ..... ..... ##### ..... ..... .....",
    '.': "..... ..... ..... ..... ..... .##.. .##..",
    '/': "....# ...#. ...#. ..#.. .#... .#... #....",
    ':': "..... .##.. .##.. ..... .##.. .##.. .....",
    '=': "..... ..... ##### ..... ##### ..... .....",
    '|': "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
}
_BITMAPS: dict[str, npt.NDArray[np.bool_]] = {
    ch: np.array([[px == "#" for px in row] for row in rows.split()], dtype=bool)
    for ch, rows in _GLYPHS.items()
}


def supported(text: str) -> bool:
    """Whether every character of ``text`` can be drawn (lower case is drawn as capitals)."""
    return all(ch in _BITMAPS for ch in text.upper())


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """(height, width) in pixels of ``text`` drawn at ``scale``."""
    if not text:
        return GLYPH_H * scale, 0
    return GLYPH_H * scale, (len(text) * ADVANCE - 1) * scale


def render(text: str, scale: int = 1) -> npt.NDArray[np.bool_]:
    """``text`` as a boolean ink mask (height, width); each font pixel becomes a
    ``scale`` x ``scale`` block. Raises ValueError for a character the font lacks."""
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    missing = sorted({ch for ch in text.upper() if ch not in _BITMAPS})
    if missing:
        raise ValueError(f"the bitmap font has no glyph for {''.join(missing)!r}")
    height, width = text_size(text, 1)
    mask = np.zeros((height, width), dtype=bool)
    for i, ch in enumerate(text.upper()):
        mask[:, i * ADVANCE : i * ADVANCE + GLYPH_W] = _BITMAPS[ch]
    return np.kron(mask, np.ones((scale, scale), dtype=bool)).astype(bool)
