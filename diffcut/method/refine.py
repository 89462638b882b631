"""PAMR mask refinement (docs/method.md §2.5).

Pixel-Adaptive Mask Refinement, Araslanov and Roth, "Single-Stage Semantic
Segmentation from Image Labels", CVPR 2020, §3.2. DiffCut (Couairon et al.,
NeurIPS 2024) applies it to its label maps for the headline numbers: the image
resized to the mask size, 10 iterations, dilations (1, 2, 4, 8), then argmax and
a 3x3 median filter.

Definition, as in the published implementation (this code is our own):

* Neighbourhood N(i) of pixel i: the 8 neighbours of a 3x3 window at every
  dilation d, i.e. offsets d*(dy, dx), (dy, dx) != (0, 0); P = 8 * len(dilations)
  positions. Positions outside the image are clamped to the border (replicate
  padding).
* Local scale sigma_c(i): the unbiased standard deviation of channel c over the
  full 3x3 windows of all dilations, the centre counted once per dilation
  (9 * len(dilations) samples).
* Kernel k(i, j) = mean over channels c of -|I_c(i) - I_c(j)| / (1e-8 + 0.1 sigma_c(i)).
* Affinity alpha(i, j) = softmax over j in N(i) of k(i, j) (i itself is not in N(i)).
* One iteration: m_k(i) <- sum_{j in N(i)} alpha(i, j) m_k(j), for every mask k.

The kernel divides every channel by its own local scale, so it does not change
under a positive affine map of each channel (uint8 vs [0, 1] images, mean/std
normalization) except through the 1e-8.

Memory: the affinities take P floats per pixel. Large images are processed in
row tiles with a halo of ``iterations * max(dilations)`` rows on each side: a
pixel's result after T iterations depends only on pixels at most T * max(d)
rows away, so tiles reproduce the untiled result exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import median_filter

__all__ = ["pamr", "refine_pamr", "local_affinity", "neighbour_offsets"]

# The 8 neighbours of a 3x3 window, in raster order.
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# Scale of the local standard deviation in the kernel (the published value).
_SIGMA_SCALE = 0.1
_SIGMA_EPS = 1e-8
# Float budget of one PAMR tile (2**26 floats = 256 MiB in float32).
_TILE_ELEMENTS = 1 << 26


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(dy, dx) of the P = 8 * len(dilations) neighbours, dilation-major."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in _RING]


def _check_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
    dilations = tuple(int(d) for d in dilations)
    if not dilations or min(dilations) < 1:
        raise ValueError(f"dilations must be positive integers, got {dilations}")
    return dilations


def _shift(padded: torch.Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    """Values at (y + dy, x + dx) clamped to the image, from a replicate-padded tensor."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def local_affinity(image: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8)) -> torch.Tensor:
    """PAMR affinities alpha(i, j) for every pixel and neighbour.

    Args:
        image: (B, C, H, W) float tensor.
        dilations: window dilations.

    Returns:
        (B, P, H, W) tensor, the softmax over the P neighbours of
        :func:`neighbour_offsets` (sums to 1 over dim 1).
    """
    dilations = _check_dilations(dilations)
    _, _, height, width = image.shape
    pad = max(dilations)
    padded = F.pad(image, [pad] * 4, mode="replicate")
    offsets = neighbour_offsets(dilations)

    # Local std over every dilation's full 3x3 window; the centre is one sample per dilation.
    taps = [(0, 0)] * len(dilations) + offsets
    mean = sum(_shift(padded, pad, dy, dx, height, width) for dy, dx in taps) / len(taps)
    sq_dev = sum((_shift(padded, pad, dy, dx, height, width) - mean) ** 2 for dy, dx in taps)
    sigma = (sq_dev / (len(taps) - 1)).sqrt()
    inv_scale = 1.0 / (_SIGMA_EPS + _SIGMA_SCALE * sigma)

    kernel = torch.stack(
        [-((image - _shift(padded, pad, dy, dx, height, width)).abs() * inv_scale).mean(dim=1) for dy, dx in offsets],
        dim=1,
    )
    return torch.softmax(kernel, dim=1)


def _propagate(
    masks: torch.Tensor, affinity: torch.Tensor, dilations: tuple[int, ...], iterations: int
) -> torch.Tensor:
    """``iterations`` steps of m(i) <- sum_j alpha(i, j) m(j) on (B, K, H, W) masks."""
    _, _, height, width = masks.shape
    pad = max(dilations)
    offsets = neighbour_offsets(dilations)
    for _ in range(iterations):
        padded = F.pad(masks, [pad] * 4, mode="replicate")
        updated = torch.zeros_like(masks)
        for p, (dy, dx) in enumerate(offsets):
            updated += affinity[:, p : p + 1] * _shift(padded, pad, dy, dx, height, width)
        masks = updated
    return masks


def _auto_tile_rows(batch: int, num_masks: int, width: int, num_neighbours: int, halo: int) -> int:
    # Floats per image row in one tile: affinities, the kernel stack, masks with their
    # padded copy and accumulator, and a few image-sized temporaries.
    per_row = batch * width * (2 * num_neighbours + 3 * num_masks + 16)
    rows = _TILE_ELEMENTS // max(1, per_row) - 2 * halo
    return max(rows, halo, 1)  # below the halo size the overlap would dominate


