"""Pictures of label maps: a fixed palette, overlays with segment boundaries, PNG writing.

Used by ``diffcut segment`` (overlay PNG next to the label-map PNG) and the HTML
gallery. numpy in, numpy out.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["palette", "colorize", "boundaries", "overlay", "save_png", "BOUNDARY_COLOR"]

# Colour of the 1-px lines between segments in overlays. The palette keeps away
# from it (lightness L* >= 35), so lines stay visible on every segment.
BOUNDARY_COLOR = (0, 0, 0)
# Labels below this get colours chosen to be far apart; the others get hashed colours.
_CHOSEN_COLORS = 256


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 255] -> CIE L*a*b* (D65), for perceptual distances between colours."""
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


@functools.lru_cache(maxsize=1)
def _chosen_palette() -> np.ndarray:
    """256 colours picked greedily (farthest point in L*a*b*) from a 16^3 RGB grid.

    Deterministic: the first colour is the candidate farthest from mid grey, each
    next one maximizes the distance to the nearest colour already picked (ties
    to the lowest candidate index). Too dark (L* < 35, against the black
    boundaries) and near-white (L* > 92) candidates are left out.
    """
    levels = np.arange(0, 256, 17)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = _srgb_to_lab(grid)
    keep = (lab[:, 0] >= 35) & (lab[:, 0] <= 92)
    grid, lab = grid[keep], lab[keep]
    nearest = np.linalg.norm(lab - np.array([50.0, 0.0, 0.0]), axis=1)
    chosen = []
    for _ in range(_CHOSEN_COLORS):
        index = int(np.argmax(nearest))
        chosen.append(index)
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[index], axis=1))
    return grid[chosen].astype(np.uint8)


def _hashed_colors(labels: np.ndarray) -> np.ndarray:
    # Knuth's multiplicative hash spreads consecutive labels over the colour cube;
    # channels are mapped into [48, 255] to stay clear of the boundary colour.
    mixed = (labels.astype(np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFF)
    channels = np.stack([(mixed >> np.uint64(s)) & np.uint64(0xFF) for s in (16, 8, 0)], axis=-1)
    return (48 + channels * 208 // 256).astype(np.uint8)


def palette(n: int) -> np.ndarray:
    """The colours of labels 0..n-1, (n, 3) uint8.

    The first 256 are chosen to be far apart in CIE L*a*b*; labels from 256 on
    (16-bit label maps) get deterministic hashed colours, not guaranteed distinct.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    chosen = _chosen_palette()
    if n <= len(chosen):
        return chosen[:n].copy()
    return np.concatenate([chosen, _hashed_colors(np.arange(len(chosen), n))])


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (H, W), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    return labels


def colorize(labels) -> np.ndarray:
    """(H, W) integer labels >= 0 -> (H, W, 3) uint8 picture; label k gets colour ``palette(n)[k]`` (any n > k)."""
    labels = _check_labels(labels)
    chosen = _chosen_palette()
    if labels.size == 0 or labels.max() < len(chosen):
        return chosen[labels]
    colors = chosen[np.minimum(labels, len(chosen) - 1)]
    high = labels >= len(chosen)
    colors[high] = _hashed_colors(labels[high])
    return colors


def boundaries(labels) -> np.ndarray:
    """(H, W) bool, True at pixels whose right or lower neighbour has another label.

    Marking one side of every label change gives 1-px lines.
    """
    labels = _check_labels(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def overlay(image, labels, alpha: float = 0.5) -> np.ndarray:
    """The image with coloured segments blended in and boundaries drawn.

    Args:
        image: (H, W, 3) uint8.
        labels: (H, W) integer labels >= 0, same H, W.
        alpha: weight of the segment colour (0 = image only, 1 = colours only).

    Returns:
        (H, W, 3) uint8: ``round((1 - alpha) * image + alpha * colorize(labels))``,
        and :data:`BOUNDARY_COLOR` on the pixels of :func:`boundaries`.
    """
    image = np.asarray(image)
    labels = _check_labels(labels)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(labels).astype(np.float32)
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    out[boundaries(labels)] = BOUNDARY_COLOR
    return out


def save_png(path: str | os.PathLike, array) -> Path:
    """Write an array as PNG (parent directories are created); returns the path.

    * (H, W, 3) / (H, W, 4) uint8: RGB / RGBA.
    * (H, W) integers: 8-bit grayscale when every value is in [0, 255], else
      16-bit grayscale when in [0, 65535] (label maps with many segments);
      ``np.asarray(PIL.Image.open(path))`` gives the values back.
    Anything else (floats, negative or larger values) raises, rather than being
    silently rescaled.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        if array.dtype != np.uint8:
            raise TypeError(f"colour images must be uint8, got {array.dtype}")
        picture = Image.fromarray(np.ascontiguousarray(array))  # RGB or RGBA from the shape
    elif array.ndim == 2:
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise TypeError(f"2-D arrays must be integers, got {array.dtype}")
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(f"values must be in [0, 65535] for PNG, got [{low}, {high}]")
        depth = np.uint8 if high <= 255 else np.uint16
        picture = Image.fromarray(np.ascontiguousarray(array.astype(depth)))
    else:
        raise ValueError(f"cannot write an array of shape {array.shape} as PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path
