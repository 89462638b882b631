"""Spherical k-means on segment descriptors: arrays in, arrays out (numpy only).

* **spherical k-means** (Dhillon and Modha, "Concept decompositions for large
  sparse text data using clustering", Machine Learning 2001): descriptors
  are L2-normalized, a point goes to the centroid of largest cosine
  similarity, a centroid is the normalized (weighted) sum of its points;
  :func:`spherical_kmeans`;
* **k-means++ seeding** (Arthur and Vassilvitskii, SODA 2007) with the cosine
  distance ``1 - cos``, from a seeded generator; :func:`kmeans_plusplus`;
* every segment is then **assigned** to its nearest centroid (:func:`assign_classes`).

Used by :mod:`diffcut.tools.discover` (dataset-level classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64 copy); all-zero rows stay zero."""
    x = np.array(x, dtype=np.float64, ndmin=2)
    norms = np.linalg.norm(x, axis=1)
    nonzero = norms > 0
    x[nonzero] /= norms[nonzero, None]
    return x


def _check_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if weights.shape[0] != n or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be {n} finite numbers >= 0 with a positive sum")
    return weights


def kmeans_plusplus(
    points: np.ndarray, k: int, rng: np.random.Generator, weights: np.ndarray | None = None
) -> np.ndarray:
    """Indices of ``k`` seed points by k-means++ (Arthur and Vassilvitskii 2007) under the cosine distance.

    The first seed is drawn with probability proportional to the weight; each
    next one with probability proportional to ``weight * D(x)^2``, ``D(x)`` the
    cosine distance ``1 - cos`` to the nearest seed so far. When every
    remaining point coincides with a seed (fewer distinct points than ``k``),
    the next seed is drawn by weight among the points not chosen yet.

    Args:
        points: (n, c) unit rows (:func:`normalize_rows`).
        k: number of seeds, 1 <= k <= n.
        rng: the random generator (seeded by the caller).
        weights: (n,) nonnegative weights; default all 1.

    Returns:
        (k,) distinct int64 row indices.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot choose {k} seeds among {n} points")
    weights = _check_weights(weights, n)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.choice(n, p=weights / weights.sum())
    distance = np.clip(1.0 - points @ points[chosen[0]], 0.0, 2.0)
    taken = np.zeros(n, dtype=bool)
    taken[chosen[0]] = True
    for index in range(1, k):
        score = weights * distance**2
        score[taken] = 0.0
        if score.sum() <= 0:
            score = np.where(taken, 0.0, np.maximum(weights, 1e-300))
        chosen[index] = rng.choice(n, p=score / score.sum())
        taken[chosen[index]] = True
        distance = np.minimum(distance, np.clip(1.0 - points @ points[chosen[index]], 0.0, 2.0))
    return chosen


@dataclass
class KMeansResult:
    """A spherical k-means fit.

    centroids: (k, c) float32 unit rows; labels: (n,) int32 cluster of each point;
    objective: weighted mean cosine similarity of the points to their centroids
    (higher is better, at most 1); iterations: of the best run; converged: whether
    the best run stopped before ``max_iter``.
    """

    centroids: np.ndarray
    labels: np.ndarray
    objective: float
    iterations: int
    converged: bool


def _lloyd(points: np.ndarray, weights: np.ndarray, centroids: np.ndarray, max_iter: int, tol: float) -> KMeansResult:
    """Spherical Lloyd iterations from the given unit centroids."""
    previous = -np.inf
    labels = np.zeros(points.shape[0], dtype=np.int32)
    total = weights.sum()
    for iteration in range(1, max_iter + 1):
        similarity = points @ centroids.T
        labels = similarity.argmax(axis=1).astype(np.int32)
        best = similarity[np.arange(points.shape[0]), labels]
        objective = float(weights @ best / total)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, points * weights[:, None])
        norms = np.linalg.norm(sums, axis=1)
        empty = norms <= 0
        if empty.any():
            # An empty cluster takes the points its neighbours fit worst (largest weighted
            # loss), one each: the objective can only improve.
            loss = weights * (1.0 - best)
            worst = np.argsort(-loss, kind="stable")
            used = set()
            for cluster in np.flatnonzero(empty):
                point = next(int(p) for p in worst if int(p) not in used)
                used.add(point)
                sums[cluster] = points[point]
                norms[cluster] = np.linalg.norm(points[point])
        new_centroids = sums / np.where(norms > 0, norms, 1.0)[:, None]
        if objective - previous <= tol * max(1.0, abs(objective)) and not empty.any():
            return KMeansResult(centroids.astype(np.float32), labels, objective, iteration, True)
        previous = objective
        centroids = new_centroids
    similarity = points @ centroids.T
    labels = similarity.argmax(axis=1).astype(np.int32)
    objective = float(weights @ similarity[np.arange(points.shape[0]), labels] / total)
    return KMeansResult(centroids.astype(np.float32), labels, objective, max_iter, False)


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    *,
    weights: np.ndarray | None = None,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-7,
    n_init: int = 3,
    init: np.ndarray | None = None,
) -> KMeansResult:
    """Spherical k-means (Dhillon and Modha 2001) of the rows of ``x``, k-means++ seeded.

    Rows are L2-normalized; each iteration assigns every point to the centroid
    of largest cosine similarity (ties to the lowest index) and sets every
    centroid to the normalized weighted sum of its points, which never lowers
    the objective ``sum_i w_i cos(x_i, c(x_i)) / sum_i w_i``. Stops when an
    iteration gains less than ``tol`` (relative). ``n_init`` runs from
    different seeds (one generator seeded with ``seed``); the best objective
    wins.

    Args:
        x: (n, c) points (descriptors); zero rows are allowed (similarity 0 to all).
        k: number of clusters, 1 <= k <= n.
        weights: (n,) nonnegative weights; default all 1.
        seed: seed of the k-means++ draws.
        max_iter: iterations per run.
        tol: relative objective gain below which a run stops.
        n_init: number of seeded runs.
        init: (k, c) initial centroids instead of k-means++ (one run).
    """
    points = normalize_rows(x)
    n = points.shape[0]
    if not 1 <= int(k) <= n:
        raise ValueError(f"need at least k={k} points to fit {k} classes; got {n}")
    weights = _check_weights(weights, n)
    if init is not None:
        starts = [normalize_rows(init)]
        if starts[0].shape != (k, points.shape[1]):
            raise ValueError(f"init must have shape {(k, points.shape[1])}; got {starts[0].shape}")
    else:
        rng = np.random.default_rng(seed)
        starts = [points[kmeans_plusplus(points, int(k), rng, weights)] for _ in range(max(1, int(n_init)))]
    best = None
    for start in starts:
        result = _lloyd(points, weights, start, int(max_iter), float(tol))
        if best is None or result.objective > best.objective:
            best = result
    return best


def assign_classes(descriptors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class id per descriptor (int32), cosine similarity to that centroid (float32)).

    The nearest centroid by cosine similarity, ties to the lowest class id.
    """
    points = normalize_rows(descriptors)
    similarity = points @ normalize_rows(centroids).T
    ids = similarity.argmax(axis=1)
    return ids.astype(np.int32), similarity[np.arange(points.shape[0]), ids].astype(np.float32)
