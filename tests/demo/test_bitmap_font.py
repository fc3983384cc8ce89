"""agent.demo.bitmap_font: glyph sizes, spacing, scaling and what it refuses."""

from __future__ import annotations

import string

import numpy as np
import pytest

from agent.demo import bitmap_font
from agent.demo.bitmap_font import ADVANCE, GLYPH_H, GLYPH_W, render, supported, text_size


def test_every_capital_and_digit_has_a_distinct_glyph() -> None:
    chars = string.ascii_uppercase + string.digits
    glyphs = [render(ch) for ch in chars]
    assert all(g.shape == (GLYPH_H, GLYPH_W) and g.any() for g in glyphs)
    assert len({g.tobytes() for g in glyphs}) == len(chars)
    assert supported(chars + " -.,:()/|+='") and not supported("é") and not supported("_")


def test_a_glyph_drawn_by_hand() -> None:
    want = np.array([[c == "#" for c in row] for row in
                     [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]])
    np.testing.assert_array_equal(render("I"), want)


def test_spacing_scale_and_lower_case() -> None:
    two = render("T1", 1)
    assert two.shape == text_size("T1") == (GLYPH_H, 2 * ADVANCE - 1)
    assert not two[:, GLYPH_W].any()  # the blank column between letters
    np.testing.assert_array_equal(two[:, ADVANCE:], render("1"))
    big = render("T1", 3)
    assert big.shape == text_size("T1", 3)
    np.testing.assert_array_equal(big[::3, ::3], two)
    np.testing.assert_array_equal(render("t2w"), render("T2W"))
    assert render("").shape == (GLYPH_H, 0) and not render("   ").any()


def test_refuses_what_it_cannot_draw() -> None:
    with pytest.raises(ValueError, match="no glyph"):
        render("T1_w")
    with pytest.raises(ValueError, match="scale"):
        render("A", 0)
    assert bitmap_font.ADVANCE == GLYPH_W + 1
