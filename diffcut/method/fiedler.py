"""The Fiedler vector of a region (docs/method.md §2.3, step 2): dense for small regions, Lanczos for large ones.

``y = D^-1/2 v`` with ``v`` the eigenvector of the second-smallest eigenvalue
of the normalized Laplacian ``I - D^-1/2 W D^-1/2`` (Shi and Malik, "Normalized
Cuts and Image Segmentation", TPAMI 2000). Large regions use Lanczos with full
reorthogonalization on ``D^-1/2 W D^-1/2`` with its known top eigenvector
``D^1/2 1`` deflated; a child region starts from its parent's near-1 cluster
(:func:`_warm_start`). See :mod:`diffcut.method.ncut` for the whole method.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import blas, lapack

from diffcut.method.region_graph import RegionGraph, as_graph
from diffcut.method.small_eigen import (
    count_eigenvalues_above,
    symmetric_eigh,
    top_tridiagonal_eigenvector,
    tridiagonal_eigh,
)

# Regions up to this many cells get their Fiedler vector from a dense
# eigendecomposition: there it costs less than the Python overhead of Lanczos.
DENSE_EIGH_MAX_CELLS = 128
# ... and so do regions up to this many cells that get no warm start: there a cold
# Lanczos needs enough steps to cost more than the dense solver.
_DENSE_COLD_MAX_CELLS = 192
# Lanczos stops when the residual norm of the top Ritz pair of the deflated,
# normalized affinity (spectral norm <= 1) is below this. The eigenvector error
# is about residual / spectral gap: on the benchmark's regions far below the
# distance of cells to the candidate thresholds.
_LANCZOS_TOL = 1e-13
_LANCZOS_MAX_STEPS = 400
# The most Lanczos steps between two convergence checks (see _lanczos_fiedler),
# and the steps after a check whose residual rose: a new member of a near-1
# cluster is being resolved, which takes several steps: checking sooner only
# costs checks (segments identical either way).
_MAX_CHECK_INTERVAL = 8
_RISING_CHECK_INTERVAL = 4
# A cold start resolves the rest of the cluster for at most this fraction more
# steps, and only if at most this fraction of its Ritz values are in the cluster.
_CLUSTER_EXTRA_STEPS = 1.0
_CLUSTER_MAX_FRACTION = 0.25
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
# The draws behind _start_vector (grown on demand).
_RANDOM_DRAWS = np.empty(0)


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
    graph = as_graph(affinity)
    degrees = graph.degrees() if degrees is None else np.asarray(degrees, dtype=np.float64)
    return region_fiedler(graph, degrees)[0]


def region_fiedler(
    graph: RegionGraph, degrees: np.ndarray, cluster: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(``y``, the cluster basis for the children) — see :func:`fiedler_vector` and :func:`_warm_start`.

    ``cluster`` is None or, from :func:`children_clusters`, (vectors, their
    images under this region's operator ``D^-1/2 W_R D^-1/2``) as (n, m)
    columns. The cluster basis returned is such a pair on this region's cells
    (or None), for :func:`children_clusters`.
    """
    if graph.size < 2:
        raise ValueError("the Fiedler vector needs a graph of at least 2 cells")
    if not (degrees > 0).all():
        raise ValueError("the Fiedler vector needs positive degrees (a connected graph)")
    inv_sqrt_d = 1.0 / np.sqrt(degrees)
    v = basis = None
    if graph.size > DENSE_EIGH_MAX_CELLS:
        # D^1/2 1, normalized: the Laplacian's null vector, deflated throughout.
        trivial = np.sqrt(degrees)
        trivial /= np.linalg.norm(trivial)
        start, inherited = _warm_start(graph, trivial, inv_sqrt_d, cluster)
        if start is not None or graph.size > _DENSE_COLD_MAX_CELLS:
            v, resolved = _lanczos_fiedler(graph, trivial, inv_sqrt_d, start)
            basis = resolved if start is None else inherited
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
    graph: RegionGraph, trivial: np.ndarray, inv_sqrt_d: np.ndarray, cluster: tuple | None
) -> tuple[np.ndarray | None, tuple | None]:
    """(Lanczos start vector or None for the plain one, cluster basis for the children or None).

    Why: a region of k well separated groups has k - 1 eigenvalues of
    ``D^-1/2 W D^-1/2`` within about 1e-7 of 1, well apart from the rest. From
    one start vector, Lanczos needs many products to tell the Fiedler vector
    from the other members of such a cluster, on every region again. A child's cluster is, up
    to the small affinities it loses to its sibling, the part of its parent's
    cluster that lies on its cells; so the parent's cluster vectors on the
    child (``cluster``, from :func:`children_clusters`), orthonormalized (their
    SVD, from their Gram matrix, keeping the directions with at least
    _CLUSTER_MIN_WEIGHT of their length on the child), span it closely. A Rayleigh-Ritz step with the
    child's operator on that span (its images come with ``cluster``: no
    products here) gives an approximate Fiedler vector; Lanczos starts from it
    plus _WARM_START_RANDOM times the fixed random vector (which gives every
    eigenvector a share, as a random start does) and stops on the same residual
    test as a cold start. benchmarks/ncut_warm_start.py counts the solver work
    this saves (benchmarks/RESULTS.md); the segments are the same. The
    resulting ``y`` differs from a cold start's within the cold start's own
    error (residual / gap). The Rayleigh-Ritz vectors of Ritz
    value above _CLUSTER_MIN_RITZ, with their images, are the children's
    cluster basis. With no inherited cluster (or none of it above
    _CLUSTER_MIN_RITZ) the start is the plain one.
    """
    if cluster is None or cluster[0].shape[1] == 0:
        return None, None
    vectors, images = cluster
    # The deflated direction is an exact eigenvector (eigenvalue 1): removing
    # it from a vector removes it from the vector's image too.
    overlap = trivial @ vectors
    restricted = vectors - np.outer(trivial, overlap)
    restricted_images = images - np.outer(trivial, overlap)
    # Singular values and right vectors from the Gram matrix (cheaper than an SVD;
    # kept weights are >= _CLUSTER_MIN_WEIGHT, so squaring loses nothing that matters).
    squared, right = symmetric_eigh(restricted.T @ restricted)
    weights = np.sqrt(np.maximum(squared, 0.0))
    keep = weights > _CLUSTER_MIN_WEIGHT
    if not keep.any():
        return None, None
    # span = restricted @ V / weights (orthonormal), and so its image.
    to_span = right[:, keep] / weights[keep]
    span = restricted @ to_span
    image = restricted_images @ to_span
    projected = span.T @ image
    values, ritz = symmetric_eigh(0.5 * (projected + projected.T))
    inside = values > _CLUSTER_MIN_RITZ
    if not inside.any():
        return None, None
    ritz_vectors = span @ ritz[:, inside]
    start = ritz_vectors[:, -1] + _WARM_START_RANDOM * _start_vector(trivial)
    return start, (ritz_vectors, image @ ritz[:, inside])


