"""Affinity and recursive normalized cut of DiffCut (DESIGN.md §2.2-2.3).

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

The result is the same as the plain definition (one full eigendecomposition per
region, one NCut evaluation per threshold), computed faster:

* only the Fiedler vector is computed, by Lanczos iteration with full
  reorthogonalization on ``D^-1/2 W_R D^-1/2`` restricted to the complement of
  its known top eigenvector ``D^1/2 1`` (the Laplacian's null vector). Affinity
  graphs have a few eigenvalues near 1 (one per well separated group) and a bulk
  near 0. Telling the Fiedler vector from the other members of that near-1
  cluster is what costs (about 100 products at 16 groups, 200 at 32); so a
  region's solve also resolves its cluster, and each child starts from the
  Rayleigh-Ritz vector of its parent's cluster restricted to its cells (a
  warm start, see ``_warm_start``), under the same convergence test.
  (Shift-invert needs a Cholesky factorization, which alone measured 1/17 to
  1/22 of a full eigendecomposition on one core: too slow.) Products use BLAS symv, which
  reads one triangle of the symmetric matrix;
* the candidate cuts are nested sets along sorted ``y``: the cells are binned by
  the candidates' boundaries, ``W_R`` is summed into a (bins x bins) matrix in
  one pass, and every cut value is read from its 2-D prefix sums;
* most splits peel a small group off a large region: a large child keeps
  working on its parent's matrix (zero-padded products) instead of being
  copied out, and gets its degrees from the parent's bin sums.

The affinity itself (the Gram matrix of the features, O(n^2 c)) is computed by
BLAS ssyrk in float32 (2.9x faster than float64 on one core; the cosine
similarities then carry errors of about 1e-7, which changed no segment on the
benchmark maps, benchmarks/RESULTS.md); everything after it is float64. On
benchmarks/ncut.py's maps it is about a third of this module's time.

Beyond the paper, following DESIGN.md: the recursion is iterative (an explicit
stack, no recursion limit); it terminates on any input (one cell, constant
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
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse
from scipy.linalg import blas, lapack

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

#: Number of evenly spaced thresholds of the candidate grid (§2.3, step 3).
GRID_SIZE = 100
#: The grid runs from GRID_SCALE * min(y) to GRID_SCALE * max(y) inclusive.
GRID_SCALE = 0.99

# Row strips of the affinity computation are about this many bytes (in cache).
_STRIP_BYTES = 1 << 20
# Regions up to this many cells get their Fiedler vector from a dense
# eigendecomposition: there it costs less than the Python overhead of Lanczos.
_DENSE_EIGH_MAX_CELLS = 128
# Lanczos stops when the residual norm of the top Ritz pair of the deflated,
# normalized affinity (spectral norm <= 1) is below this. The eigenvector error
# is about residual / spectral gap. Measured against a dense eigendecomposition
# on the benchmark's regions: median 1e-13, worst 1e-10 (a gap of 3e-5), far
# below the distance of cells to the candidate thresholds.
_LANCZOS_TOL = 1e-13
_LANCZOS_MAX_STEPS = 400
# The most Lanczos steps between two convergence checks (see _lanczos_fiedler).
_MAX_CHECK_INTERVAL = 8
# A cold start resolves the rest of the cluster for at most this fraction more
# steps, and only if at most this fraction of its Ritz values are in the cluster.
_CLUSTER_EXTRA_STEPS = 1.0
_CLUSTER_MAX_FRACTION = 0.25
# A child region is copied out of its ambient matrix once it has at most this
# fraction of the ambient cells; larger ones work on the ambient matrix (see
# _RegionGraph). Products with the ambient matrix cost (1/fraction)^2 times
# more; a copy costs about as much as 6 products.
_COPY_FRACTION = 0.8
# Fixed seed of the Lanczos start vector: the same region (reached through the
# same ancestors) always gives the same vector, so pruning a tree equals a
# fresh run bit for bit.
_LANCZOS_SEED = 20240604
# Warm start of a child region (see _warm_start): Ritz values above this count
# as the cluster of near-1 eigenvalues that the parent's solve resolved ...
_CLUSTER_MIN_RITZ = 0.5
# ... its Ritz vectors are kept when their residual estimate is below this ...
_CLUSTER_RESIDUAL = 1e-9
# ... a restricted parent direction is kept when its singular value (the part of
# it that lies on the child's cells) is above this ...
_CLUSTER_MIN_WEIGHT = 0.1
# ... and the start vector is the best cluster vector plus this much of the
# fixed pseudo-random vector, so that every eigenvector has a share of it.
_WARM_START_RANDOM = 1e-6


_THREADPOOLS = None
# The draws behind _start_vector (grown on demand).
_RANDOM_DRAWS = np.empty(0)


def _one_blas_thread():
    """Context limiting BLAS to one thread (a no-op without threadpoolctl).

    The recursion makes many small BLAS calls (products with one vector,
    small eigendecompositions), where threads only add synchronization: on a
    busy machine two OpenBLAS threads made it 10 to 50 times slower. One thread
    also makes the results independent of the caller's thread settings.
    """
    global _THREADPOOLS
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS.limit(limits=1, user_api="blas")


# ----------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------


def _to_numpy(values: Any) -> np.ndarray:
    """Array view of ``values``; torch tensors (any device, autograd or not) are copied to host."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu()
        if values.is_floating_point() and values.element_size() < 4:
            values = values.float()  # numpy has no bfloat16
        values = values.numpy()
    return np.asarray(values)


