"""Model-grid geometry and normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from agent.model.bundle import InputContract, Normalisation
from agent.model.preprocess import from_model_grid, normalise, to_model_grid

CONTRACT = InputContract(modality="MR", shape=(256, 256), pixel_spacing_mm=(1.0, 1.0))


def smooth(rows: int, cols: int, spacing: tuple[float, float]) -> np.ndarray:
    """A smooth head-like image defined in millimetres about the image centre."""
    y = (np.arange(rows) - (rows - 1) / 2) * spacing[0]
    x = (np.arange(cols) - (cols - 1) / 2) * spacing[1]
    yy, xx = np.meshgrid(y, x, indexing="ij")
    image = 1000 * np.exp(-(xx**2 + yy**2) / (2 * 70.0**2)) + 150 * np.cos(xx / 23) * np.sin(
        yy / 31
    )
    return (image + 300).astype(np.float32)


def ramp(rows: int, cols: int, spacing: tuple[float, float]) -> np.ndarray:
    """Physical row coordinate (mm from the image centre) times 3 plus the column one."""
    y = (np.arange(rows) - (rows - 1) / 2) * spacing[0]
    x = (np.arange(cols) - (cols - 1) / 2) * spacing[1]
    return (3 * y[:, None] + x[None, :]).astype(np.float32)


def test_equal_spacing_256_is_exact_identity() -> None:
    image = smooth(256, 256, (1.0, 1.0))
    grid, gmap = to_model_grid(image, (1.0, 1.0), CONTRACT)
    assert grid.dtype == np.float32 and grid.shape == (256, 256)
    np.testing.assert_array_equal(grid, image)
    np.testing.assert_array_equal(from_model_grid(grid, gmap), image)
    assert gmap.in_shape == (256, 256) and gmap.model_shape == (256, 256)


def test_spacing_within_tolerance_skips_resampling() -> None:
    image = smooth(256, 256, (1.0, 1.0))
    grid, gmap = to_model_grid(image, (1.0005, 0.9995), CONTRACT)
    np.testing.assert_array_equal(grid, image)
    assert gmap.rows.ratio == 1.0 == gmap.cols.ratio


@pytest.mark.parametrize(
    ("size", "spacing", "tolerance"),
    [
        (320, 0.8, 0.002),
        (512, 0.5, 0.004),
        (384, 0.6, 0.006),
        (256, 0.9, 0.004),
        (192, 1.25, 0.002),
        (512, 0.45, 0.006),
    ],
)
def test_round_trip_reproduces_smooth_image(size: int, spacing: float, tolerance: float) -> None:
    image = smooth(size, size, (spacing, spacing))
    grid, gmap = to_model_grid(image, (spacing, spacing), CONTRACT)
    assert grid.shape == CONTRACT.shape
    back = from_model_grid(grid, gmap)
    assert back.shape == image.shape and back.dtype == np.float32
    error = np.abs(back - image).max() / image.max()
    assert error < tolerance, error


def test_resampling_keeps_the_image_centre_and_millimetres() -> None:
    # Bilinear interpolation reproduces a linear ramp exactly away from the edges.
    spacing = (0.8, 0.8)
    grid, gmap = to_model_grid(ramp(320, 320, spacing), spacing, CONTRACT)
    expected = ramp(256, 256, CONTRACT.pixel_spacing_mm)
    np.testing.assert_allclose(grid[2:-2, 2:-2], expected[2:-2, 2:-2], atol=1e-3)
    assert gmap.rows.resampled_size == 256 and gmap.rows.offset == 0


def test_anisotropic_non_square_input() -> None:
    spacing = (1.2, 0.7)
    image = smooth(200, 320, spacing)
    grid, gmap = to_model_grid(image, spacing, CONTRACT)
    assert grid.shape == (256, 256)
    assert (gmap.rows.resampled_size, gmap.cols.resampled_size) == (240, 224)
    expected = ramp(256, 256, (1.0, 1.0))
    ramp_grid, _ = to_model_grid(ramp(200, 320, spacing), spacing, CONTRACT)
    inner = (slice(12, -12), slice(20, -20))  # inside the resampled field of view
    np.testing.assert_allclose(ramp_grid[inner], expected[inner], atol=1e-3)
    back = from_model_grid(grid, gmap)
    assert np.abs(back - image).max() / image.max() < 0.005


def test_small_matrix_is_centre_padded_with_zeros() -> None:
    image = smooth(200, 200, (1.0, 1.0))
    grid, gmap = to_model_grid(image, (1.0, 1.0), CONTRACT)
    assert gmap.rows.offset == 28
    np.testing.assert_array_equal(grid[28:228, 28:228], image)
    assert not grid[:28].any() and not grid[228:].any()
    assert not grid[:, :28].any() and not grid[:, 228:].any()
    np.testing.assert_array_equal(from_model_grid(grid, gmap), image)


def test_large_matrix_is_centre_cropped_and_restored_with_zeros() -> None:
    image = smooth(384, 384, (1.0, 1.0))
    grid, gmap = to_model_grid(image, (1.0, 1.0), CONTRACT)
    np.testing.assert_array_equal(grid, image[64:320, 64:320])
    back = from_model_grid(grid, gmap)
    np.testing.assert_array_equal(back[64:320, 64:320], image[64:320, 64:320])
    assert not back[:64].any() and not back[320:].any()
    assert not back[:, :64].any() and not back[:, 320:].any()


def test_resample_and_crop_fills_lost_field_of_view_with_zeros() -> None:
    image = smooth(384, 384, (0.7, 0.7))  # 268.8 mm across, the model sees 256 mm
    grid, gmap = to_model_grid(image, (0.7, 0.7), CONTRACT)
    assert gmap.rows.resampled_size == 269 and gmap.rows.offset == -7
    back = from_model_grid(grid, gmap)
    # Resampled rows 0..6 and 263..268 are cropped (offset -7); input row i lands on
    # resampled row (i - 191.5) * 0.7 + 134, so rows 0..9 and 376..383 lost their view.
    assert not back[:10].any() and back[10, 10:376].all()
    assert not back[376:].any() and back[375, 10:376].all()
    assert not back[:, :10].any() and not back[:, 376:].any()
    inner = (slice(11, 375), slice(11, 375))
    assert np.abs(back[inner] - image[inner]).max() / image.max() < 0.005


def test_leading_axes_are_carried_for_2_5d_stacks() -> None:
    stack = np.stack([smooth(320, 320, (0.8, 0.8)) * k for k in (1, 2, 3)])
    grid, gmap = to_model_grid(stack, (0.8, 0.8), CONTRACT)
    assert grid.shape == (3, 256, 256)
    single, _ = to_model_grid(stack[1], (0.8, 0.8), CONTRACT)
    np.testing.assert_allclose(grid[1], single, rtol=1e-6)
    assert from_model_grid(grid, gmap).shape == (3, 320, 320)


def test_bad_arguments() -> None:
    _, gmap = to_model_grid(np.zeros((64, 64), np.float32), (1.0, 1.0), CONTRACT)
    with pytest.raises(ValueError, match="shape"):
        from_model_grid(np.zeros((128, 128), np.float32), gmap)
    with pytest.raises(ValueError, match="positive"):
        to_model_grid(np.zeros((64, 64), np.float32), (0.0, 1.0), CONTRACT)
    with pytest.raises(ValueError):
        to_model_grid(np.zeros(64, np.float32), (1.0, 1.0), CONTRACT)


def test_normalise_robust_max() -> None:
    norm = Normalisation(method="robust_max", percentile=99.5, clip_max=1.5)
    grid = np.zeros((256, 256), np.float32)
    grid[64:192, 64:192] = np.linspace(1, 1000, 128 * 128, dtype=np.float32).reshape(128, 128)
    grid[0, 0] = 50_000  # a hot pixel is clipped, not used as the scale
    grid[0, 1] = -20
    out = normalise(grid, norm)
    scale = np.percentile(grid[grid > 0], 99.5)
    assert out.dtype == np.float32
    assert out[100, 100] == pytest.approx(grid[100, 100] / scale, rel=1e-6)
    assert out[0, 0] == 1.5 and out[0, 1] == 0.0 and out.min() == 0.0


def test_normalise_all_zero_and_unknown_method() -> None:
    zeros = np.zeros((8, 8), np.float32)
    out = normalise(zeros, Normalisation())
    assert out.dtype == np.float32 and not out.any()
    assert not normalise(-np.ones((8, 8), np.float32), Normalisation()).any()
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise(zeros, Normalisation(method="zscore"))


def test_normalise_stack_uses_the_centre_slice() -> None:
    norm = Normalisation(percentile=100.0, clip_max=10.0)
    stack = np.stack([np.full((4, 4), v, dtype=np.float32) for v in (2.0, 4.0, 8.0)])
    out = normalise(stack, norm)
    assert out.shape == (3, 4, 4)
    np.testing.assert_allclose(out[:, 0, 0], [0.5, 1.0, 2.0])
    # the centre alone decides: an empty centre gives zeros even with bright neighbours
    stack[1] = 0
    assert not normalise(stack, norm).any()


@pytest.mark.parametrize(("size", "spacing"), [(320, 0.8), (200, 1.3), (300, 0.7)])
def test_rows_and_columns_passes_agree(size: int, spacing: float) -> None:
    """The columns pass works on a transposed copy: it must be the rows pass, transposed
    (to float32 rounding: the passes then run in the other order), both directions."""
    rng = np.random.default_rng(size)
    image = (rng.random((2, size, size)) * 1000).astype(np.float32)
    flipped = np.ascontiguousarray(np.swapaxes(image, -1, -2))
    grid, gmap = to_model_grid(image, (spacing, spacing), CONTRACT)
    grid_t, _ = to_model_grid(flipped, (spacing, spacing), CONTRACT)
    np.testing.assert_allclose(grid, np.swapaxes(grid_t, -1, -2), rtol=1e-5, atol=1e-3)
    assert grid.flags.c_contiguous
    back = from_model_grid(grid[0], gmap)
    back_t = from_model_grid(np.ascontiguousarray(grid[0].T), gmap)
    np.testing.assert_allclose(back, back_t.T, rtol=1e-5, atol=1e-3)
    assert back.flags.c_contiguous
