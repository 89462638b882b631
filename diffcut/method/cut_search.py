"""The candidate cuts of a region and the best of them (docs/method.md §2.3, step 3).

The 100 threshold cuts ``S_t = {y > t}`` of the Fiedler vector ``y``, ``t``
evenly spaced from ``0.99 min(y)`` to ``0.99 max(y)``, scored by
``NCut(S) = cut(S, R\\S) / vol(S) + cut(S, R\\S) / vol(R\\S)`` (Shi and Malik, TPAMI
2000, Eq. 2), all at once from the prefix sums of a binned affinity; the first
of least NCut wins. Also the exact sweep over all cuts of sorted ``y``, and
connected components.
"""

from __future__ import annotations

import numpy as np

from diffcut.method.region_graph import RegionGraph, as_graph

#: Number of evenly spaced thresholds of the candidate grid (§2.3, step 3).
GRID_SIZE = 100
#: The grid runs from GRID_SCALE * min(y) to GRID_SCALE * max(y) inclusive.
GRID_SCALE = 0.99


# 0, 1, ..., GRID_SIZE - 1: the grid's steps.
_GRID_STEPS = np.arange(GRID_SIZE, dtype=np.float64)


def grid_thresholds(y: np.ndarray) -> np.ndarray:
    """The paper's candidate thresholds: GRID_SIZE evenly spaced values from
    ``0.99 * min(y)`` to ``0.99 * max(y)`` inclusive (§2.3, step 3), ascending.

    Bit for bit ``np.linspace(start, stop, GRID_SIZE)`` (the same operations in
    the same order: ``k * step + start``, the last one ``stop``), without its
    argument handling, which costs more than the arithmetic (called once per region).
    """
    start = GRID_SCALE * float(np.min(y))
    stop = GRID_SCALE * float(np.max(y))
    step = (stop - start) / (GRID_SIZE - 1)
    if step == 0 or not np.isfinite(step):
        return np.linspace(start, stop, GRID_SIZE)  # numpy's own handling of these cases
    thresholds = _GRID_STEPS * step
    thresholds += start
    thresholds[-1] = stop
    return thresholds


def sweep_thresholds(y: np.ndarray) -> np.ndarray:
    """Thresholds of the exact sweep: every distinct value of ``y`` but the largest, ascending.

    ``{y > t}`` over these ``t`` is every nonempty proper set of cells that a
    threshold on ``y`` can separate (all sweep cuts of sorted ``y``).
    """
    return np.unique(y)[:-1]


def ncut_value(affinity: np.ndarray, in_s: np.ndarray) -> float:
    """``NCut(S) = cut(S, R\\S)/vol(S) + cut(S, R\\S)/vol(R\\S)`` (Shi and Malik 2000, Eq. 2).

    ``vol`` is the sum of degrees (row sums of ``affinity``) over a set. An
    empty or full ``S`` is not a cut: +inf. A cut of value 0 has NCut 0.

    Args:
        affinity: (n, n) symmetric nonnegative matrix of the region.
        in_s: (n,) boolean mask of S.
    """
    in_s = np.asarray(in_s, dtype=bool)
    if not in_s.any() or in_s.all():
        return float("inf")
    cut = float(affinity[np.ix_(in_s, ~in_s)].sum())
    if cut == 0:
        return 0.0
    degrees = affinity.sum(axis=1)
    return cut / float(degrees[in_s].sum()) + cut / float(degrees[~in_s].sum())


