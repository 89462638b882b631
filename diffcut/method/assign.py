"""High-resolution concept assignment and per-segment descriptors (docs/method.md §2.4).

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

Most pixels need no scores at all: output pixels sharing their four source
cells form blocks, in which every segment's score is bilinear in the two
interpolation weights, so a segment beaten at the block's four corner pixels
(by another segment, or by a mean of segments) is beaten in the whole block.
Blocks inside a segment are filled with its label; only blocks along
boundaries are scored, against the few segments that remain
(:func:`_assign_from_maps`): far less work than upsampling all K maps
(benchmarks/RESULTS.md).

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

__all__ = [
    "segment_embeddings",
    "assign_concepts",
    "assign_concepts_and_embeddings",
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
    return tensor.to(torch.float32)  # finiteness: checked on the row norms (_normalized_and_embeddings)


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
    flat = feats.reshape(h * w, c)
    norms = flat.norm(2, 1, keepdim=True)
    # A NaN or inf makes its row's norm non-finite: a cheaper first check than
    # testing every element (a finite row whose squares overflow is told apart here).
    if not bool(torch.isfinite(norms).all()) and not bool(torch.isfinite(flat).all()):
        raise ValueError("features contain NaN or inf")
    # F.normalize(flat, dim=1), with the norms computed once for both.
    flat = flat / norms.clamp_min(1e-12).expand_as(flat)
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
    """Full-resolution label map by high-resolution concept assignment (docs/method.md §2.4).

    Pixel p of the (H, W) output gets ``argmax_k <U(f)(p), e_k>``, U the bilinear
    resampling with ``align_corners=False`` of the L2-normalized feature map f,
    e_k from :func:`segment_embeddings`. Computed from the K similarity maps at
    latent resolution (never the c feature channels), see :func:`_assign_from_maps`:
    only pixels near a segment boundary are scored, and only against the
    segments that can win there, in blocks of at most about ``max_tile_elements``
    float32 values however large H is (e.g. 8000 x 6000 outputs). Tiling does
    not change the result.

    Ties go to the lowest label (first maximum). Labels that have no cell never
    win. Output sizes smaller than the latent map are allowed (no antialiasing).

    Parameters
    ----------
    features : array_like or torch.Tensor
        (h, w, c) float feature map, numpy or torch (any float dtype; computed in float32).
    latent_labels : array_like or torch.Tensor
        (h, w) integer labels 0..K-1 of the cells, e.g. from
        :func:`~diffcut.method.ncut.recursive_ncut`.
    size : tuple of int
        (H, W) of the output.
    max_tile_elements : int, optional
        Bound on the scores held at once (segments x pixels).

    Returns
    -------
    numpy.ndarray or torch.Tensor
        (H, W) int32 labels; a torch tensor on the features' device if ``features`` is one.

    References
    ----------
    .. [1] P. Couairon et al., "DiffCut: Catalyzing Zero-Shot Semantic Segmentation with
       Diffusion Features and Recursive Normalized Cut", NeurIPS 2024, arXiv:2406.02842,
       Sec. 3.3 (high-resolution concept assignment).

    Examples
    --------
    Three cells in a row; the middle one belongs to segment 0 but its feature lies
    between the two segments' concepts, so at 3x the resolution its right-hand
    pixel goes to segment 1:

    >>> import numpy as np
    >>> from diffcut.method.assign import assign_concepts
    >>> features = np.array([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]], dtype=np.float32)
    >>> print(assign_concepts(features, np.array([[0, 0, 1]]), (2, 9)))
    [[0 0 0 0 0 1 1 1 1]
     [0 0 0 0 0 1 1 1 1]]
    """
    return assign_concepts_and_embeddings(features, latent_labels, size, max_tile_elements=max_tile_elements)[0]


def assign_concepts_and_embeddings(
    features, latent_labels, size, *, max_tile_elements: int = DEFAULT_MAX_TILE_ELEMENTS
):
    """(:func:`assign_concepts`, :func:`segment_embeddings`) from one pass over the features."""
    out_h, out_w = (int(s) for s in size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"size must be positive, got {size}")
    normalized, embeddings, counts = _normalized_and_embeddings(features, latent_labels)
    present = torch.nonzero(counts > 0).reshape(-1)
    maps = torch.einsum("kc,hwc->khw", embeddings[present], normalized)
    labels = _assign_from_maps(maps.cpu().numpy(), present.cpu().numpy(), (out_h, out_w), max_tile_elements)
    if isinstance(features, torch.Tensor):
        return torch.from_numpy(labels).to(maps.device), embeddings
    return labels, embeddings.cpu().numpy()


# Scores of two segments closer than this are treated as possibly equal when
# ruling segments out of a block (float32 scores of unit vectors carry
# rounding errors below 1e-6).
_RULE_OUT_MARGIN = 1e-5


def _runs(index0: np.ndarray, index1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the runs of consecutive outputs with the same source pair (i0, i1)."""
    change = np.flatnonzero((index0[1:] != index0[:-1]) | (index1[1:] != index1[:-1])) + 1
    return np.concatenate(([0], change)), np.concatenate((change, [index0.shape[0]]))


