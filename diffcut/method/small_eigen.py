"""Small eigenproblems of the Fiedler solver (:mod:`diffcut.method.fiedler`): LAPACK called directly.

At the sizes of a Lanczos step (a tridiagonal matrix of up to a few hundred
rows, a Rayleigh-Ritz matrix of up to ~30) the general wrappers' argument
checks and workspace queries cost as much as the computation.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.linalg import lapack


def symmetric_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ascending eigenvalues, eigenvector columns) of a small symmetric matrix.

    LAPACK syev called directly: numpy's eigh adds more overhead than work at these sizes.
    """
    values, vectors, info = lapack.dsyev(matrix)
    if info != 0:
        return np.linalg.eigh(matrix)
    return values, vectors


def top_tridiagonal_eigenvector(diagonal: np.ndarray, offdiagonal: np.ndarray) -> np.ndarray | None:
    """Unit eigenvector of the largest eigenvalue of a symmetric tridiagonal matrix (None on failure).

    LAPACK bisection (stebz) for the one eigenvalue and inverse iteration (stein)
    for its vector, called directly: the general wrapper's checks cost more than
    the computation on these small matrices.
    """
    k = diagonal.shape[0]
    if k == 1:
        return np.ones(1)
    found, values, block, split, info = lapack.dstebz(diagonal, offdiagonal, 2, 0.0, 0.0, k, k, 0.0, "B")
    if info != 0 or found != 1:
        return None
    vectors, info = lapack.dstein(diagonal, offdiagonal, values[:1], block, split)
    if info != 0:
        return None
    return vectors[:, 0]


def count_eigenvalues_above(diagonal: np.ndarray, offdiagonal: np.ndarray, bound: float) -> int:
    """Number of eigenvalues above ``bound`` of a symmetric tridiagonal matrix (Sturm count).

    The signs of the pivots of the LDL^T factorization of ``T - bound I``
    (Sylvester's law of inertia: as many negative pivots as eigenvalues below
    ``bound``), with LAPACK's guard against a zero pivot (dlaneg, as in the
    bisection of dstebz): one pass of O(k) instead of all eigenvalues.
    """
    squares = (offdiagonal * offdiagonal).tolist()
    pivot_min = 2.3e-308 * max(1.0, max(squares, default=1.0))
    below = 0
    pivot = 1.0
    for index, value in enumerate(diagonal.tolist()):
        pivot = (value - bound) - (squares[index - 1] / pivot if index else 0.0)
        if abs(pivot) < pivot_min:
            pivot = -pivot_min
        below += pivot < 0
    return diagonal.shape[0] - below


def tridiagonal_eigh(diagonal: np.ndarray, offdiagonal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ascending eigenvalues, eigenvector columns) of a symmetric tridiagonal matrix.

    LAPACK stevd (divide and conquer) called directly: what
    ``scipy.linalg.eigh_tridiagonal`` runs for all eigenpairs, the same
    results, without its argument handling (called at every convergence check).
    """
    values, vectors, info = lapack.dstevd(diagonal, offdiagonal)
    if info != 0:
        return scipy.linalg.eigh_tridiagonal(diagonal, offdiagonal)
    return values, vectors