def _pamr_row_tiles(
    image: torch.Tensor,
    masks_for_rows: Callable[[int, int], torch.Tensor],
    num_masks: int,
    iterations: int,
    dilations: tuple[int, ...],
    tile_rows: int | None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, refined masks of rows start:stop), tile by tile."""
    batch, _, height, width = image.shape
    halo = iterations * max(dilations)
    if tile_rows is None:
        tile_rows = _auto_tile_rows(batch, num_masks, width, 8 * len(dilations), halo)
    tile_rows = max(1, int(tile_rows))
    for start in range(0, height, tile_rows):
        stop = min(height, start + tile_rows)
        lo, hi = max(0, start - halo), min(height, stop + halo)
        affinity = local_affinity(image[:, :, lo:hi], dilations)
        refined = _propagate(masks_for_rows(lo, hi), affinity, dilations, iterations)
        yield start, stop, refined[:, :, start - lo : stop - lo]


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8),
    *,
    tile_rows: int | None = None,
) -> torch.Tensor:
    """Pixel-Adaptive Mask Refinement of soft masks (Araslanov and Roth, CVPR 2020).

    Args:
        image: (B, C, H, W) float tensor (any positive scale per channel).
        masks: (B, K, H, W) float tensor, same B, H, W as ``image`` (e.g. one-hot labels).
        iterations: number of propagation steps.
        dilations: neighbourhood dilations.
        tile_rows: output rows per tile; None picks tiles of about 256 MiB. Any
            value gives the same result.

    Returns:
        (B, K, H, W) refined masks, float32 (float64 if both inputs are float64),
        on the inputs' device.
    """
    if image.ndim != 4 or masks.ndim != 4:
        raise ValueError(f"image and masks must be 4-D (B, C, H, W), got {tuple(image.shape)}, {tuple(masks.shape)}")
    if image.shape[0] != masks.shape[0] or image.shape[2:] != masks.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and masks {tuple(masks.shape)} differ in batch or size")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    dilations = _check_dilations(dilations)
    dtype = torch.float64 if image.dtype == masks.dtype == torch.float64 else torch.float32
    image = image.to(dtype)
    masks = masks.to(device=image.device, dtype=dtype)
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image contains NaN or inf")

    out = torch.empty_like(masks)
    for start, stop, refined in _pamr_row_tiles(
        image, lambda lo, hi: masks[:, :, lo:hi], masks.shape[1], iterations, dilations, tile_rows
    ):
        out[:, :, start:stop] = refined
    return out


def _image_tensor(image, device) -> torch.Tensor:
    tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.asarray(image))
    if tensor.ndim != 3 or tensor.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        tensor = tensor.to(device=device, dtype=torch.float32) / 255.0
    elif tensor.is_floating_point():
        tensor = tensor.to(device=device, dtype=torch.float32)
    else:
        raise TypeError(f"image must be uint8 or float, got {tensor.dtype}")
    return tensor.permute(2, 0, 1)[None]


def refine_pamr(
    image,
    labels,
    iterations: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8),
    *,
    device=None,
    tile_rows: int | None = None,
):
    """Refine a label map with PAMR as DiffCut does (docs/method.md §2.5).

    Steps, as the published evaluation: resize the image to the label map's
    size (bilinear, ``align_corners=False``, no antialiasing); one-hot masks of
    the labels that occur (sorted); :func:`pamr`; argmax over the masks (ties to
    the lower label); 3x3 median filter (scipy, mode "reflect") on the label
    ranks. Ranks are an increasing relabeling, so the median of ranks is the
    median of labels and every output label is one of the input labels.

    Args:
        image: (H0, W0, 3) uint8 or float in [0, 1], numpy or torch.
        labels: (H, W) integer labels (any values), numpy or torch.
        iterations, dilations: PAMR parameters (paper: 10, (1, 2, 4, 8)).
        device: where PAMR runs; default the device of ``image`` if it is a
            tensor, else of ``labels`` if it is a tensor, else CPU.
        tile_rows: see :func:`pamr`.

    Returns:
        (H, W) int32 labels: numpy if ``labels`` is numpy, else a tensor on
        ``labels``' device.
    """
    label_tensor = labels if isinstance(labels, torch.Tensor) else None
    label_array = labels.detach().cpu().numpy() if label_tensor is not None else np.asarray(labels)
    if label_array.ndim != 2:
        raise ValueError(f"labels must have shape (H, W), got {label_array.shape}")
    if not np.issubdtype(label_array.dtype, np.integer):
        raise TypeError(f"labels must be integers, got {label_array.dtype}")
    if device is None:
        if isinstance(image, torch.Tensor):
            device = image.device
        elif label_tensor is not None:
            device = label_tensor.device
        else:
            device = torch.device("cpu")
    height, width = label_array.shape

    pixels = _image_tensor(image, device)
    if not bool(torch.isfinite(pixels).all()):
        raise ValueError("image contains NaN or inf")
    if pixels.shape[2:] != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=False)

    values, ranks = np.unique(label_array, return_inverse=True)
    ranks = ranks.reshape(height, width)
    if len(values) > 1:
        dilations = _check_dilations(dilations)
        rank_tensor = torch.from_numpy(ranks).to(device)
        num_masks = len(values)

        def one_hot_rows(lo: int, hi: int) -> torch.Tensor:
            return F.one_hot(rank_tensor[lo:hi], num_masks).permute(2, 0, 1)[None].to(torch.float32)

        best = torch.empty(height, width, dtype=torch.int64, device=device)
        for start, stop, refined in _pamr_row_tiles(pixels, one_hot_rows, num_masks, iterations, dilations, tile_rows):
            best[start:stop] = refined[0].argmax(dim=0)
        rank_dtype = np.uint8 if num_masks <= 256 else np.int32
        ranks = median_filter(best.cpu().numpy().astype(rank_dtype), size=3, mode="reflect")

    refined_labels = values[ranks].astype(np.int32)
    if label_tensor is not None:
        return torch.from_numpy(refined_labels).to(label_tensor.device)
    return refined_labels
