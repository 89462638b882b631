# FROZEN REFERENCE copied verbatim from diffcut/assign.py at a58cb80 (benchmarks/baseline_segment_step/__init__.py):
# the baseline of benchmarks/segment_step.py, excluded from duplicate checks; never edit.
"""High-resolution concept assignment and per-segment descriptors (DESIGN.md §2.4).

DiffCut (Couairon et al., NeurIPS 2024, arXiv:2406.02842, §3.3 "High-resolution
concept assignment") turns the low-resolution segments of the recursive
normalized cut into a full-resolution label map:

1. every segment k gets a concept embedding e_k, the mean over its cells of the
   L2-normalized features ("masked spatial marginal mean"; not renormalized);
2. the normalized feature map is upsampled bilinearly (half-pixel centers,
   ``align_corners=False``, as ``nn.Upsample(mode="bilinear")`` in the published
   code) to the output size and every pixel p takes
   ``argmax_k <U(f)(p), e_k>``.

Because U is linear, ``<U(f)(p), e_k> = U(<f, e_k>)(p)``: we compute the K
similarity maps at latent resolution (K x h x w) and upsample those, which costs
K/c of the memory and work of upsampling all c channels (c = 1280 for SSD-1B).
In floating point the two orders agree up to rounding, so labels can only
differ where two segments' scores are tied to within ~1e-6.

Array convention (all public functions here):
    numpy in -> numpy out, torch in -> torch out (on the input's device).
    The type of ``features`` decides for ``segment_embeddings`` and
    ``assign_concepts``; labels may be numpy or torch either way. Features of any
    float dtype (the pipeline passes float16) are computed in float32.
``segment_stats`` is numpy only (it feeds the Parquet descriptors).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "segment_embeddings",
    "assign_concepts",
    "similarity_maps",
    "bilinear_source_index",
    "segment_stats",
    "SegmentStats",
]

# Largest K x rows x W float32 block assign_concepts materializes at once
# (2**24 elements = 64 MiB). Bigger outputs are processed in row tiles.
DEFAULT_MAX_TILE_ELEMENTS = 1 << 24


def _as_float_features(features) -> torch.Tensor:
    tensor = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if tensor.ndim != 3:
        raise ValueError(f"features must have shape (h, w, c), got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"features must be a float array, got {tensor.dtype}")
    tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("features contain NaN or inf")
    return tensor


def _as_label_tensor(latent_labels, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    labels = latent_labels if isinstance(latent_labels, torch.Tensor) else torch.from_numpy(np.asarray(latent_labels))
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"latent_labels must be an integer array, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"latent_labels has shape {tuple(labels.shape)}, features need {tuple(shape)}")
    labels = labels.to(device=device, dtype=torch.int64)
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("latent_labels must be >= 0")
    return labels


def _normalized_and_embeddings(features, latent_labels):
    """Shared front half: normalized features (h, w, c), embeddings (K, c), counts (K,)."""
    feats = _as_float_features(features)
    h, w, c = feats.shape
    labels = _as_label_tensor(latent_labels, (h, w), feats.device).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("features must have at least one cell")
    flat = F.normalize(feats.reshape(h * w, c), p=2, dim=1)
    num_segments = int(labels.max()) + 1
    sums = torch.zeros(num_segments, c, dtype=torch.float32, device=flat.device).index_add_(0, labels, flat)
    counts = torch.bincount(labels, minlength=num_segments)
    embeddings = sums / counts.clamp(min=1).to(torch.float32)[:, None]
    return flat.reshape(h, w, c), embeddings, counts


def segment_embeddings(features, latent_labels):
    """Concept embedding of every segment: e_k = mean of the L2-normalized features.

    DiffCut §3.3 ("masked spatial marginal mean"). The mean is not renormalized.

    Args:
        features: (h, w, c) float array (numpy or torch).
        latent_labels: (h, w) integer labels in 0..K-1.

    Returns:
        (K, c) float32 with K = max label + 1, numpy or torch like ``features``.
        A label in 0..K-1 with no cell gets an all-zero row.
    """
    _, embeddings, _ = _normalized_and_embeddings(features, latent_labels)
    if isinstance(features, torch.Tensor):
        return embeddings
    return embeddings.cpu().numpy()


def similarity_maps(features, latent_labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent-resolution scores ``<f(q), e_k>`` for the segments that occur.

    Returns (maps (K', h, w) float32 tensor, segment ids (K',) int64 tensor): one
    map per label that has at least one cell, in increasing label order.
    """
    normalized, embeddings, counts = _normalized_and_embeddings(features, latent_labels)
    present = torch.nonzero(counts > 0).reshape(-1)
    maps = torch.einsum("kc,hwc->khw", embeddings[present], normalized)
    return maps, present


def bilinear_source_index(out_size: int, in_size: int, device=None):
    """Source rows (i0, i1) and weight of i1 for bilinear resampling, ``align_corners=False``.

    Same rule as ``torch.nn.functional.interpolate(mode="bilinear")`` given an
    output size: source coordinate ``(dst + 0.5) * in / out - 0.5``, clamped
    below at 0; i1 = i0 + 1 except at the last source row. Works for up- and
    down-sampling (no antialiasing, like the published code).
    """
    if out_size <= 0 or in_size <= 0:
        raise ValueError(f"sizes must be positive, got out={out_size}, in={in_size}")
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).clamp(min=0.0)
    i0 = src.floor().to(torch.int64).clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    weight1 = (src - i0.to(torch.float64)).clamp(0.0, 1.0).to(torch.float32)
    return i0, i1, weight1