def _assign_from_maps(
    maps: np.ndarray, segment_ids: np.ndarray, size: tuple[int, int], max_tile_elements: int
) -> np.ndarray:
    """Argmax over k of the bilinear resampling of the (K, h, w) float32 ``maps``; (H, W) int32 ids.

    Output pixels fall into blocks (a run of rows times a run of columns) that
    share their four source cells; in a block every score is a convex
    combination of its values at those four cells. A segment whose largest
    corner value is below another segment's smallest one loses everywhere in
    the block, so it is ruled out (with a margin for rounding). Blocks with
    one segment left -- the inside of segments -- are filled without scoring;
    the others (along boundaries) score the remaining segments pixel by pixel:
    resampled along x, then along y, and the first maximum wins (ties to the
    lowest label, as ``segment_ids`` is increasing).
    """
    out_h, out_w = size
    _, h, w = maps.shape
    y0, y1, wy = (t.numpy() for t in bilinear_source_index(out_h, h))
    x0, x1, wx = (t.numpy() for t in bilinear_source_index(out_w, w))
    row_starts, row_stops = _runs(y0, y1)
    col_starts, col_stops = _runs(x0, x1)
    ry0, ry1 = y0[row_starts], y1[row_starts]
    cx0, cx1 = x0[col_starts], x1[col_starts]
    wy, wx = wy.astype(np.float32), wx.astype(np.float32)
    # Scores at the four corner pixels of every block, (K, rows, cols) each. In a
    # block the difference of two segments' scores is bilinear in the weights,
    # so its extremes are at these corners.
    corner_rows = np.concatenate((row_starts, row_stops - 1))
    corner_cols = np.concatenate((col_starts, col_stops - 1))
    at_rows = maps[:, y0[corner_rows]] + wy[corner_rows, None] * (maps[:, y1[corner_rows]] - maps[:, y0[corner_rows]])
    at_corners = at_rows[:, :, x0[corner_cols]] + wx[corner_cols] * (
        at_rows[:, :, x1[corner_cols]] - at_rows[:, :, x0[corner_cols]]
    )
    rows, cols = row_starts.shape[0], col_starts.shape[0]
    corners = [at_corners[:, i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] for i in (0, 1) for j in (0, 1)]
    # A segment is ruled out of a block when a convex combination of segments'
    # scores beats it at all four corners (then everywhere in the block, and
    # so does the best of those segments). Tried: each corner's winner alone,
    # and the mean of the four winners' scores (where no single segment is
    # best across the block, e.g. segments of one cell).
    block_index = np.ogrid[:rows, :cols]
    winners = [np.argmax(corner, axis=0) for corner in corners]
    dominators = [[other[(winner, *block_index)] for other in corners] for winner in winners]
    dominators.append([sum(d[i] for d in dominators) / 4 for i in range(4)])
    stacked = np.stack(corners)  # (4, K, rows, cols)
    possible = np.ones(corners[0].shape, dtype=bool)
    for dominator in dominators:
        # Each segment's largest excess over the dominator at the four corners.
        gap = (stacked - np.stack(dominator)[:, None]).max(axis=0)
        possible &= gap >= -_RULE_OUT_MARGIN
    block_labels = segment_ids[np.argmax(possible, axis=0)].astype(np.int32)
    out = np.repeat(np.repeat(block_labels, row_stops - row_starts, axis=0), col_stops - col_starts, axis=1)
    _score_boundary_blocks(
        out,
        maps,
        segment_ids,
        possible,
        (row_starts, row_stops, ry0, ry1, wy),
        (col_starts, col_stops, cx0, cx1, wx),
        max_tile_elements,
    )
    return out