def _cell_features(features: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate ``features`` ((h, w, c) or (n, c)) and return (float32 or float64 (n, c) array, grid shape).

    The array is the input itself when it already is float32 or float64 (no copy); it is
    checked for NaN/inf by :func:`_affinity_from_cells`, on its row norms.
    """
    array = _to_numpy(features)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"features must be an (h, w, c) or (n, c) array, got shape {tuple(array.shape)}"
        )
    if array.size == 0:
        raise ValueError(f"features must not be empty, got shape {tuple(array.shape)}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or array.dtype == np.bool_):
        raise ValueError(f"features must be real numbers, got dtype {array.dtype}")
    # float16/float32 stay float32 (their squares cannot overflow float64, in
    # which the norms are computed); everything else becomes float64.
    dtype = np.float32 if array.dtype in (np.float16, np.float32) else np.float64
    cells = np.asarray(array.reshape(-1, array.shape[-1]), dtype=dtype)
    return cells, tuple(int(s) for s in array.shape[:-1])


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    return alpha


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if np.isnan(tau):
        raise ValueError("tau must be a number, got NaN")
    return tau


# ----------------------------------------------------------------------------
# §2.2 Affinity
# ----------------------------------------------------------------------------


def affinity_matrix(features: Any, alpha: float = 10.0) -> np.ndarray:
    """Affinity matrix ``W`` of DiffCut (DESIGN.md §2.2; paper Sec. 3.2, Eq. 2).

    Every feature vector is L2-normalized (zero vectors stay zero), ``A`` is the
    (n, n) cosine-similarity matrix of the n cells, min-max scaled over all its
    entries to [0, 1] (when all entries are equal there is no structure and A is
    all ones), and ``W = A ** alpha``.

    Args:
        features: (h, w, c) or (n, c) array (or torch tensor) of real numbers.
        alpha: the exponent (paper: 10), > 0.

    Returns:
        (n, n) float64 symmetric matrix with entries in [0, 1], n = h * w.
    """
    alpha = _check_alpha(alpha)
    cells, _ = _cell_features(features)
    return _affinity_from_cells(cells, alpha)[0]


def _affinity_from_cells(cells: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The affinity of §2.2 and its row sums, from an (n, c) float32 or float64 array (left unchanged).

    BLAS syrk fills one triangle of the cosine similarities (half the work of
    a full product); the min-max scaling and the power then run over that
    triangle in row strips that stay in cache, each strip is mirrored into the
    other triangle (so the result is exactly symmetric), and the row sums are
    accumulated on the way, saving the recursion a pass over the matrix.
    """
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        # Squares summed in float64 whatever the input (einsum casts on the fly).
        norms = np.sqrt(np.einsum("ij,ij->i", cells, cells, dtype=np.float64))
    suspect = ~np.isfinite(norms) | (norms == 0)
    if suspect.any():
        # A NaN or inf entry makes its row's norm non-finite.
        if not np.isfinite(cells[suspect]).all():
            raise ValueError("features contain NaN or infinite values")
        # Squares of very large (or very small) entries overflow (underflow):
        # scale those rows by their largest entry first.
        cells = cells.copy()
        peak = np.abs(cells[suspect]).max(axis=1)
        rows = np.flatnonzero(suspect)[peak > 0]
        cells[rows] /= peak[peak > 0, None]
        norms[rows] = np.linalg.norm(cells[rows].astype(np.float64), axis=1)
    n = cells.shape[0]
    # Unit vectors, divided in float64 and rounded to float32 in one pass (zero
    # vectors stay zero: 0 / 1).
    unit32 = np.empty(cells.shape, dtype=np.float32)
    np.divide(cells, np.where(norms > 0, norms, 1.0)[:, None], out=unit32, casting="unsafe")
    # The Gram matrix in float32 (BLAS ssyrk: 2.9x faster than dsyrk on one
    # core here; the products of unit vectors carry errors of about 1e-7, far
    # below what separates the cells from the candidate thresholds -- checked on
    # every map of benchmarks/ncut.py and benchmarks/segment_step.py); the
    # scaling, the power and everything after it in float64.
    # syrk on cells.T (Fortran order, no copy) gives the upper triangle of
    # cells @ cells.T in Fortran order: its transpose is C-ordered with the
    # values in the lower triangle (row >= column).
    similarity32 = blas.ssyrk(1.0, unit32.T, trans=1, lower=0).T
    del unit32
    rows = min(n, max(16, _STRIP_BYTES // (8 * n)))
    above_diagonal = np.triu(np.ones((rows, rows), dtype=bool), 1)
    low, high = np.inf, -np.inf
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        diagonal_block = similarity32[start:stop, start:stop]
        size = stop - start
        np.copyto(diagonal_block, diagonal_block.T, where=above_diagonal[:size, :size])
        strip = similarity32[start:stop, :stop]
        low = min(low, float(strip.min()))
        high = max(high, float(strip.max()))
    if high == low:
        return np.ones((n, n)), np.full(n, float(n))
    span = high - low
    similarity = np.empty((n, n))
    scratch = np.empty(rows * n)
    degrees = np.zeros(n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        strip = similarity[start:stop, :stop]
        np.subtract(similarity32[start:stop, :stop], low, out=strip)
        np.divide(strip, span, out=strip)
        _power_in_place(strip, alpha, scratch)
        below_diagonal = similarity[start:stop, :start]
        similarity[:start, start:stop] = below_diagonal.T
        degrees[start:stop] += strip.sum(axis=1)
        degrees[:start] += below_diagonal.sum(axis=0)
    del similarity32
    return similarity, degrees


def _power_in_place(x: np.ndarray, alpha: float, scratch: np.ndarray) -> None:
    """``x **= alpha`` for ``x`` in [0, 1]; ``scratch`` has at least ``x.size`` elements.

    An integer exponent up to 64 (the paper's is 10) goes by binary
    exponentiation, a few multiplications (3.4x faster than ``np.power`` on a
    128 x 1024 strip here; within 6e-16 relative of it at 10); any other
    exponent by ``np.power``.
    """
    exponent = int(alpha)
    if exponent != alpha or not 1 <= exponent <= 64:
        np.power(x, alpha, out=x)
        return
    base = scratch[: x.size].reshape(x.shape)
    np.copyto(base, x)
    for bit in bin(exponent)[3:]:
        np.multiply(x, x, out=x)
        if bit == "1":
            np.multiply(x, base, out=x)


# ----------------------------------------------------------------------------
# Regions as induced subgraphs
# ----------------------------------------------------------------------------


class _RegionGraph:
    """The induced subgraph ``W_R`` of some cells of a symmetric affinity matrix.

    ``ambient`` is a C-ordered symmetric matrix (the whole affinity or an
    ancestor region's copy of it); ``positions`` are the region's cells in it
    (sorted), or None when the region is the whole matrix. Copying a region
    out costs several products with it, and most splits peel a small group off
    a large region, so a large child keeps its parent's matrix and products
    with ``W_R`` are products with the ambient matrix on zero-padded vectors
    (mathematically the same operator; rounding may differ in the last bits).
    """

    __slots__ = ("ambient", "positions", "size", "_padded", "_degrees")

    def __init__(
        self,
        ambient: np.ndarray,
        positions: np.ndarray | None = None,
        degrees: np.ndarray | None = None,
    ) -> None:
        self.ambient = ambient
        if positions is not None and positions.shape[0] == ambient.shape[0]:
            positions = None
        self.positions = positions
        self.size = ambient.shape[0] if positions is None else positions.shape[0]
        self._padded = None
        self._degrees = degrees

    def matrix(self) -> np.ndarray:
        """``W_R`` as its own C-ordered array (a copy unless the region is the whole matrix)."""
        if self.positions is None:
            return self.ambient
        return np.take(np.take(self.ambient, self.positions, axis=0), self.positions, axis=1)

    def extracted(self) -> "_RegionGraph":
        if self.positions is None:
            return self
        return _RegionGraph(self.matrix(), degrees=self._degrees)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``W_R @ x``."""
        return self.product()(x)

    def product(self):
        """A function computing ``W_R @ x``: BLAS symv on ``ambient.T`` (the same
        symmetric matrix in Fortran order) reads one triangle, half the memory
        traffic of gemv; a region inside the ambient matrix uses zero padding."""
        fortran = self.ambient.T
        symv = blas.dsymv
        if self.positions is None:
            return lambda x: symv(1.0, fortran, x, lower=1)
        positions = self.positions
        if self._padded is None:
            self._padded = np.zeros(self.ambient.shape[0])
        padded = self._padded

        def product(x: np.ndarray) -> np.ndarray:
            padded[positions] = x
            return symv(1.0, fortran, padded, lower=1)[positions]

        return product

    def degrees(self) -> np.ndarray:
        """Row sums of ``W_R`` (given by the parent's split when it had them)."""
        if self._degrees is None:
            if self.positions is None:
                self._degrees = self.ambient.sum(axis=1)
            else:
                self._degrees = self.matvec(np.ones(self.size))
        return self._degrees

    def row(self, index: int) -> np.ndarray:
        if self.positions is None:
            return self.ambient[index]
        return self.ambient[self.positions[index], self.positions]

    def bin_sums(self, order: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """Sums of ``W_R`` over bins of rows; bin b = cells ``order[edges[b]:edges[b+1]]``.

        Returns the (bins, n) matrix whose column p holds, for the cell
        ``order[p]``, its total affinity to each bin. The rows are summed per
        bin by a sparse (bins x n) indicator matrix times the matrix: one pass
        over it, no permuted copy.
        """
        bins = edges.shape[0] - 1
        cells = order if self.positions is None else self.positions[order]
        if bins == self.size:
            # Every bin is one cell (exact sweep, distinct values): the permuted matrix.
            return np.take(np.take(self.ambient, cells, axis=0), cells, axis=1)
        indicator = scipy.sparse.csr_matrix(
            (np.ones(self.size), cells, edges), shape=(bins, self.ambient.shape[0])
        )
        return np.take(indicator @ self.ambient, cells, axis=1)


def _as_graph(affinity: np.ndarray) -> _RegionGraph:
    affinity = np.ascontiguousarray(affinity, dtype=np.float64)
    if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity must be a square matrix, got shape {affinity.shape}")
    return _RegionGraph(affinity)


# ----------------------------------------------------------------------------
# §2.3 step 2: the Fiedler vector
# ----------------------------------------------------------------------------


def fiedler_vector(affinity: np.ndarray, degrees: np.ndarray | None = None) -> np.ndarray:
    """Second-smallest generalized eigenvector of a connected graph (§2.3, step 2).

    ``v`` is the eigenvector of the second-smallest eigenvalue of the normalized
    Laplacian ``I - D^-1/2 W D^-1/2`` and the result is ``y = D^-1/2 v``, the
    relaxed normalized-cut indicator of Shi and Malik (2000). The sign is fixed
    like the published DiffCut code: the entry of largest ``|y|`` is positive
    (it only matters for ties between candidate cuts).

    Small graphs use a dense symmetric eigendecomposition. Larger ones use
    Lanczos with full reorthogonalization on ``D^-1/2 W D^-1/2`` with its top
    eigenvector ``D^1/2 1`` (eigenvalue 1) deflated: the Fiedler vector is then
    the top eigenvector, found to a residual of 1e-13 (it agrees with a dense
    eigendecomposition to about 1e-10 or better unless the two smallest
    nontrivial eigenvalues nearly coincide, where any solver's eigenvector is
    ill-determined). If Lanczos does not converge, the dense route is taken.

    Args:
        affinity: (n, n) symmetric nonnegative matrix of a connected graph, n >= 2.
        degrees: its row sums, if already computed (all must be > 0).

    Returns:
        (n,) float64 vector ``y``.
    """
    graph = _as_graph(affinity)
    degrees = graph.degrees() if degrees is None else np.asarray(degrees, dtype=np.float64)
    return _fiedler(graph, degrees)[0]


def _fiedler(
    graph: _RegionGraph, degrees: np.ndarray, cluster: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(``y``, the cluster basis for the children) — see :func:`fiedler_vector` and :func:`_warm_start`.

    ``cluster`` is the parent's cluster basis restricted to this region's cells
    (rows in the region's order), or None.
    """
    if graph.size < 2:
        raise ValueError("the Fiedler vector needs a graph of at least 2 cells")
    if not (degrees > 0).all():
        raise ValueError("the Fiedler vector needs positive degrees (a connected graph)")
    inv_sqrt_d = 1.0 / np.sqrt(degrees)
    v = basis = None
    if graph.size > _DENSE_EIGH_MAX_CELLS:
        start, inherited = _warm_start(graph, degrees, inv_sqrt_d, cluster)
        v, basis = _lanczos_fiedler(graph, degrees, inv_sqrt_d, start)
        if inherited is not None:
            basis = inherited
    if v is None:
        v = _dense_fiedler(graph.matrix(), inv_sqrt_d)
    y = inv_sqrt_d * v
    if y[np.argmax(np.abs(y))] < 0:
        np.negative(y, out=y)
    return y, basis


def _start_vector(trivial: np.ndarray) -> np.ndarray:
    """The fixed pseudo-random unit vector orthogonal to ``trivial``.

    Its entries are the first n draws of one seeded stream (a longer draw has
    the shorter one as its prefix), generated once and kept.
    """
    global _RANDOM_DRAWS
    n = trivial.shape[0]
    if _RANDOM_DRAWS.shape[0] < n:
        _RANDOM_DRAWS = np.random.default_rng(_LANCZOS_SEED).standard_normal(max(n, 4096))
    start = _RANDOM_DRAWS[:n] - trivial * (trivial @ _RANDOM_DRAWS[:n])
    return start / np.linalg.norm(start)


def _warm_start(
    graph: _RegionGraph, d: np.ndarray, inv_sqrt_d: np.ndarray, cluster: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(Lanczos start vector or None for the plain one, cluster basis for the children or None).

    Why: a region of k well separated groups has k - 1 eigenvalues of
    ``D^-1/2 W D^-1/2`` within about 1e-7 of 1 (measured on the 16-region maps:
    1 - 2.5e-8 ... 1 - 4e-7, the rest below 0.37). From one start vector,
    Lanczos needs about 100 products to tell the Fiedler vector from the other
    members of such a cluster, on every region again. A child's cluster is, up
    to the small affinities it loses to its sibling, the part of its parent's
    cluster that lies on its cells; so the parent's cluster vectors, restricted
    to the child and orthonormalized (their SVD, keeping the directions with
    at least _CLUSTER_MIN_WEIGHT of their length on the child), span it
    closely. A Rayleigh-Ritz step with the child's operator on that span gives
    an approximate Fiedler vector; Lanczos starts from it plus
    _WARM_START_RANDOM times the fixed random vector (which gives every
    eigenvector a share, as a random start does) and stops on the same residual
    test as a cold start. Measured (benchmarks/ncut_warm_start.py, products
    with W counted): 2.0x less solver work on 16-region maps, 2.25x on 32,
    1.2x on benchmarks/ncut.py's maps, the same on noise; segments identical on
    every map. On a large child the resulting ``y`` differed from a cold
    start's by about 1e-6 (relative): both are within the cold start's own
    error (residual / gap: 1e-13 / 1e-8). The Rayleigh-Ritz
    vectors of Ritz value above _CLUSTER_MIN_RITZ are the children's cluster
    basis. With no inherited cluster (or none of it above _CLUSTER_MIN_RITZ)
    the start is the plain one.
    """
    if cluster is None or cluster.shape[1] == 0:
        return None, None
    trivial = np.sqrt(d)
    trivial /= np.linalg.norm(trivial)
    restricted = cluster - np.outer(trivial, trivial @ cluster)
    left, weights, _ = np.linalg.svd(restricted, full_matrices=False)
    span = left[:, weights > _CLUSTER_MIN_WEIGHT]
    if span.shape[1] == 0:
        return None, None
    product = graph.product()
    image = np.empty_like(span)
    for column in range(span.shape[1]):
        image[:, column] = inv_sqrt_d * product(inv_sqrt_d * span[:, column])
    projected = span.T @ image
    values, vectors = np.linalg.eigh(0.5 * (projected + projected.T))
    inside = values > _CLUSTER_MIN_RITZ
    if not inside.any():
        return None, None
    ritz_vectors = span @ vectors[:, inside]
    start = ritz_vectors[:, -1] + _WARM_START_RANDOM * _start_vector(trivial)
    return start, ritz_vectors


def _dense_fiedler(affinity: np.ndarray, inv_sqrt_d: np.ndarray) -> np.ndarray:
    """Eigenvector ``v`` of the second-smallest eigenvalue of the normalized Laplacian, dense.

    LAPACK syevr for that one eigenpair (the relatively robust representation
    algorithm); a full eigendecomposition if it reports a failure.
    """
    laplacian = -(inv_sqrt_d[:, None] * affinity * inv_sqrt_d[None, :])
    laplacian[np.diag_indices_from(laplacian)] += 1.0
    _, vectors, found, _, info = lapack.dsyevr(laplacian, range="I", il=2, iu=2)
    if info != 0 or found != 1:
        return np.linalg.eigh(laplacian)[1][:, 1]
    return vectors[:, 0]


def _top_tridiagonal_eigenvector(diagonal: np.ndarray, offdiagonal: np.ndarray) -> np.ndarray | None:
    """Unit eigenvector of the largest eigenvalue of a symmetric tridiagonal matrix (None on failure).

    LAPACK bisection (stebz) for the one eigenvalue and inverse iteration (stein)
    for its vector, called directly: the general wrapper's checks cost more than
    the computation on these small matrices.
    """
    k = diagonal.shape[0]
    if k == 1:
        return np.ones(1)
    found, values, block, split, info = lapack.dstebz(
        diagonal, offdiagonal, 2, 0.0, 0.0, k, k, 0.0, "B"
    )
    if info != 0 or found != 1:
        return None
    vectors, info = lapack.dstein(diagonal, offdiagonal, values[:1], block, split)
    if info != 0:
        return None
    return vectors[:, 0]


def _lanczos_fiedler(
    graph: _RegionGraph, d: np.ndarray, inv_sqrt_d: np.ndarray, start: np.ndarray | None = None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Top eigenvector of ``D^-1/2 W D^-1/2`` on the complement of ``D^1/2 1``, and the cluster basis.

    Returns (None, None) if unconverged. The cluster basis (for the children's
    :func:`_warm_start`) is the Ritz vectors of value above _CLUSTER_MIN_RITZ
    whose residual estimate is below _CLUSTER_RESIDUAL (None if there are none).

    Plain Lanczos with full reorthogonalization (classical Gram-Schmidt,
    repeated when needed): the Krylov basis stays orthonormal to machine
    precision, so the tridiagonal matrix's top Ritz pair and its residual
    estimate ``|beta_j s_j|`` are reliable. The deflated direction is kept out
    of the basis by reorthogonalizing against it at every step (the operator
    maps its complement into itself). The start vector is ``start`` (a warm
    start) or a fixed pseudo-random vector, so a region always gets the same result.

    A cold start goes on after the Fiedler vector converged until every Ritz
    value above _CLUSTER_MIN_RITZ has converged to _CLUSTER_RESIDUAL too, for
    at most _CLUSTER_EXTRA_STEPS times the steps taken so far, unless more
    than _CLUSTER_MAX_FRACTION of the Ritz values are above it (no cluster apart
    from the bulk, as on i.i.d. noise): the children's warm starts need the
    whole cluster (measured on a 32-region map: with only the 24 of its 31
    cluster vectors that had converged with the Fiedler vector, the
    warm-started children took 170 steps instead of 180; with all, 70-100).
    The Fiedler vector is then the top Ritz vector of the larger Krylov space
    (smaller residual still).
    """
    n = graph.size
    max_steps = min(n - 1, _LANCZOS_MAX_STEPS)
    trivial = np.sqrt(d)
    trivial /= np.linalg.norm(trivial)
    # Row 0: the deflated vector; rows 1..: the Lanczos vectors.
    basis = np.empty((max_steps + 2, n))
    basis[0] = trivial
    if start is None:
        basis[1] = _start_vector(trivial)
    else:
        start = start - trivial * (trivial @ start)
        basis[1] = start / np.linalg.norm(start)
    diagonal = np.empty(max_steps)
    offdiagonal = np.empty(max_steps)
    ritz = None
    # A convergence check (the top eigenpair of the small tridiagonal matrix)
    # costs about as much as a product with W of 300 cells, a quarter of the
    # root's time when done every step: the next check comes after half the
    # steps that the residual's decay since the last check predicts are left
    # (at least every 1-3 steps, by size, at most every _MAX_CHECK_INTERVAL).
    # Stopping a few steps late only makes the Ritz pair more accurate.
    min_interval = 1 if n >= 1000 else (2 if n >= 300 else 3)
    next_check = 2
    last_check = None  # (step, residual estimate)
    resolved_at = None  # the step at which the Fiedler vector converged (cold start)
    scaled = np.empty(n)
    product = graph.product()
    axpy = blas.daxpy  # in place on z
    for step in range(max_steps):
        q = basis[step + 1]
        np.multiply(inv_sqrt_d, q, out=scaled)
        z = product(scaled)
        z *= inv_sqrt_d
        alpha = q @ z
        diagonal[step] = alpha
        # The three-term recurrence, then a full reorthogonalization pass
        # (classical Gram-Schmidt), repeated only if it removed much
        # (the Daniel-Gragg-Kaufman-Stewart criterion).
        axpy(q, z, a=-alpha)
        if step:
            axpy(basis[step], z, a=-offdiagonal[step - 1])
        before = math.sqrt(z @ z)
        known = basis[: step + 2]
        z -= (known @ z) @ known
        beta = math.sqrt(z @ z)
        if beta < 0.7 * before:
            z -= (known @ z) @ known
            beta = math.sqrt(z @ z)
        # beta ~ 0: the Krylov space is invariant and its Ritz pairs are exact.
        invariant = beta <= 1e-13
        if resolved_at is not None:
            # Resolving the rest of the cluster for the children (see the docstring).
            if invariant or step == max_steps - 1 or step >= next_check:
                values, vectors = scipy.linalg.eigh_tridiagonal(diagonal[: step + 1], offdiagonal[:step])
                ritz = vectors[:, -1]
                inside = values > _CLUSTER_MIN_RITZ
                if invariant or (beta * np.abs(vectors[-1, inside]) < _CLUSTER_RESIDUAL).all():
                    break
                if step - resolved_at >= _CLUSTER_EXTRA_STEPS * resolved_at:
                    break
                next_check = step + _MAX_CHECK_INTERVAL
        elif invariant or step == max_steps - 1 or step >= next_check:
            vector = _top_tridiagonal_eigenvector(diagonal[: step + 1], offdiagonal[:step])
            residual = math.inf if vector is None else beta * abs(vector[-1])
            if vector is not None and (invariant or residual <= _LANCZOS_TOL):
                ritz = vector
                if invariant or start is not None or step == max_steps - 1:
                    break
                values = scipy.linalg.eigvalsh_tridiagonal(diagonal[: step + 1], offdiagonal[:step])
                if (values > _CLUSTER_MIN_RITZ).sum() > _CLUSTER_MAX_FRACTION * (step + 1):
                    break  # no cluster apart from a bulk (e.g. i.i.d. noise): nothing to resolve
                resolved_at = step
                next_check = step + _MAX_CHECK_INTERVAL
            elif invariant:
                break
            else:
                next_check = step + _check_interval(last_check, step, residual, min_interval)
                last_check = (step, residual)
        offdiagonal[step] = beta
        np.divide(z, beta, out=basis[step + 2])
    if ritz is None:
        return None, None
    steps = ritz.shape[0]
    krylov = basis[1 : steps + 1].T
    v = krylov @ ritz
    return v / np.linalg.norm(v), _converged_cluster(
        krylov, diagonal[:steps], offdiagonal[: steps - 1], beta
    )


def _check_interval(
    last_check: tuple[int, float] | None, step: int, residual: float, min_interval: int
) -> int:
    """Steps until the next convergence check: half the steps to _LANCZOS_TOL
    that the geometric decay of the residual estimate since ``last_check``
    predicts, within [min_interval, _MAX_CHECK_INTERVAL]."""
    if last_check is None or not (0 < residual < last_check[1]):
        return min_interval
    rate = math.log(last_check[1] / residual) / (step - last_check[0])
    left = math.log(residual / _LANCZOS_TOL) / rate
    return int(min(_MAX_CHECK_INTERVAL, max(min_interval, left // 2)))


def _converged_cluster(
    krylov: np.ndarray, diagonal: np.ndarray, offdiagonal: np.ndarray, beta: float
) -> np.ndarray | None:
    """The Ritz vectors of value above _CLUSTER_MIN_RITZ with residual estimate below
    _CLUSTER_RESIDUAL, as (n, m) columns; None if there are none."""
    if diagonal.shape[0] < 2:
        return None
    values, vectors = scipy.linalg.eigh_tridiagonal(diagonal, offdiagonal)
    keep = (values > _CLUSTER_MIN_RITZ) & (beta * np.abs(vectors[-1]) < _CLUSTER_RESIDUAL)
    if not keep.any():
        return None
    return krylov @ vectors[:, keep]


# ----------------------------------------------------------------------------
# §2.3 step 3: candidate cuts
# ----------------------------------------------------------------------------


def grid_thresholds(y: np.ndarray) -> np.ndarray:
    """The paper's candidate thresholds: GRID_SIZE evenly spaced values from
    ``0.99 * min(y)`` to ``0.99 * max(y)`` inclusive (§2.3, step 3), ascending."""
    return np.linspace(GRID_SCALE * float(np.min(y)), GRID_SCALE * float(np.max(y)), GRID_SIZE)


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
    return _candidate_ncuts(_as_graph(affinity), np.asarray(y, dtype=np.float64), thresholds)[0]


def _candidate_ncuts(
    graph: _RegionGraph, y: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, tuple | None]:
    """(NCut of every threshold, (order, edges, per-bin affinity of each cell) or None)."""
    n = y.shape[0]
    thresholds = np.asarray(thresholds, dtype=np.float64)
    order = np.argsort(y, kind="stable")
    # Cells with y <= t form the complement R \ S_t; their count is a boundary
    # position in the ascending order.
    below = np.searchsorted(y[order], thresholds, side="right")
    result = np.full(thresholds.shape[0], np.inf)
    valid = (below > 0) & (below < n)
    if not valid.any():
        return result, None
    inner = np.unique(below[valid])
    edges = np.concatenate(([0], inner, [n]))
    per_bin = graph.bin_sums(order, edges)
    blocks = np.add.reduceat(per_bin, edges[:-1], axis=1)
    # cut after bin j: sum over a <= j < b of blocks[a, b]
    upper_rows = np.cumsum(blocks, axis=0)  # [a, b] = sum_{a' <= a} blocks[a', b]
    upper = np.cumsum(upper_rows[:, ::-1], axis=1)[:, ::-1]  # [a, b] = sum_{a'<=a, b'>=b}
    j = np.arange(blocks.shape[0] - 1)
    cuts = upper[j, j + 1]
    bin_volume = blocks.sum(axis=1)
    vol_below = np.cumsum(bin_volume)[:-1]
    vol_above = np.cumsum(bin_volume[::-1])[::-1][1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        boundary_ncut = np.where(cuts > 0, cuts / vol_above + cuts / vol_below, 0.0)
    # below == inner[k] is boundary k
    result[valid] = boundary_ncut[np.searchsorted(inner, below[valid])]
    return result, (order, edges, per_bin)


def best_cut(
    affinity: np.ndarray, y: np.ndarray, *, exact_search: bool = False
) -> tuple[np.ndarray | None, float]:
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
    return _best_cut(_as_graph(affinity), np.asarray(y, dtype=np.float64), exact_search)[:2]


def _best_cut(
    graph: _RegionGraph, y: np.ndarray, exact_search: bool, tau: float = -np.inf
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
    order, edges, per_bin = sums
    # S = the cells past boundary position `split` in ascending-y order
    split = int(np.searchsorted(y[order], thresholds[best], side="right"))
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


def _split_region(
    graph: _RegionGraph, exact_search: bool, tau: float, cluster: np.ndarray | None = None
) -> tuple[np.ndarray | None, float, np.ndarray | None, np.ndarray | None]:
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
    y, basis = _fiedler(graph, degrees, cluster)
    return (*_best_cut(graph, y, exact_search, tau), basis)


# ----------------------------------------------------------------------------
# §2.3 step 4: the recursion, and its split tree
# ----------------------------------------------------------------------------


def _first_appearance_labels(ids: np.ndarray) -> np.ndarray:
    """Relabel ``ids`` (any integers, flat) to 0..K-1 in order of first appearance."""
    _, first_index, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(first_index.shape[0], dtype=np.int32)
    rank[np.argsort(first_index, kind="stable")] = np.arange(first_index.shape[0], dtype=np.int32)
    return rank[inverse.reshape(-1)]


def _encode_float(value: float) -> float | None:
    return None if np.isinf(value) else float(value)


def _decode_float(value: float | None) -> float:
    return float("inf") if value is None else float(value)


@dataclass(eq=False)
class SplitTree:
    """The split tree of one recursive normalized cut.

    Nodes are regions; node 0 is the whole map and every node's parent has a
    smaller index. For an internal node ``ncut`` is the NCut of its accepted
    split (< ``tau``); for a leaf it is the NCut of its rejected best cut
    (>= ``tau``), or +inf when the region has fewer than 2 cells or no valid cut.
    The final segment ``k`` (label ``k`` of :attr:`labels`) is the leaf
    ``leaf_of_label[k]``.

    Because a region's best cut does not depend on ``tau``, :meth:`prune`
    gives the segmentation for any ``tau' <= tau`` (equal to a fresh run).

    Attributes:
        parent: (N,) int64, -1 for the root.
        ncut: (N,) float64.
        leaf_of_label: (K,) int64 node of each final label.
        labels: the final label map (``shape``), int32, numbered 0..K-1 by
            first appearance in raster order — what :func:`recursive_ncut` returns.
        tau, alpha: the parameters the tree was built with.
        exact_search: whether the exact sweep search was used.
    """

    parent: np.ndarray
    ncut: np.ndarray
    leaf_of_label: np.ndarray
    labels: np.ndarray
    tau: float
    alpha: float
    exact_search: bool = False
    shape: tuple[int, ...] = field(init=False)

    FORMAT = "diffcut.split_tree/1"

    def __post_init__(self) -> None:
        self.parent = np.asarray(self.parent, dtype=np.int64).reshape(-1)
        self.ncut = np.asarray(self.ncut, dtype=np.float64).reshape(-1)
        self.leaf_of_label = np.asarray(self.leaf_of_label, dtype=np.int64).reshape(-1)
        self.labels = np.asarray(self.labels)
        self.tau = float(self.tau)
        self.alpha = float(self.alpha)
        self.exact_search = bool(self.exact_search)
        self.shape = tuple(int(s) for s in self.labels.shape)
        self._validate()

    def _validate(self) -> None:
        nodes = self.parent.shape[0]
        if nodes == 0 or self.ncut.shape[0] != nodes:
            raise ValueError("parent and ncut must have the same nonzero length")
        if self.parent[0] != -1 or not (self.parent[1:] >= 0).all() or not (
            self.parent[1:] < np.arange(1, nodes)
        ).all():
            raise ValueError("node 0 must be the root and every parent must precede its child")
        if np.isnan(self.ncut).any():
            raise ValueError("ncut values must not be NaN")
        labels = self.labels
        if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError("labels must be a nonempty integer label map")
        count = self.leaf_of_label.shape[0]
        if labels.min() != 0 or labels.max() != count - 1:
            raise ValueError(f"labels must use 0..{count - 1} (one per leaf of the tree)")
        children = np.bincount(self.parent[1:], minlength=nodes)
        if not np.isin(children, (0, 2)).all():
            raise ValueError("every internal node must have exactly two children")
        internal = children > 0
        if not (self.ncut[internal] < self.tau).all() or not (self.ncut[~internal] >= self.tau).all():
            raise ValueError("ncut values must be below tau at internal nodes and not below it at leaves")
        leaves = self.leaf_of_label
        if (leaves < 0).any() or (leaves >= nodes).any() or internal[leaves].any() or (
            np.unique(leaves).shape[0] != count or count != nodes - internal.sum()
        ):
            raise ValueError("leaf_of_label must name every leaf node exactly once")
        self.labels = labels.astype(np.int32, copy=False)
        if not np.array_equal(_first_appearance_labels(self.labels.reshape(-1)), self.labels.reshape(-1)):
            raise ValueError("labels must be numbered by first appearance in raster order")

    @property
    def num_nodes(self) -> int:
        return int(self.parent.shape[0])

    @property
    def num_segments(self) -> int:
        return int(self.leaf_of_label.shape[0])

    def is_leaf(self) -> np.ndarray:
        """(N,) bool: whether each node is a final segment."""
        leaf = np.ones(self.num_nodes, dtype=bool)
        leaf[self.parent[1:]] = False
        return leaf

    @property
    def max_tau(self) -> float:
        """Largest threshold :meth:`prune` can serve: the least NCut among the
        leaves (>= ``tau``). Above it some leaf would split into unknown parts."""
        return float(self.ncut[self.is_leaf()].min())

    def prune(self, tau_prime: float) -> np.ndarray:
        """Label map of the recursion run at ``tau_prime``, without recomputation.

        Valid for any ``tau_prime <= tau`` (and up to :attr:`max_tau`). A node
        is split at ``tau'`` iff it was split at ``tau`` and its NCut is below
        ``tau'``; the segments are the regions of the first unsplit nodes on
        each root-to-leaf path. Numbered 0..K'-1 by first appearance in raster
        order, like :func:`recursive_ncut`, and equal to a fresh run at ``tau'``.
        """
        tau_prime = _check_tau(tau_prime)
        if tau_prime > self.max_tau:
            raise ValueError(
                f"a tree built at tau={self.tau} can be pruned only to tau' <= {self.max_tau} "
                f"(its least leaf NCut), got {tau_prime}"
            )
        split = ~self.is_leaf() & (self.ncut < tau_prime)
        # Parents precede children, so one pass in index order finds for every
        # node the unsplit region it ends up in.
        segment_of = np.arange(self.num_nodes)
        for node, parent in enumerate(self.parent[1:].tolist(), start=1):
            if not split[segment_of[parent]]:
                segment_of[node] = segment_of[parent]
        segment_of_label = segment_of[self.leaf_of_label]
        return _first_appearance_labels(segment_of_label[self.labels.reshape(-1)]).reshape(
            self.shape
        )

    def to_dict(self, include_labels: bool = False) -> dict:
        """JSON-able dict (lists, floats, None for +inf) for storage, e.g. in Parquet.

        The label map is left out by default: the caller stores the final label
        map (the latent labels) anyway; pass it back to :meth:`from_dict`. With
        ``include_labels=True`` it is stored as a flat list in raster order.

        Format ``diffcut.split_tree/1``::

            {"format": "diffcut.split_tree/1", "shape": [h, w], "tau": float|None,
             "alpha": float, "exact_search": bool, "parent": [int] (N, -1 for the root),
             "ncut": [float|None] (N, None = +inf), "leaf_of_label": [int] (K),
             "labels": [int] (h*w, only with include_labels)}
        """
        data = {
            "format": self.FORMAT,
            "shape": list(self.shape),
            "tau": _encode_float(self.tau),
            "alpha": self.alpha,
            "exact_search": self.exact_search,
            "parent": self.parent.tolist(),
            "ncut": [_encode_float(v) for v in self.ncut.tolist()],
            "leaf_of_label": self.leaf_of_label.tolist(),
        }
        if include_labels:
            data["labels"] = self.labels.reshape(-1).tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict | str, labels: Any = None) -> "SplitTree":
        """Rebuild a tree from :meth:`to_dict` output (or its JSON text).

        Args:
            data: the dict (or a JSON string of it).
            labels: the final label map of shape ``data["shape"]``; needed unless
                the dict was written with ``include_labels=True``.
        """
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        if data.get("format") != cls.FORMAT:
            raise ValueError(f"not a {cls.FORMAT} dict (format={data.get('format')!r})")
        shape = tuple(int(s) for s in data["shape"])
        if labels is None:
            if "labels" not in data:
                raise ValueError("the dict holds no label map: pass labels=")
            labels = data["labels"]
        labels = _to_numpy(labels)
        if labels.size != int(np.prod(shape)):
            raise ValueError(f"labels have {labels.size} cells, the tree's shape {shape} needs {int(np.prod(shape))}")
        labels = np.asarray(labels).reshape(shape)
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.array_equal(labels, np.round(labels)):
                raise ValueError("labels must be integers")
            labels = labels.astype(np.int64)
        return cls(
            parent=data["parent"],
            ncut=[_decode_float(v) for v in data["ncut"]],
            leaf_of_label=data["leaf_of_label"],
            labels=labels,
            tau=_decode_float(data["tau"]),
            alpha=float(data["alpha"]),
            exact_search=bool(data.get("exact_search", False)),
        )


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
    # (node, its cells, its graph, its parent's cluster basis on its cells)
    stack = [(0, np.arange(n), _RegionGraph(affinity, degrees=degrees), None)]
    while stack:
        node, cells, graph, cluster = stack.pop()
        if graph.positions is not None and (
            graph.size <= _DENSE_EIGH_MAX_CELLS
            or graph.size <= _COPY_FRACTION * graph.ambient.shape[0]
        ):
            graph = graph.extracted()
        in_s, value, side_degrees, basis = _split_region(graph, exact_search, tau, cluster)
        ncut[node] = value
        if in_s is not None and value < tau:
            positions = np.arange(graph.size) if graph.positions is None else graph.positions
            for part in (in_s, ~in_s):
                parent.append(node)
                ncut.append(np.nan)
                child = _RegionGraph(
                    graph.ambient,
                    positions[part],
                    None if side_degrees is None else side_degrees[part],
                )
                stack.append((len(parent) - 1, cells[part], child, None if basis is None else basis[part]))
        else:
            leaf_of_cell[cells] = node
        del graph
    return leaf_of_cell, parent, ncut


def recursive_ncut(
    features: Any,
    tau: float = 0.5,
    alpha: float = 10.0,
    *,
    exact_search: bool = False,
    return_tree: bool = False,
):
    """Segment a feature map by DiffCut's recursive normalized cut (DESIGN.md §2.2-2.3).

    Starting from all cells, every region is split along its best candidate
    cut (:func:`best_cut` of its :func:`fiedler_vector`) while that cut's NCut
    is below ``tau``; the final regions are the segments. Iterative (explicit
    stack): any depth works. Disconnected regions split one connected
    component off at NCut 0. During the recursion BLAS is limited to one
    thread (with threadpoolctl; the affinity keeps the caller's setting).

    Args:
        features: (h, w, c) array or torch tensor (an (n, c) array gives (n,) labels).
        tau: the NCut threshold (paper: 0.5).
        alpha: the affinity exponent (paper: 10).
        exact_search: search all sweep cuts of sorted y instead of the 100-point grid.
        return_tree: also return the :class:`SplitTree`.

    Returns:
        (h, w) int32 labels 0..K-1 numbered by first appearance in raster order;
        with ``return_tree``, ``(labels, tree)``.

    Raises:
        ValueError: NaN/inf features, wrong number of dimensions, empty input,
            alpha <= 0, or tau NaN.
    """
    tau = _check_tau(tau)
    alpha = _check_alpha(alpha)
    cells, shape = _cell_features(features)
    affinity, degrees = _affinity_from_cells(cells, alpha)
    del cells
    with _one_blas_thread():
        leaf_of_cell, parent, ncut = _grow_tree(affinity, degrees, tau, exact_search)
    labels = _first_appearance_labels(leaf_of_cell).reshape(shape)
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
