"""The affinity of DiffCut (docs/method.md §2.2), and the input checks of the normalized cut.

Every cell's feature vector is L2-normalized, the cosine similarity of every
pair is min-max scaled over the whole matrix to [0, 1] and raised to the power
``alpha`` (Couairon et al., NeurIPS 2024, arXiv:2406.02842, Sec. 3.2). See
:mod:`diffcut.method.ncut` for the recursion that uses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg import blas

from diffcut.method.defaults import DEFAULT_ALPHA

# Float32 row strips of the affinity computation are about this many bytes: they
# stay in cache together with the power's scratch copy.
_STRIP_BYTES = 1 << 19


def to_numpy(values: Any) -> np.ndarray:
    """Array view of ``values``; torch tensors (any device, autograd or not) are copied to host."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu()
        if values.is_floating_point() and values.element_size() < 4:
            values = values.float()  # numpy has no bfloat16
        values = values.numpy()
    return np.asarray(values)


def cell_features(features: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate ``features`` ((h, w, c) or (n, c)) and return (float32 or float64 (n, c) array, grid shape).

    The array is the input itself when it already is float32 or float64 (no copy); it is
    checked for NaN/inf by :func:`affinity_from_cells`, on its row norms.
    """
    array = to_numpy(features)
    if array.ndim not in (2, 3):
        raise ValueError(f"features must be an (h, w, c) or (n, c) array, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"features must not be empty, got shape {tuple(array.shape)}")
    if not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_
    ):
        raise ValueError(f"features must be real numbers, got dtype {array.dtype}")
    # float16/float32 stay float32 (their squares cannot overflow float64, in
    # which the norms are computed); everything else becomes float64.
    dtype = np.float32 if array.dtype in (np.float16, np.float32) else np.float64
    cells = np.asarray(array.reshape(-1, array.shape[-1]), dtype=dtype)
    return cells, tuple(int(s) for s in array.shape[:-1])


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    return alpha


def check_tau(tau: float) -> float:
    tau = float(tau)
    if np.isnan(tau):
        raise ValueError("tau must be a number, got NaN")
    return tau


def affinity_matrix(features: Any, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Affinity matrix ``W`` of DiffCut (docs/method.md §2.2; paper Sec. 3.2, Eq. 2).

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
    alpha = check_alpha(alpha)
    cells, _ = cell_features(features)
    return affinity_from_cells(cells, alpha)[0]


def affinity_from_cells(cells: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The affinity of §2.2 and its row sums, from an (n, c) float32 or float64 array (left unchanged).

    BLAS syrk fills one triangle of the cosine similarities in float32 (half
    the work of a full product, and half the memory traffic of dsyrk;
    the products of unit vectors carry errors of about 1e-7, far below what
    separates the cells from the candidate thresholds -- checked on every map
    of benchmarks/ncut.py and benchmarks/segment_step.py). The min-max scaling
    and the power run in float32 too, in place, over that triangle in row
    strips that stay in cache (relative errors of a few 1e-7, those of the
    Gram matrix times alpha being larger); the triangle is mirrored (so the
    result is exactly symmetric) and widened to float64 once, for the
    recursion, which runs in float64. Powers that float32 cannot represent
    (below _TINY_POWER, which it would flush towards zero) are computed in
    float64 and patched in, so that exactly the same entries are zero as in
    float64 arithmetic (connectivity depends on them).
    """
    unit32 = _unit_rows32(cells)
    n = cells.shape[0]
    # syrk on cells.T (Fortran order, no copy) gives the upper triangle of
    # cells @ cells.T in Fortran order: its transpose is C-ordered with the
    # values in the lower triangle (row >= column).
    similarity = blas.ssyrk(1.0, unit32.T, trans=1, lower=0).T
    del unit32
    rows = min(n, max(16, _STRIP_BYTES // (4 * n)))
    above_diagonal = np.triu(np.ones((rows, rows), dtype=bool), 1)
    strip_lows = []
    high = -np.inf
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        _symmetrize_diagonal_block(similarity, start, stop, above_diagonal)
        strip = similarity[start:stop, :stop]
        strip_lows.append(strip.min())
        high = max(high, strip.max())
    low = min(strip_lows)
    if high == low:
        return np.ones((n, n)), np.full(n, float(n))
    # float32 arithmetic: the largest entry becomes exactly (high - low) / span = 1.
    span = high - low
    # Scaled entries below this have a power under _TINY_POWER.
    tiny_scaled = _TINY_POWER ** (1.0 / alpha)
    scratch = np.empty(rows * n, dtype=np.float32)
    patches = []
    for index, start in enumerate(range(0, n, rows)):
        stop = min(n, start + rows)
        strip = similarity[start:stop, :stop]
        np.subtract(strip, low, out=strip)
        np.divide(strip, span, out=strip)
        if (strip_lows[index] - low) / span < tiny_scaled:
            # Only the rows that hold such an entry (few) are searched.
            for row in np.flatnonzero(strip.min(axis=1) < tiny_scaled):
                columns = np.flatnonzero((strip[row] < tiny_scaled) & (strip[row] > 0))
                if columns.size:
                    values = np.power(strip[row, columns].astype(np.float64), alpha)
                    patches.append((np.full(columns.size, start + row), columns, values))
        _power_in_place(strip, alpha, scratch)
    _mirror_lower_triangle(similarity, above_diagonal)
    affinity = similarity.astype(np.float64)
    del similarity
    for tiny_rows, tiny_columns, values in patches:
        affinity[tiny_rows, tiny_columns] = values
        affinity[tiny_columns, tiny_rows] = values
    return affinity, affinity.sum(axis=1)


# Powers below this are computed in float64 (float32's smallest normal number is 1.2e-38).
_TINY_POWER = 1e-30


def _mirror_lower_triangle(matrix: np.ndarray, block_mask: np.ndarray) -> None:
    """Copy the lower triangle of a square C-ordered float32 matrix onto its upper one, in place.

    The diagonal blocks (of ``block_mask``'s size, its strict upper triangle)
    are symmetrized first; then, in thin row strips, each strip's part left of
    its diagonal block is written, transposed, above it. The whole upper triangle is
    overwritten: entries computed from equal inputs at different positions may
    differ in the last bit (vectorized against scalar code paths). The strip
    height matters because the columns read are strided: small matrices (rows
    of a few KB) want thin strips, large ones tall strips (benchmarks/RESULTS.md).
    """
    n = matrix.shape[0]
    block = block_mask.shape[0]
    rows = min(block, 8 if n <= 1536 else 256)
    for block_start in range(0, n, block):
        block_stop = min(n, block_start + block)
        _symmetrize_diagonal_block(matrix, block_start, block_stop, block_mask)
        for start in range(block_start, block_stop, rows):
            stop = min(block_stop, start + rows)
            matrix[:block_start, start:stop] = matrix[start:stop, :block_start].T


def _symmetrize_diagonal_block(matrix: np.ndarray, start: int, stop: int, block_mask: np.ndarray) -> None:
    """Copy the lower triangle of ``matrix[start:stop, start:stop]`` onto its upper one
    (``block_mask``: a square boolean array, at least that large, true strictly above its diagonal)."""
    diagonal_block = matrix[start:stop, start:stop]
    size = stop - start
    np.copyto(diagonal_block, diagonal_block.T, where=block_mask[:size, :size])


# Float32 sums of squares in this range are exact to float32 rounding: no square
# overflowed, and squares that underflowed add at most 1e-15 of the sum.
_SAFE_SQUARED_NORMS32 = (1e-20, 1e30)


def _unit_rows32(cells: np.ndarray) -> np.ndarray:
    """The rows of ``cells`` (float32 or float64) divided by their L2 norms, as float32; zero rows stay zero.

    Float32 rows go by float32 arithmetic (sums of squares and a multiplication
    by the reciprocal norm: cheaper than float64, with errors of a few 1e-8
    relative, below those of the float32 Gram matrix that follows) unless a
    row's sum of squares is outside _SAFE_SQUARED_NORMS32; those rows, and
    float64 input, are normalized in float64, after scaling rows whose squares
    overflow (or underflow) by their largest entry.

    Raises:
        ValueError: NaN or infinite entries.
    """
    unit32 = np.empty(cells.shape, dtype=np.float32)
    if cells.dtype == np.float32:
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            squares32 = np.einsum("ij,ij->i", cells, cells)
        fast = (squares32 >= _SAFE_SQUARED_NORMS32[0]) & (squares32 <= _SAFE_SQUARED_NORMS32[1])
        inverse = np.zeros(cells.shape[0], dtype=np.float32)
        np.divide(np.float32(1), np.sqrt(squares32, where=fast, out=np.ones_like(squares32)), out=inverse, where=fast)
        np.multiply(cells, inverse[:, None], out=unit32)
        slow = np.flatnonzero(~fast)
        if slow.size:
            unit32[slow] = _unit_rows64(cells[slow])
        return unit32
    return _unit_rows64(cells, out=unit32)


def _unit_rows64(cells: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`_unit_rows32` in float64 arithmetic, rounded to float32 once (into ``out`` if given)."""
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
    out = np.empty(cells.shape, dtype=np.float32) if out is None else out
    # Divided in float64 and rounded to float32 in one pass (zero vectors stay zero: 0 / 1).
    np.divide(cells, np.where(norms > 0, norms, 1.0)[:, None], out=out, casting="unsafe")
    return out


def _power_in_place(x: np.ndarray, alpha: float, scratch: np.ndarray) -> None:
    """``x **= alpha`` for float32 ``x`` in [0, 1]; ``scratch`` is float32 with at least ``x.size`` elements.

    An integer exponent up to 64 (the paper's is 10) goes by binary
    exponentiation, a few multiplications (relative error a few float32 ulps);
    any other exponent as ``exp(alpha * log(x))`` (numpy's vectorized float32
    functions, much cheaper than float64 ``np.power``; relative error about
    ``alpha * |log x|`` float32 ulps, a few 1e-6 at most for the entries above
    _TINY_POWER, which is what the float32 Gram matrix already carries).
    """
    exponent = int(alpha)
    with np.errstate(divide="ignore", under="ignore"):
        if exponent != alpha or not 1 <= exponent <= 64:
            np.log(x, out=x)  # log(0) = -inf, exp(-inf) = 0
            np.multiply(x, np.float32(alpha), out=x)
            np.exp(x, out=x)
            return
        # Left to right, with x itself as the base: the running power lives in
        # scratch and the last multiplication writes into x (no copy of the base).
        steps = []  # after the leading 1 bit: square for every bit, then times the base for a 1
        for bit in bin(exponent)[3:]:
            steps.append("square")
            if bit == "1":
                steps.append("times base")
        power = scratch[: x.size].reshape(x.shape)
        running = x
        for index, kind in enumerate(steps):
            target = x if index == len(steps) - 1 else power
            np.multiply(running, running if kind == "square" else x, out=target)
            running = target
