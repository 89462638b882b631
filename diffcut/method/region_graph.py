"""Regions of the recursive normalized cut as induced subgraphs of one affinity matrix.

A region is a set of cells of the whole affinity (or of an ancestor region's
copy of it); products, degrees and per-bin sums with ``W_R`` are computed on
the ambient matrix without copying the region out (see :class:`RegionGraph`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
from scipy.linalg import blas

try:  # the kernel behind a CSR matrix times a dense one, without the matrix object (see bin_sums)
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover - a SciPy that moved it: the public route
    _csr_matvecs = None


class RegionGraph:
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
        return _submatrix(self.ambient, self.positions, self.positions)

    def extracted(self) -> RegionGraph:
        if self.positions is None:
            return self
        return RegionGraph(self.matrix(), degrees=self._degrees)

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

    def coupling_products(
        self,
        rows: np.ndarray,
        row_vectors: np.ndarray | None,
        columns: np.ndarray,
        column_vectors: np.ndarray | None,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(B @ column_vectors, B.T @ row_vectors)`` for the block ``B = W_R[rows][:, columns]``
        (disjoint index arrays into the region's cells; give the shorter one as
        ``rows``); a product whose vectors are None is skipped (None).

        Only the rows are copied out (contiguous reads): the products run on
        whole rows of the ambient matrix with the column vectors zero outside
        ``columns``, which costs less than gathering the block's columns.
        """
        ambient_rows = rows if self.positions is None else self.positions[rows]
        ambient_columns = columns if self.positions is None else self.positions[columns]
        whole_rows = np.take(self.ambient, ambient_rows, axis=0)
        by_columns = by_rows = None
        if column_vectors is not None:
            padded = np.zeros((self.ambient.shape[0], column_vectors.shape[1]))
            padded[ambient_columns] = column_vectors
            by_columns = whole_rows @ padded
        if row_vectors is not None:
            by_rows = (whole_rows.T @ row_vectors)[ambient_columns]
        return by_columns, by_rows

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
            return _submatrix(self.ambient, cells, cells)
        ambient_size = self.ambient.shape[0]
        ones = np.ones(self.size)
        if _csr_matvecs is None:
            sums = scipy.sparse.csr_matrix((ones, cells, edges), shape=(bins, ambient_size)) @ self.ambient
        else:
            # The same kernel and summation order as the matrix product above;
            # building and checking the matrix object cost about as much as
            # the product itself on these regions.
            sums = np.zeros((bins, ambient_size))
            _csr_matvecs(bins, ambient_size, ambient_size, edges, cells, ones, self.ambient.ravel(), sums.ravel())
        return np.take(sums, cells, axis=1)


def _submatrix(matrix: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``matrix[rows][:, columns]`` as a C-ordered copy: the rows first, whole
    (contiguous reads), then the columns of that smaller array."""
    return np.take(np.take(matrix, rows, axis=0), columns, axis=1)


def as_graph(affinity: np.ndarray) -> RegionGraph:
    affinity = np.ascontiguousarray(affinity, dtype=np.float64)
    if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity must be a square matrix, got shape {affinity.shape}")
    return RegionGraph(affinity)