def _score_boundary_blocks(
    out: np.ndarray,
    maps: np.ndarray,
    segment_ids: np.ndarray,
    possible: np.ndarray,
    row_runs: tuple,
    col_runs: tuple,
    max_tile_elements: int,
) -> None:
    """Score, pixel by pixel, the blocks of ``out`` where more than one segment is ``possible``.

    Blocks with the same number of candidates and the same shape are scored
    together (one set of array operations per group, not per block: most
    groups are the boundary blocks of two segments, of a few shapes), in
    chunks of at most ``max_tile_elements`` scores. Per pixel the arithmetic is
    that of one block alone: resampled along x, then along y (float32), first
    maximum wins.
    """
    row_starts, row_stops, ry0, ry1, wy = row_runs
    col_starts, col_stops, cx0, cx1, wx = col_runs
    count = possible.sum(axis=0)
    block_a, block_b = np.nonzero(count > 1)
    if block_a.size == 0:
        return
    heights = (row_stops - row_starts)[block_a]
    widths = (col_stops - col_starts)[block_b]
    # Each block's segments, its candidates first in increasing segment order (a group takes the first C).
    ranked = np.argsort(~possible[:, block_a, block_b], axis=0, kind="stable").T  # (blocks, K)
    # One integer per (candidates, height, width), ordered as the triples are
    # (cheaper than np.unique over rows of triples).
    height_span, width_span = int(heights.max()) + 1, int(widths.max()) + 1
    codes = (count[block_a, block_b].astype(np.int64) * height_span + heights) * width_span + widths
    keys, group_of = np.unique(codes, return_inverse=True)
    triples = zip(keys // (height_span * width_span), keys // width_span % height_span, keys % width_span)
    for key_index, (candidates_per_block, height, width) in enumerate(triples):
        members = np.flatnonzero(group_of.reshape(-1) == key_index)
        candidates = ranked[members, :candidates_per_block]  # (G, C)
        a, b = block_a[members], block_b[members]
        xs = col_starts[b][:, None] + np.arange(width)  # (G, width)
        weight_x = wx[xs][:, None, :]  # (G, 1, width)

        # (G, C, width): a row of every block resampled along x; called in this iteration only (hence the noqa)
        def along_x(source_rows, left, right):
            at_left = maps[candidates, source_rows[:, None], left[:, None]][:, :, None]  # noqa: B023
            return at_left + weight_x * (maps[candidates, source_rows[:, None], right[:, None]][:, :, None] - at_left)  # noqa: B023

        top_row = along_x(ry0[a], cx0[b], cx1[b])
        rise = along_x(ry1[a], cx0[b], cx1[b]) - top_row
        ids = segment_ids[candidates].astype(np.int32)  # (G, C)
        per_row = int(width) * int(candidates_per_block)
        rows_per_tile = int(max(1, min(height, int(max_tile_elements) // per_row)))
        blocks_per_tile = int(max(1, int(max_tile_elements) // (per_row * rows_per_tile)))
        for first_block in range(0, members.shape[0], blocks_per_tile):
            tile = slice(first_block, first_block + blocks_per_tile)
            for first_row in range(0, int(height), rows_per_tile):
                rows = row_starts[a[tile]][:, None] + np.arange(first_row, min(int(height), first_row + rows_per_tile))
                weight_y = wy[rows][:, :, None]  # (g, r, 1)
                # A running first maximum over the candidates (strictly greater
                # replaces: ties stay with the lower label, as argmax would).
                best = top_row[tile, None, 0] + weight_y * rise[tile, None, 0]  # (g, r, width)
                winner = np.broadcast_to(ids[tile, 0, None, None], best.shape).copy()
                for k in range(1, int(candidates_per_block)):
                    score = top_row[tile, None, k] + weight_y * rise[tile, None, k]
                    better = score > best
                    np.copyto(best, score, where=better)
                    np.copyto(winner, ids[tile, k, None, None], where=better)
                # One slice assignment per block: cheaper than a fancy-indexed scatter.
                for block_rows, block_first_col, block_winner in zip(rows, col_starts[b[tile]], winner):
                    out[block_rows[0] : block_rows[-1] + 1, block_first_col : block_first_col + width] = block_winner


class SegmentStats(NamedTuple):
    """Per-label statistics of a label map; index k describes label k.

    area: (K,) int64 pixel counts (0 for labels that do not occur).
    bbox: (K, 4) int64 boxes ``[x0, y0, x1, y1]`` with exclusive x1, y1, so
        ``mask[y0:y1, x0:x1]`` is the tightest crop; all zeros where area is 0.
    """

    area: np.ndarray
    bbox: np.ndarray


# Pixels per chunk in segment_stats, to bound its scratch arrays (one bool per
# pixel, a few int64 per run of equal labels).
_STATS_CHUNK_PIXELS = 1 << 22


def _label_runs(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, first pixel, last pixel) of every horizontal run of equal labels in
    a C-ordered (rows, W) block; pixels as flat indices into the block."""
    flat = block.reshape(-1)
    width = block.shape[1]
    # boundary[i]: a run starts at pixel i (i < size) or the last one ends before it.
    boundary = np.empty(flat.shape[0] + 1, dtype=bool)
    np.not_equal(flat[1:], flat[:-1], out=boundary[1:-1])
    boundary[::width] = True  # every row starts a run (and ends the previous row's)
    boundary[-1] = True
    edges = np.flatnonzero(boundary)
    return flat[edges[:-1]], edges[:-1], edges[1:] - 1


def segment_stats(mask, num_segments: int | None = None) -> SegmentStats:
    """Area and bounding box of every label of an (H, W) label map, vectorized.

    Label maps are piecewise constant: the work is one comparison per pixel,
    then everything is computed from the horizontal runs of equal labels
    (a run's length adds to its label's area; only run ends can be a label's
    extreme pixels), far fewer than pixels (benchmarks/RESULTS.md compares it
    with ``np.nonzero`` passes over the pixels).

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
    if num_segments is None:
        k = int(labels.max()) + 1 if labels.size else 0
    else:
        k = int(num_segments)
    area = np.zeros(k, dtype=np.int64)
    x_min = np.full(k, width, dtype=np.int64)
    x_max = np.full(k, -1, dtype=np.int64)
    y_min = np.full(k, height, dtype=np.int64)
    y_max = np.full(k, -1, dtype=np.int64)
    rows_per_chunk = max(1, _STATS_CHUNK_PIXELS // max(1, width))
    for start in range(0, height if width else 0, rows_per_chunk):
        block = np.ascontiguousarray(labels[start : start + rows_per_chunk])
        run_labels, firsts, lasts = _label_runs(block)
        # Every pixel is in a run of its own label: the runs have the pixels' extremes.
        if run_labels.min() < 0:
            raise ValueError("mask labels must be >= 0")
        if int(run_labels.max()) >= k:
            raise ValueError(f"num_segments={k} but the mask contains label {int(run_labels.max())}")
        run_labels = run_labels.astype(np.intp)
        ys, first_xs = np.divmod(firsts, width)
        np.add.at(area, run_labels, lasts - firsts + 1)
        np.minimum.at(x_min, run_labels, first_xs)
        np.maximum.at(x_max, run_labels, lasts - ys * width)
        ys += start
        np.minimum.at(y_min, run_labels, ys)
        np.maximum.at(y_max, run_labels, ys)
    bbox = np.stack([x_min, y_min, x_max + 1, y_max + 1], axis=1)
    bbox[area == 0] = 0
    return SegmentStats(area=area, bbox=bbox)
