"""The paper's input pipeline for the benchmarks: centre square crop, bilinear resize of the image,
nearest-exact resize of the labels (docs/method.md §3; the published evaluation scripts).

Plain functions on arrays; :mod:`diffcut.evaluation.datasets` re-exports them beside the readers.
"""

from __future__ import annotations

import numpy as np


def centre_square_crop_box(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the published centre crop.

    The published loader crops a square of side ``min(H, W) - 1`` with
    torchvision's ``CenterCrop`` (offsets ``round((H - side) / 2)``, Python's
    round-half-to-even); we reproduce that exactly.
    """
    side = max(min(height, width) - 1, 1)
    return int(round((height - side) / 2.0)), int(round((width - side) / 2.0)), side


def _linear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel bilinear sampling (``align_corners=False``, no antialiasing), as torch computes it."""
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    weight_high = (source - low).astype(np.float32)
    return low, high, weight_high


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float image -> (h, w, C) float32, bilinear with half-pixel centres, no antialiasing.

    Matches ``F.interpolate(mode="bilinear", align_corners=False)`` and
    torchvision's tensor ``Resize(antialias=None)`` that the published
    loader uses.
    """
    image = np.asarray(image, dtype=np.float32)
    out_h, out_w = int(size[0]), int(size[1])
    low, high, w = _linear_weights(image.shape[0], out_h)
    rows = image[low] * (1 - w)[:, None, None] + image[high] * w[:, None, None]
    low, high, w = _linear_weights(image.shape[1], out_w)
    return rows[:, low] * (1 - w)[None, :, None] + rows[:, high] * w[None, :, None]


def resize_nearest_exact(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Label resize with half-pixel nearest sampling (torchvision ``NEAREST_EXACT``)."""
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = labels.shape[:2]
    rows = np.minimum(np.floor((np.arange(out_h) + 0.5) * in_h / out_h).astype(np.int64), in_h - 1)
    cols = np.minimum(np.floor((np.arange(out_w) + 0.5) * in_w / out_w).astype(np.int64), in_w - 1)
    return labels[rows[:, None], cols[None, :]]


def paper_preprocess(image: np.ndarray, labels: np.ndarray, resolution: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The paper's input pipeline for one benchmark image.

    Centre square crop (side ``min(H, W) - 1``, as published), then the image
    is resized to ``resolution`` x ``resolution`` bilinearly (values in
    [0, 1]) and the labels with nearest-exact sampling. The evaluator then
    samples both at 128 x 128 (:func:`diffcut.evaluation.protocol.resize_nearest`).

    Returns ``(image (R, R, 3) float32 in [0, 1], labels (R, R) uint8)``.
    """
    height, width = image.shape[:2]
    if labels.shape[:2] != (height, width):
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape[:2]} differ in size")
    top, left, side = centre_square_crop_box(height, width)
    image = np.asarray(image[top : top + side, left : left + side], dtype=np.float32) / 255.0
    labels = labels[top : top + side, left : left + side]
    size = (resolution, resolution)
    return resize_bilinear(image, size), resize_nearest_exact(labels, size)