def children_clusters(
    graph: RegionGraph, in_s: np.ndarray, side_degrees: np.ndarray, basis: tuple | None
) -> tuple[tuple | None, tuple | None]:
    """The warm-start clusters of the two children of a split (S = ``in_s``, then the rest).

    ``basis`` = (C, A = M C) on the parent's cells, ``M = D^-1/2 W D^-1/2``
    the parent's operator; ``side_degrees`` the cells' degrees within their
    sides. A child P (sibling Q) gets the parent's y-space vectors
    ``G = D^-1/2 C`` on its cells in its own normalization, ``X = D_P^1/2 G_P``,
    with their images under its operator from the parent's:
    ``W_PP G_P = D^1/2 A_P - W_PQ G_Q``, so
    ``M_P X = D_P^-1/2 (D^1/2 A_P - W_PQ G_Q)`` -- exact, and only the rows of
    the smaller side are read (most splits peel a small group off a large
    region: a few rows instead of m products with the whole matrix). Children
    small enough for the dense solver get None.
    """
    if basis is None or side_degrees is None:
        return None, None
    vectors, images = basis
    sides = (np.flatnonzero(in_s), np.flatnonzero(~in_s))
    needed = [side.shape[0] > DENSE_EIGH_MAX_CELLS for side in sides]
    if not any(needed):
        return None, None
    parent_sqrt_d = np.sqrt(graph.degrees())
    y = vectors / parent_sqrt_d[:, None]
    small = 0 if sides[0].shape[0] <= sides[1].shape[0] else 1
    large = 1 - small
    couplings = [None, None]  # W_PQ G_Q of each side P that needs it
    couplings[small], couplings[large] = graph.coupling_products(
        sides[small],
        y[sides[small]] if needed[large] else None,
        sides[large],
        y[sides[large]] if needed[small] else None,
    )
    clusters = [None, None]
    for index in (0, 1):
        if not needed[index]:
            continue
        cells, coupling = sides[index], couplings[index]
        child_sqrt_d = np.sqrt(side_degrees[cells])[:, None]
        child_images = (parent_sqrt_d[cells, None] * images[cells] - coupling) / child_sqrt_d
        clusters[index] = (child_sqrt_d * y[cells], child_images)
    return clusters[0], clusters[1]


