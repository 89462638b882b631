"""The plain definition of DiffCut's affinity and recursive normalized cut (docs/method.md §2.2-2.3).

Written the way the definition reads, for reading and as the tests' oracle: a
full eigendecomposition of every region's normalized Laplacian, one NCut
evaluation per candidate threshold. :func:`diffcut.method.ncut.recursive_ncut`
computes the same segments much faster; read this first.

Its domain is that of the definition: every region's degrees must be positive
(``D^-1/2`` exists), which holds unless a cell's affinity row is all zeros.
"""

from __future__ import annotations

import numpy as np


def affinity_matrix(features: np.ndarray, alpha: float = 10.0) -> np.ndarray:
    """§2.2: cosine similarities of the L2-normalized cells, min-max scaled to [0, 1], to the power ``alpha``."""
    cells = np.asarray(features, dtype=np.float64).reshape(-1, np.shape(features)[-1])
    norms = np.linalg.norm(cells, axis=1, keepdims=True)
    cells = cells / np.where(norms > 0, norms, 1.0)  # zero vectors stay zero
    similarity = cells @ cells.T
    low, high = similarity.min(), similarity.max()
    if high == low:  # no structure at all
        return np.ones_like(similarity)
    return ((similarity - low) / (high - low)) ** alpha


def recursive_ncut(features: np.ndarray, tau: float = 0.5, alpha: float = 10.0) -> np.ndarray:
    """§2.3 step by step: the (h, w) int64 segments of an (h, w, c) feature map, numbered by first appearance."""
    affinity = affinity_matrix(features, alpha)
    segments, regions = [], [np.arange(affinity.shape[0])]
    while regions:  # an explicit stack: no recursion limit
        region = regions.pop()
        if region.size >= 2:
            # 1. W_R, its degrees d.
            w = affinity[np.ix_(region, region)]
            d = w.sum(axis=1)
            if not (d > 0).all():
                raise ValueError("a region has a cell of degree 0: D^-1/2 is undefined")
            # 2. y = D^-1/2 v, v the eigenvector of the second-smallest eigenvalue of I - D^-1/2 W_R D^-1/2
            #    (sign: the entry of largest |y| is positive, as in the published code).
            laplacian = np.eye(region.size) - w / np.sqrt(np.outer(d, d))
            y = np.linalg.eigh(laplacian)[1][:, 1] / np.sqrt(d)
            y = y * np.sign(y[np.argmax(np.abs(y))])
            # 3. The 100 threshold cuts S_t = {y > t}; the first of least NCut wins.
            best_value, best_s = np.inf, None
            for t in np.linspace(0.99 * y.min(), 0.99 * y.max(), 100):
                s = y > t
                if s.all() or not s.any():
                    continue  # not a cut
                cut = w[np.ix_(s, ~s)].sum()
                value = cut / d[s].sum() + cut / d[~s].sum()
                if value < best_value:
                    best_value, best_s = value, s
            # 4. Split while the least NCut is below tau.
            if best_value < tau:
                regions += [region[best_s], region[~best_s]]
                continue
        segments.append(region)
    leaf = np.empty(affinity.shape[0], dtype=np.int64)
    for k, region in enumerate(segments):
        leaf[region] = k
    # Numbered 0..K-1 by first appearance in raster order, as the fast path numbers them.
    _, first, inverse = np.unique(leaf, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse.reshape(-1)].reshape(np.shape(features)[:-1])