def candidate_ncuts(affinity: np.ndarray, y: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """NCut of every candidate ``S_t = {i : y_i > t}``, all at once; +inf where S_t is empty or full.

    The candidates are nested along sorted ``y``. The cells are put into bins
    between consecutive candidate boundaries, ``W`` is summed into a
    (bins x bins) matrix ``B`` in one pass, and for the boundary after bin j
    ``cut = sum_{a <= j < b} B[a, b]`` is read from the 2-D prefix sums of ``B``
    (only additions of nonnegative numbers: no cancellation). Volumes are the
    row sums of ``B`` accumulated from each end. O(n^2) for the whole set.

    Args:
        affinity: (n, n) symmetric nonnegative matrix.
        y: (n,) values whose upper level sets are the candidates.
        thresholds: (T,) thresholds ``t``.

    Returns:
        (T,) float64 NCut values.
    """
    return _candidate_ncuts(as_graph(affinity), np.asarray(y, dtype=np.float64), thresholds)[0]


def _candidate_ncuts(graph: RegionGraph, y: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, tuple | None]:
    """(NCut of every threshold, (order, cells at or below each threshold, edges, per-bin
    affinity of each cell) or None)."""
    n = y.shape[0]
    thresholds = np.asarray(thresholds, dtype=np.float64)
    order = np.argsort(y, kind="stable")
    # Cells with y <= t form the complement R \ S_t; their count is a boundary
    # position in the ascending order.
    below = np.searchsorted(y[order], thresholds, side="right")
    result = np.full(thresholds.shape[0], np.inf)
    # The proper cuts: 0 < below < n, a contiguous run (``below`` ascends with the thresholds).
    first, stop = int(np.searchsorted(below, 0, side="right")), int(np.searchsorted(below, n, side="left"))
    if first >= stop:
        return result, None
    # The boundaries in use, without repeats.
    boundaries = below[first:stop]
    inner = boundaries[np.concatenate(([True], boundaries[1:] != boundaries[:-1]))]
    edges = np.concatenate(([0], inner, [n]))
    per_bin = graph.bin_sums(order, edges)
    blocks = np.add.reduceat(per_bin, edges[:-1], axis=1)
    # cut after bin j: sum over a <= j < b of blocks[a, b]
    upper_rows = np.cumsum(blocks, axis=0)  # [a, b] = sum_{a' <= a} blocks[a', b]
    upper = np.cumsum(upper_rows[:, ::-1], axis=1)[:, ::-1]  # [a, b] = sum_{a'<=a, b'>=b}
    cuts = np.diagonal(upper, 1)  # [j, j + 1]
    bin_volume = blocks.sum(axis=1)
    vol_below = np.cumsum(bin_volume)[:-1]
    vol_above = np.cumsum(bin_volume[::-1])[::-1][1:]
    # A positive cut has positive volumes on both sides; a zero cut is NCut 0
    # (computed only where positive: no 0/0 where a side's volume is 0).
    cut = cuts > 0
    boundary_ncut = np.divide(cuts, vol_above, out=np.zeros_like(cuts), where=cut)
    boundary_ncut += np.divide(cuts, vol_below, out=np.zeros_like(cuts), where=cut)
    # below == inner[k] is boundary k
    result[first:stop] = boundary_ncut[np.searchsorted(inner, boundaries)]
    return result, (order, below, edges, per_bin)


def best_cut(affinity: np.ndarray, y: np.ndarray, *, exact_search: bool = False) -> tuple[np.ndarray | None, float]:
    """The candidate cut of least NCut (§2.3, step 3), the first one on ties.

    Args:
        affinity: (n, n) symmetric matrix of a graph with positive degrees.
        y: (n,) Fiedler vector of that graph.
        exact_search: search all sweep cuts of sorted ``y``
            (:func:`sweep_thresholds`) instead of the 100-point grid
            (:func:`grid_thresholds`). Both scan thresholds in ascending order.

    Returns:
        (mask of S = {y > t*}, NCut) — or (None, +inf) when no candidate is a
        proper nonempty subset.
    """
    return best_region_cut(as_graph(affinity), np.asarray(y, dtype=np.float64), exact_search)[:2]


def best_region_cut(
    graph: RegionGraph, y: np.ndarray, exact_search: bool, tau: float = -np.inf
) -> tuple[np.ndarray | None, float, np.ndarray | None]:
    """(mask of S, its NCut, every cell's degree within its own side) — see :func:`best_cut`.

    When the cut is accepted (NCut < ``tau``), the degrees within each side
    come free from the per-bin sums and save the children a pass over their
    matrices; otherwise they are None.
    """
    thresholds = sweep_thresholds(y) if exact_search else grid_thresholds(y)
    if thresholds.shape[0] == 0:
        return None, float("inf"), None
    values, sums = _candidate_ncuts(graph, y, thresholds)
    best = int(np.argmin(values))
    if not np.isfinite(values[best]):
        return None, float("inf"), None
    if not values[best] < tau:
        return y > thresholds[best], float(values[best]), None
    order, below, edges, per_bin = sums
    # S = the cells past boundary position `split` in ascending-y order
    split = int(below[best])
    last_below = int(np.searchsorted(edges, split)) - 1  # bins 0..last_below are R \ S
    side_degrees = np.empty(y.shape[0])
    side_degrees[order[:split]] = per_bin[: last_below + 1, :split].sum(axis=0)
    side_degrees[order[split:]] = per_bin[last_below + 1 :, split:].sum(axis=0)
    return y > thresholds[best], float(values[best]), side_degrees


def connected_component_of(affinity: np.ndarray, cell: int) -> np.ndarray:
    """Mask of the connected component of ``cell`` in the graph ``affinity > 0``.

    Breadth-first search with dense row blocks: each round looks only at the
    edges between the newest frontier and the cells not reached yet.
    """
    n = affinity.shape[0]
    reached = np.zeros(n, dtype=bool)
    reached[cell] = True
    frontier = np.array([cell])
    while frontier.size:
        unreached = np.flatnonzero(~reached)
        if unreached.size == 0:
            break
        hit = (affinity[np.ix_(frontier, unreached)] > 0).any(axis=0)
        frontier = unreached[hit]
        reached[frontier] = True
    return reached