def _dense_fiedler(affinity: np.ndarray, inv_sqrt_d: np.ndarray) -> np.ndarray:
    """Eigenvector ``v`` of the second-smallest eigenvalue of the normalized Laplacian, dense.

    LAPACK syevr for that one eigenpair (the relatively robust representation
    algorithm); a full eigendecomposition if it reports a failure.
    """
    # syevr reads the upper triangle of this C-ordered array: its transpose, in
    # Fortran order, with lower=1 (no copy; the same entries).
    laplacian = _normalized_laplacian(affinity, inv_sqrt_d)
    _, vectors, found, _, info = lapack.dsyevr(laplacian.T, range="I", il=2, iu=2, lower=1, overwrite_a=1)
    if info != 0 or found != 1:
        return np.linalg.eigh(_normalized_laplacian(affinity, inv_sqrt_d))[1][:, 1]
    return vectors[:, 0]


def _normalized_laplacian(affinity: np.ndarray, inv_sqrt_d: np.ndarray) -> np.ndarray:
    """``I - D^-1/2 W D^-1/2`` as a new C-ordered array (built in place: no temporaries)."""
    laplacian = affinity * inv_sqrt_d[:, None]
    laplacian *= inv_sqrt_d[None, :]
    np.negative(laplacian, out=laplacian)
    laplacian[np.diag_indices_from(laplacian)] += 1.0
    return laplacian


