"""Label-map pictures: palette, overlay, boundaries, PNG files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcut.tools import visualize
from diffcut.tools.visualize import BOUNDARY_COLOR, boundaries, colorize, overlay, palette, save_png


def lab_distances(colors: np.ndarray) -> np.ndarray:
    lab = visualize._srgb_to_lab(colors)
    d = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return d


def test_srgb_to_lab_reference_values():
    lab = visualize._srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]]))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.01)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=0.01)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)  # standard sRGB red


def test_first_64_colors_are_distinct_and_light_enough():
    colors = palette(64)
    assert colors.shape == (64, 3) and colors.dtype == np.uint8
    assert len({tuple(c) for c in colors}) == 64
    assert lab_distances(colors).min() > 20  # CIE76 delta E; ~2.3 is just noticeable
    lightness = visualize._srgb_to_lab(colors)[:, 0]
    assert lightness.min() >= 35  # boundaries (black) stay visible on every segment


def test_palette_is_deterministic_and_consistent():
    visualize._chosen_palette.cache_clear()
    first = palette(1000)
    visualize._chosen_palette.cache_clear()
    np.testing.assert_array_equal(palette(1000), first)
    np.testing.assert_array_equal(palette(10), first[:10])
    labels = np.array([[0, 5, 255], [256, 999, 65535]])
    picture = colorize(labels)
    assert picture.shape == (2, 3, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture[0], first[[0, 5, 255]])
    np.testing.assert_array_equal(picture[1, :2], first[[256, 999]])
    np.testing.assert_array_equal(picture[1, 2], palette(65536)[65535])


def test_boundaries_exactly_where_labels_change():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(13, 17))
    labels[4:9, 5:12] = 7
    got = boundaries(labels)
    expected = np.zeros_like(got)
    for y in range(13):
        for x in range(17):
            right = x + 1 < 17 and labels[y, x] != labels[y, x + 1]
            below = y + 1 < 13 and labels[y, x] != labels[y + 1, x]
            expected[y, x] = right or below
    np.testing.assert_array_equal(got, expected)


def test_boundary_of_two_halves_is_one_pixel_wide():
    labels = np.zeros((6, 8), np.int64)
    labels[:, 5:] = 3
    got = boundaries(labels)
    assert got[:, 4].all() and got.sum() == 6


def test_overlay_blends_and_draws_boundaries():
    image = np.full((6, 8, 3), 200, np.uint8)
    image[:, :, 2] = 10
    labels = np.zeros((6, 8), np.int64)
    labels[:, 5:] = 3
    out = overlay(image, labels, alpha=0.25)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    colors = palette(4)
    edge = boundaries(labels)
    np.testing.assert_array_equal(out[edge], np.tile(BOUNDARY_COLOR, (edge.sum(), 1)))
    expected = np.rint(0.75 * image.astype(float) + 0.25 * colors[labels].astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(out[~edge], expected[~edge])
    np.testing.assert_array_equal(overlay(image, np.zeros((6, 8), int), alpha=0.0), image)
    with pytest.raises(ValueError):
        overlay(image, labels[:, :7])
    with pytest.raises(ValueError):
        overlay(image.astype(np.float32), labels)


def test_save_png_round_trips(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    small = np.arange(35).reshape(5, 7)
    large = np.arange(35).reshape(5, 7) * 1000
    for name, array in [("rgb.png", rgb), ("small.png", small), ("deep/large.png", large)]:
        path = save_png(tmp_path / name, array)
        back = np.asarray(Image.open(path))
        np.testing.assert_array_equal(back, array)
    assert Image.open(tmp_path / "small.png").mode == "L"
    assert np.asarray(Image.open(tmp_path / "deep/large.png")).dtype == np.uint16
    with pytest.raises(ValueError):
        save_png(tmp_path / "x.png", np.array([[70000]]))
    with pytest.raises(TypeError):
        save_png(tmp_path / "x.png", np.zeros((2, 2), np.float32))


def test_bad_labels_raise():
    with pytest.raises(ValueError):
        colorize(np.array([[-1, 0]]))
    with pytest.raises(TypeError):
        colorize(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError):
        boundaries(np.zeros(4, np.int64))