def assign_concepts(features, latent_labels, size, *, max_tile_elements: int = DEFAULT_MAX_TILE_ELEMENTS):
    """Full-resolution label map by high-resolution concept assignment (DESIGN.md §2.4).

    Pixel p of the (H, W) output gets ``argmax_k <U(f)(p), e_k>``, U the bilinear
    resampling with ``align_corners=False`` of the L2-normalized feature map f,
    e_k from :func:`segment_embeddings`. Computed as the bilinear resampling of
    the K similarity maps (never of the c feature channels): first along x for
    all h latent rows (K x h x W), then along y one tile of output rows at a
    time, so the largest block is about ``max_tile_elements`` float32 values
    (K x tile_rows x W) besides the K x h x W intermediate, however large H is
    (e.g. 8000 x 6000 outputs). Tiling does not change the result.

    Ties go to the lowest label (first maximum). Labels that have no cell never
    win. Output sizes smaller than the latent map are allowed (no antialiasing).

    Args:
        features: (h, w, c) float array, numpy or torch (any float dtype).
        latent_labels: (h, w) integer labels 0..K-1.
        size: (H, W) of the output.
        max_tile_elements: bound on K x tile_rows x W per tile.

    Returns:
        (H, W) int32 labels, numpy or torch (on features' device) like ``features``.
    """
    out_h, out_w = (int(s) for s in size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"size must be positive, got {size}")
    maps, segment_ids = similarity_maps(features, latent_labels)
    num_present, h, w = maps.shape
    device = maps.device

    # Segment-last layout: the argmax then reduces over contiguous memory (~2.5x faster on CPU).
    maps = maps.permute(1, 2, 0).contiguous()  # (h, w, K)
    x0, x1, wx = bilinear_source_index(out_w, w, device)
    # Resample along x for every latent row: (h, W, K). Small because h is small.
    rows = torch.lerp(maps[:, x0], maps[:, x1], wx[None, :, None])
    y0, y1, wy = bilinear_source_index(out_h, h, device)

    out = torch.empty(out_h, out_w, dtype=torch.int32, device=device)
    tile_rows = max(1, int(max_tile_elements) // max(1, num_present * out_w))
    for start in range(0, out_h, tile_rows):
        stop = min(out_h, start + tile_rows)
        scores = torch.lerp(rows[y0[start:stop]], rows[y1[start:stop]], wy[start:stop, None, None])
        # torch.argmax returns the first maximal index: ties -> lowest label.
        out[start:stop] = segment_ids[scores.argmax(dim=-1)].to(torch.int32)

    if isinstance(features, torch.Tensor):
        return out
    return out.cpu().numpy()


class SegmentStats(NamedTuple):
    """Per-label statistics of a label map; index k describes label k.

    area: (K,) int64 pixel counts (0 for labels that do not occur).
    bbox: (K, 4) int64 boxes ``[x0, y0, x1, y1]`` with exclusive x1, y1, so
        ``mask[y0:y1, x0:x1]`` is the tightest crop; all zeros where area is 0.
    """

    area: np.ndarray
    bbox: np.ndarray


# Pixels per chunk in segment_stats, to bound the int64 scratch arrays (~32 MiB each).
_STATS_CHUNK_PIXELS = 1 << 22


def segment_stats(mask, num_segments: int | None = None) -> SegmentStats:
    """Area and bounding box of every label of an (H, W) label map, vectorized.

    Args:
        mask: (H, W) integer labels >= 0 (numpy, or anything np.asarray takes).
        num_segments: K; default max label + 1.

    Returns:
        :class:`SegmentStats` with K rows (see there for the box convention).
    """
    labels = np.asarray(mask)
    if labels.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"mask must be an integer array, got {labels.dtype}")
    height, width = labels.shape
    if labels.size and labels.min() < 0:
        raise ValueError("mask labels must be >= 0")
    max_label = int(labels.max()) if labels.size else -1
    k = max_label + 1 if num_segments is None else int(num_segments)
    if k < max_label + 1:
        raise ValueError(f"num_segments={k} but the mask contains label {max_label}")

    area = np.bincount(labels.reshape(-1), minlength=k).astype(np.int64)
    x_min = np.full(k, width, dtype=np.int64)
    x_max = np.full(k, -1, dtype=np.int64)
    y_min = np.full(k, height, dtype=np.int64)
    y_max = np.full(k, -1, dtype=np.int64)
    rows_per_chunk = max(1, _STATS_CHUNK_PIXELS // max(1, width))
    columns = np.arange(width, dtype=np.int64)
    for start in range(0, height, rows_per_chunk):
        block = labels[start : start + rows_per_chunk].astype(np.int64, copy=False)
        flat = block.reshape(-1)
        xs = np.tile(columns, block.shape[0])
        ys = np.repeat(np.arange(start, start + block.shape[0], dtype=np.int64), width)
        np.minimum.at(x_min, flat, xs)
        np.maximum.at(x_max, flat, xs)
        np.minimum.at(y_min, flat, ys)
        np.maximum.at(y_max, flat, ys)

    bbox = np.stack([x_min, y_min, x_max + 1, y_max + 1], axis=1)
    bbox[area == 0] = 0
    return SegmentStats(area=area, bbox=bbox)
