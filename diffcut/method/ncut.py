"""Affinity and recursive normalized cut of DiffCut (docs/method.md §2.2-2.3).

DiffCut (Couairon et al., NeurIPS 2024, arXiv:2406.02842, Sec. 3.2) segments a
feature map by recursively bipartitioning the graph of its cells with the
normalized cut of Shi and Malik ("Normalized Cuts and Image Segmentation",
TPAMI 2000):

* affinity (§2.2): L2-normalize every cell's feature vector, take the cosine
  similarity of every pair, min-max scale all entries to [0, 1] and raise them
  to the power ``alpha``;
* recursion (§2.3): for a region R, take the eigenvector ``v`` of the
  second-smallest eigenvalue of ``I - D^-1/2 W_R D^-1/2`` and ``y = D^-1/2 v``;
  among the 100 threshold cuts ``S_t = {y > t}`` with ``t`` evenly spaced from
  ``0.99 min(y)`` to ``0.99 max(y)`` keep the first one of least
  ``NCut(S) = cut(S, R\\S) / vol(S) + cut(S, R\\S) / vol(R\\S)``; split R while that
  value is below ``tau``. The segments are the leaves.

The result is the same as the plain definition, :mod:`diffcut.method.ncut_reference`
(one full eigendecomposition per region, one NCut evaluation per threshold:
read it first), computed faster:

* only the Fiedler vector is computed, by Lanczos iteration with full
  reorthogonalization on ``D^-1/2 W_R D^-1/2`` restricted to the complement of
  its known top eigenvector ``D^1/2 1`` (the Laplacian's null vector). Affinity
  graphs have a few eigenvalues near 1 (one per well separated group) and a bulk
  near 0. Telling the Fiedler vector from the other members of that near-1
  cluster is what costs most products; so a region's solve also resolves its
  cluster, and each child starts from the Rayleigh-Ritz vector of its parent's
  cluster restricted to its cells (a warm start, see ``fiedler._warm_start``),
  under the same convergence test; the
  images of those vectors under the child's operator come from the parent's
  and the block between the two children (``children_clusters``), not from
  products. (Not shift-invert: its Cholesky factorization alone costs too
  much.) Products use BLAS symv, which reads one triangle of the symmetric matrix;
* the candidate cuts are nested sets along sorted ``y``: the cells are binned by
  the candidates' boundaries, ``W_R`` is summed into a (bins x bins) matrix in
  one pass, and every cut value is read from its 2-D prefix sums;
* most splits peel a small group off a large region: a large child keeps
  working on its parent's matrix (zero-padded products) instead of being
  copied out, and gets its degrees from the parent's bin sums.

The affinity itself (the Gram matrix of the features, O(n^2 c)) is computed by
BLAS ssyrk in float32 (half the memory traffic of float64; the cosine
similarities then carry errors of about 1e-7, which changed no segment on the
benchmark maps, benchmarks/RESULTS.md), scaled and raised to ``alpha`` in
float32 too (same zero entries as in float64); the recursion is float64.

The parts live in their own modules, and this one re-exports their public
names: :mod:`diffcut.method.affinity` (§2.2 and the input checks),
:mod:`diffcut.method.region_graph` (regions as induced subgraphs),
:mod:`diffcut.method.fiedler` (step 2, the solvers),
:mod:`diffcut.method.cut_search` (step 3, the candidate cuts),
:mod:`diffcut.method.split_tree` (the tree and its pruning); the recursion
itself (step 4) is here.

Beyond the paper, following docs/method.md §2.3: the recursion is iterative
(an explicit stack, no recursion limit); it terminates on any input (one cell, constant
features, zero vectors, disconnected graphs); an exact search over all sweep
cuts of sorted ``y`` is available; and the split tree is returned so that the
segmentation for any smaller threshold is a pruning of it, with no new
eigenvector computations (the best cut of a region does not depend on ``tau``).

Disconnected regions (the graph of ``W_R > 0`` has several connected
components) are split explicitly: one component against the rest, with NCut 0.
Any Fiedler vector of a disconnected graph is constant on components, so the
definition separates components with zero cuts too; the leaves are the same.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from diffcut.method.affinity import affinity_from_cells, affinity_matrix, cell_features, check_alpha, check_tau
from diffcut.method.cut_search import (
    GRID_SCALE,
    GRID_SIZE,
    best_cut,
    best_region_cut,
    candidate_ncuts,
    connected_component_of,
    grid_thresholds,
    ncut_value,
    sweep_thresholds,
)
from diffcut.method.defaults import DEFAULT_ALPHA, DEFAULT_TAU
from diffcut.method.fiedler import DENSE_EIGH_MAX_CELLS, children_clusters, fiedler_vector, region_fiedler
from diffcut.method.region_graph import RegionGraph
from diffcut.method.split_tree import SplitTree, first_appearance_labels

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # optional: without it BLAS keeps its own thread count
    ThreadpoolController = None

__all__ = [
    "GRID_SIZE",
    "GRID_SCALE",
    "affinity_matrix",
    "fiedler_vector",
    "grid_thresholds",
    "sweep_thresholds",
    "candidate_ncuts",
    "ncut_value",
    "best_cut",
    "connected_component_of",
    "recursive_ncut",
    "SplitTree",
]

# A child region is copied out of its ambient matrix once it has at most this
# fraction of the ambient cells; larger ones work on the ambient matrix (see
# RegionGraph). Products with the ambient matrix cost (1/fraction)^2 times
# more; a copy costs about as much as 6 products.
_COPY_FRACTION = 0.8

_THREADPOOLS = None


def _one_blas_thread():
    """Context limiting BLAS to one thread (a no-op without threadpoolctl).

    The recursion makes many small BLAS calls (products with one vector,
    small eigendecompositions), where threads only add synchronization. One
    thread also makes the results independent of the caller's thread settings.
    """
    global _THREADPOOLS
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS.limit(limits=1, user_api="blas")


def _split_region(
    graph: RegionGraph, exact_search: bool, tau: float, cluster: tuple | None = None
) -> tuple[np.ndarray | None, float, np.ndarray | None, tuple | None]:
    """Best bipartition of one region: (mask of S over its cells, or None; its NCut, or +inf;
    if NCut < ``tau``, every cell's degree within its side, else None; the cluster
    basis for the children's warm starts, or None).

    A disconnected region (``W_R > 0`` has several components) splits the
    component of its largest-degree cell off at NCut 0. Dense affinities
    almost always have a cell joined to every other one, so one row decides
    connectivity; otherwise a breadth-first search does.
    """
    if graph.size < 2:
        return None, float("inf"), None, None
    degrees = graph.degrees()
    hub = int(np.argmax(degrees))
    row = graph.row(hub) > 0
    row[hub] = True
    if not row.all():
        component = connected_component_of(graph.matrix(), hub)
        if not component.all():
            return component, 0.0, None, None
    y, basis = region_fiedler(graph, degrees, cluster)
    return (*best_region_cut(graph, y, exact_search, tau), basis)


def _grow_tree(
    affinity: np.ndarray, degrees: np.ndarray | None, tau: float, exact_search: bool
) -> tuple[np.ndarray, list[int], list[float]]:
    """The recursion of §2.3 on an affinity matrix: (leaf node of every cell, parents, NCut values).

    Depth-first with an explicit stack; node indices are given in creation
    order, so every parent precedes its children.
    """
    n = affinity.shape[0]
    parent = [-1]
    ncut = [np.nan]
    leaf_of_cell = np.empty(n, dtype=np.int64)
    # (node, its cells, its graph, its warm-start cluster from the parent's, or None)
    stack = [(0, np.arange(n), RegionGraph(affinity, degrees=degrees), None)]
    while stack:
        node, cells, graph, cluster = stack.pop()
        if graph.positions is not None and (
            graph.size <= DENSE_EIGH_MAX_CELLS or graph.size <= _COPY_FRACTION * graph.ambient.shape[0]
        ):
            graph = graph.extracted()
        in_s, value, side_degrees, basis = _split_region(graph, exact_search, tau, cluster)
        ncut[node] = value
        if in_s is not None and value < tau:
            positions = np.arange(graph.size) if graph.positions is None else graph.positions
            clusters = children_clusters(graph, in_s, side_degrees, basis)
            for part, child_cluster in zip((in_s, ~in_s), clusters):
                parent.append(node)
                ncut.append(np.nan)
                child = RegionGraph(
                    graph.ambient,
                    positions[part],
                    None if side_degrees is None else side_degrees[part],
                )
                stack.append((len(parent) - 1, cells[part], child, child_cluster))
        else:
            leaf_of_cell[cells] = node
        del graph
    return leaf_of_cell, parent, ncut


def recursive_ncut(
    features: Any,
    tau: float = DEFAULT_TAU,
    alpha: float = DEFAULT_ALPHA,
    *,
    exact_search: bool = False,
    return_tree: bool = False,
):
    """Segment a feature map by DiffCut's recursive normalized cut (docs/method.md §2.2-2.3).

    Starting from all cells, every region is split along its best candidate
    cut (:func:`best_cut` of its :func:`fiedler_vector`) while that cut's NCut
    is below ``tau``; the final regions are the segments. The plain definition
    is :func:`diffcut.method.ncut_reference.recursive_ncut`; this fast path
    gives the same segments. Iterative (explicit stack): any depth works.
    Disconnected regions split one connected component off at NCut 0. During
    the recursion BLAS is limited to one thread (with threadpoolctl; the
    affinity keeps the caller's setting).

    Parameters
    ----------
    features : array_like or torch.Tensor
        (h, w, c) feature map of real numbers; an (n, c) array gives (n,) labels.
    tau : float, default 0.5
        The NCut threshold (paper: 0.5): a region splits while its best cut's NCut is below it.
    alpha : float, default 10.0
        The affinity exponent (paper: 10), > 0.
    exact_search : bool, default False
        Search all sweep cuts of sorted ``y`` instead of the 100-point grid.
    return_tree : bool, default False
        Also return the :class:`SplitTree`.

    Returns
    -------
    labels : numpy.ndarray
        (h, w) int32 labels 0..K-1, numbered by first appearance in raster order.
    tree : SplitTree
        Only with ``return_tree``: every region's parent and best-cut NCut, so that
        :meth:`SplitTree.prune` gives the segments at any smaller ``tau``.

    Raises
    ------
    ValueError
        NaN/inf features, wrong number of dimensions, empty input, alpha <= 0, or tau NaN.

    References
    ----------
    .. [1] P. Couairon, M. Shukor, J.-E. Haugeard, M. Cord and N. Thome, "DiffCut: Catalyzing
       Zero-Shot Semantic Segmentation with Diffusion Features and Recursive Normalized Cut",
       NeurIPS 2024, arXiv:2406.02842, Sec. 3.2.
    .. [2] J. Shi and J. Malik, "Normalized Cuts and Image Segmentation", IEEE TPAMI 22(8), 2000.

    Examples
    --------
    Three groups of cells: the left half, the right half's top rows and its bottom rows.

    >>> import numpy as np
    >>> from diffcut.method.ncut import recursive_ncut
    >>> features = np.zeros((4, 6, 3))
    >>> features[:, :3] = [1, 0, 0]
    >>> features[:2, 3:] = [0, 1, 0]
    >>> features[2:, 3:] = [0, 1, 1]
    >>> labels, tree = recursive_ncut(features, tau=0.5, return_tree=True)
    >>> print(labels)
    [[0 0 0 1 1 1]
     [0 0 0 1 1 1]
     [0 0 0 2 2 2]
     [0 0 0 2 2 2]]

    The root split has NCut 0 (no affinity between the halves), the right half's
    0.061; the leaves' best cuts (1) are rejected:

    >>> print(tree.parent, tree.ncut.round(3))
    [-1  0  0  2  2] [0.    1.    0.061 1.    1.   ]
    """
    tau = check_tau(tau)
    alpha = check_alpha(alpha)
    cells, shape = cell_features(features)
    affinity, degrees = affinity_from_cells(cells, alpha)
    del cells
    with _one_blas_thread():
        leaf_of_cell, parent, ncut = _grow_tree(affinity, degrees, tau, exact_search)
    labels = first_appearance_labels(leaf_of_cell).reshape(shape)
    if not return_tree:
        return labels
    count = int(labels.max()) + 1
    leaf_of_label = np.empty(count, dtype=np.int64)
    leaf_of_label[labels.reshape(-1)] = leaf_of_cell
    tree = SplitTree(
        parent=np.asarray(parent),
        ncut=np.asarray(ncut),
        leaf_of_label=leaf_of_label,
        labels=labels,
        tau=tau,
        alpha=alpha,
        exact_search=exact_search,
    )
    return labels, tree