def _lanczos_fiedler(
    graph: RegionGraph, trivial: np.ndarray, inv_sqrt_d: np.ndarray, start: np.ndarray | None = None
) -> tuple[np.ndarray | None, tuple | None]:
    """Top eigenvector of ``D^-1/2 W D^-1/2`` on the complement of ``trivial`` (``D^1/2 1``
    normalized), and the cluster basis.

    Returns (None, None) if unconverged. The cluster basis (for the children's
    :func:`_warm_start`) is, for a cold start only, the Ritz vectors of value
    above _CLUSTER_MIN_RITZ whose residual estimate is below _CLUSTER_RESIDUAL,
    with their images (:func:`_converged_cluster`; None if there are none);
    a warm start's children inherit its
    Rayleigh-Ritz vectors instead (see :func:`region_fiedler`), so none is computed.

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
    whole cluster (from part of it they save the children almost no steps).
    The Fiedler vector is then the top Ritz vector of the larger Krylov space
    (smaller residual still).
    """
    n = graph.size
    max_steps = min(n - 1, _LANCZOS_MAX_STEPS)
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
    # costs about as much as a product with a few hundred cells' W, too much
    # to do every step: the next check comes after half the
    # steps that the residual's decay since the last check predicts are left
    # (at least every 1-3 steps, by size, at most every _MAX_CHECK_INTERVAL).
    # Stopping a few steps late only makes the Ritz pair more accurate.
    min_interval = 1 if n >= 1000 else (2 if n >= 300 else 3)
    next_check = 2
    last_check = None  # (step, residual estimate)
    resolved_at = None  # the step at which the Fiedler vector converged (cold start)
    ritz_pairs = None  # (values, vectors) of the last cluster check, for _converged_cluster
    scaled = np.empty(n)
    product = graph.product()
    axpy = blas.daxpy  # in place on z
    for step in range(max_steps):
        q = basis[step + 1]
        np.multiply(inv_sqrt_d, q, out=scaled)
        z = product(scaled)
        z *= inv_sqrt_d
        alpha = q.dot(z)
        diagonal[step] = alpha
        # The three-term recurrence, then a full reorthogonalization pass (classical
        # Gram-Schmidt), repeated only if it removed much (Daniel-Gragg-Kaufman-Stewart).
        axpy(q, z, a=-alpha)
        if step:
            axpy(basis[step], z, a=-offdiagonal[step - 1])
        before = math.sqrt(z.dot(z))
        known = basis[: step + 2]
        z -= known.dot(z).dot(known)
        beta = math.sqrt(z.dot(z))
        if beta < 0.7 * before:
            z -= known.dot(z).dot(known)
            beta = math.sqrt(z.dot(z))
        # beta ~ 0: the Krylov space is invariant and its Ritz pairs are exact.
        invariant = beta <= 1e-13
        if resolved_at is not None:
            # Resolving the rest of the cluster for the children (see the docstring).
            if invariant or step == max_steps - 1 or step >= next_check:
                values, vectors = ritz_pairs = tridiagonal_eigh(diagonal[: step + 1], offdiagonal[:step])
                ritz = vectors[:, -1]
                inside = values > _CLUSTER_MIN_RITZ
                if invariant or (beta * np.abs(vectors[-1, inside]) < _CLUSTER_RESIDUAL).all():
                    break
                if step - resolved_at >= _CLUSTER_EXTRA_STEPS * resolved_at:
                    break
                next_check = step + _MAX_CHECK_INTERVAL
        elif invariant or step == max_steps - 1 or step >= next_check:
            vector = top_tridiagonal_eigenvector(diagonal[: step + 1], offdiagonal[:step])
            residual = math.inf if vector is None else beta * abs(vector[-1])
            if vector is not None and (invariant or residual <= _LANCZOS_TOL):
                ritz = vector
                if invariant or start is not None or step == max_steps - 1:
                    break
                above = count_eigenvalues_above(diagonal[: step + 1], offdiagonal[:step], _CLUSTER_MIN_RITZ)
                if above > _CLUSTER_MAX_FRACTION * (step + 1):
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
    if start is not None:
        return v / np.linalg.norm(v), None
    if ritz_pairs is None or ritz_pairs[0].shape[0] != steps:
        ritz_pairs = (None, None) if steps < 2 else tridiagonal_eigh(diagonal[:steps], offdiagonal[: steps - 1])
    return v / np.linalg.norm(v), _converged_cluster(krylov, *ritz_pairs, z)


def _check_interval(last_check: tuple[int, float] | None, step: int, residual: float, min_interval: int) -> int:
    """Steps until the next convergence check: half the steps to _LANCZOS_TOL
    that the geometric decay of the residual estimate since ``last_check``
    predicts, within [min_interval, _MAX_CHECK_INTERVAL]; _RISING_CHECK_INTERVAL
    (at least min_interval) if the residual rose."""
    if last_check is not None and last_check[1] <= residual < math.inf:
        return max(min_interval, _RISING_CHECK_INTERVAL)
    if last_check is None or not (0 < residual < last_check[1]):
        return min_interval
    rate = math.log(last_check[1] / residual) / (step - last_check[0])
    left = math.log(residual / _LANCZOS_TOL) / rate
    return int(min(_MAX_CHECK_INTERVAL, max(min_interval, left // 2)))


def _converged_cluster(
    krylov: np.ndarray, values: np.ndarray | None, vectors: np.ndarray | None, residual: np.ndarray
) -> tuple | None:
    """(Ritz vectors, their images) as (n, m) columns for the Ritz values above
    _CLUSTER_MIN_RITZ with residual estimate below _CLUSTER_RESIDUAL, from the
    tridiagonal matrix's eigenpairs (``values``, ``vectors``; None for a one-step
    Krylov space) and the last residual vector ``beta q_{k+1}``; None if there are none.

    The images come from the Lanczos relation ``M K = K T + beta q_{k+1} e_k^T``
    (full reorthogonalization keeps it to rounding): ``M K s = theta K s +
    s_k beta q_{k+1}``, no products.
    """
    if values is None:
        return None
    beta = math.sqrt(residual @ residual)
    keep = (values > _CLUSTER_MIN_RITZ) & (beta * np.abs(vectors[-1]) < _CLUSTER_RESIDUAL)
    if not keep.any():
        return None
    cluster = krylov @ vectors[:, keep]
    return cluster, cluster * values[keep] + np.outer(residual, vectors[-1, keep])
