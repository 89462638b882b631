"""The split tree of a recursive normalized cut: every region, its parent and its best cut's NCut.

The best cut of a region does not depend on ``tau``, so the segmentation for
any smaller threshold is a pruning of the tree (:meth:`SplitTree.prune`), with
no new eigenvector computation (docs/method.md §2.3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffcut.method.affinity import check_tau, to_numpy


def first_appearance_labels(ids: np.ndarray) -> np.ndarray:
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
        if (
            self.parent[0] != -1
            or not (self.parent[1:] >= 0).all()
            or not (self.parent[1:] < np.arange(1, nodes)).all()
        ):
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
        if (
            (leaves < 0).any()
            or (leaves >= nodes).any()
            or internal[leaves].any()
            or (np.unique(leaves).shape[0] != count or count != nodes - internal.sum())
        ):
            raise ValueError("leaf_of_label must name every leaf node exactly once")
        self.labels = labels.astype(np.int32, copy=False)
        if not np.array_equal(first_appearance_labels(self.labels.reshape(-1)), self.labels.reshape(-1)):
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
        """Label map of the recursion run at ``tau_prime``, without recomputation (docs/method.md §2.3).

        A node is split at ``tau'`` iff it was split at ``tau`` and its NCut is
        below ``tau'``; the segments are the regions of the first unsplit nodes
        on each root-to-leaf path. A region's best cut does not depend on the
        threshold, so this equals a fresh run at ``tau'``.

        Parameters
        ----------
        tau_prime : float
            The new threshold, at most :attr:`max_tau` (the least NCut among the
            leaves, >= ``tau``); any ``tau_prime <= tau`` is served.

        Returns
        -------
        numpy.ndarray
            Label map of :attr:`shape`, int32, numbered 0..K'-1 by first
            appearance in raster order, like :func:`~diffcut.method.ncut.recursive_ncut`.

        Raises
        ------
        ValueError
            ``tau_prime`` is NaN or above :attr:`max_tau`.

        References
        ----------
        .. [1] docs/method.md §2.3: the split tree and its pruning, beyond the paper.
        .. [2] P. Couairon et al., NeurIPS 2024, arXiv:2406.02842, Sec. 3.2: the recursion it prunes.

        Examples
        --------
        Eight cells of three kinds, given as an (n, c) array: the first split
        separates the first kind at NCut 0, the second split the other two at
        NCut 0.061. Pruned below that, the last two kinds stay together:

        >>> import numpy as np
        >>> from diffcut.method.ncut import recursive_ncut
        >>> features = np.array([[1, 0, 0]] * 4 + [[0, 1, 0]] * 2 + [[0, 1, 1]] * 2, dtype=float)
        >>> labels, tree = recursive_ncut(features, tau=0.5, return_tree=True)
        >>> print(labels, tree.prune(0.05))
        [0 0 0 0 1 1 2 2] [0 0 0 0 1 1 1 1]
        >>> print(recursive_ncut(features, tau=0.05))
        [0 0 0 0 1 1 1 1]
        """
        tau_prime = check_tau(tau_prime)
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
        return first_appearance_labels(segment_of_label[self.labels.reshape(-1)]).reshape(self.shape)

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
    def from_dict(cls, data: dict | str, labels: Any = None) -> SplitTree:
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
        labels = to_numpy(labels)
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
