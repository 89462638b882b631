"""Tests of diffcut.method.ncut: the affinity and recursive normalized cut of docs/method.md §2.2-2.3.

The oracle is the plain definition, :mod:`diffcut.method.ncut_reference`.
"""

from __future__ import annotations

import inspect
import json
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from diffcut.method import ncut_reference
from diffcut.method.ncut import (
    SplitTree,
    affinity_matrix,
    best_cut,
    candidate_ncuts,
    fiedler_vector,
    grid_thresholds,
    ncut_value,
    recursive_ncut,
    sweep_thresholds,
)


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    # The plain reference makes many small BLAS calls too, where threads only add synchronization.
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def canonical(labels):
    """Relabel by first appearance in raster order: equal arrays <=> same partition."""
    flat = np.asarray(labels).reshape(-1)
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)].reshape(np.shape(labels))


def planted_map(seed, h=14, w=16, channels=24, segments=5, noise=0.15, shared=1.0):
    """Features of `segments` rectangles-ish regions (nearest of random seeds) with distinct centroids."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, 1, size=(segments, 2)) * [h, w]
    rows, cols = np.mgrid[0:h, 0:w]
    planted = np.argmin((rows[..., None] - seeds[:, 0]) ** 2 + (cols[..., None] - seeds[:, 1]) ** 2, axis=-1)
    common = rng.standard_normal(channels)
    centroids = shared * common / np.linalg.norm(common) + rng.standard_normal((segments, channels)) / np.sqrt(channels)
    features = centroids[planted] + noise * rng.standard_normal((h, w, channels)) / np.sqrt(channels)
    return features, planted


# ----------------------------------------------------------------------------
# Affinity
# ----------------------------------------------------------------------------


def test_affinity_matches_definition():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((7, 9, 13))
    features[2, 3] = 0.0  # a zero vector stays zero: cosine 0 with everything
    for alpha in (1.0, 3.7, 10.0):
        w = affinity_matrix(features, alpha)
        assert w.shape == (63, 63) and w.dtype == np.float64
        # The cosine similarities come from a float32 Gram matrix (errors ~1e-7,
        # times alpha after the power), the rest is float64.
        np.testing.assert_allclose(w, ncut_reference.affinity_matrix(features, alpha), rtol=2e-5, atol=1e-12)
        assert np.array_equal(w, w.T)
        assert w.min() == 0.0 and w.max() == 1.0
    # (n, c) input is the same as (h, w, c)
    assert np.array_equal(affinity_matrix(features.reshape(63, 13)), affinity_matrix(features))


def test_affinity_without_structure_is_all_ones():
    assert np.array_equal(affinity_matrix(np.ones((3, 4, 5))), np.ones((12, 12)))
    assert np.array_equal(affinity_matrix(np.zeros((2, 2, 3))), np.ones((4, 4)))


def test_affinity_extreme_magnitudes():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((20, 6))
    expected = affinity_matrix(features, 4.0)
    scaled = features.copy()
    scaled[:5] *= 1e200  # squares overflow
    scaled[5:10] *= 1e-200  # squares underflow
    np.testing.assert_allclose(affinity_matrix(scaled, 4.0), expected, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------
# The pieces: Fiedler vector, candidate cuts
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("cells", [30, 300])  # dense eigendecomposition / Lanczos
def test_fiedler_vector_matches_dense_eigendecomposition(cells):
    features, _ = planted_map(2, h=1, w=cells, segments=6, noise=0.6)
    w = affinity_matrix(features, 6.0)
    d = w.sum(axis=1)
    vectors = np.linalg.eigh(np.eye(cells) - w / np.sqrt(np.outer(d, d)))[1]
    expected = vectors[:, 1] / np.sqrt(d)
    expected *= np.sign(expected[np.argmax(np.abs(expected))])
    y = fiedler_vector(w)
    np.testing.assert_allclose(y, expected, atol=1e-10 * np.abs(expected).max())
    assert y[np.argmax(np.abs(y))] > 0


def test_sturm_count_equals_eigenvalue_count():
    import scipy.linalg

    from diffcut.method.small_eigen import count_eigenvalues_above

    rng = np.random.default_rng(7)
    for _ in range(300):
        k = int(rng.integers(1, 200))
        diagonal = rng.uniform(-1, 1, k)
        offdiagonal = rng.uniform(-0.5, 0.5, k - 1) * (rng.random(k - 1) > 0.1)  # some zero couplings
        values = scipy.linalg.eigvalsh_tridiagonal(diagonal, offdiagonal) if k > 1 else diagonal
        for bound in (0.5, 0.0, float(rng.uniform(-1, 1))):
            assert count_eigenvalues_above(diagonal, offdiagonal, bound) == int((values > bound).sum())


def test_small_eigenproblems_equal_scipy_and_numpy():
    import scipy.linalg

    from diffcut.method.small_eigen import symmetric_eigh, tridiagonal_eigh

    rng = np.random.default_rng(8)
    for _ in range(50):
        k = int(rng.integers(2, 150))
        diagonal, offdiagonal = rng.uniform(-1, 1, k), rng.uniform(-0.5, 0.5, k - 1)
        values, vectors = tridiagonal_eigh(diagonal, offdiagonal)
        expected_values, expected_vectors = scipy.linalg.eigh_tridiagonal(diagonal, offdiagonal)
        assert np.array_equal(values, expected_values) and np.array_equal(vectors, expected_vectors)
        matrix = rng.normal(size=(k % 30 + 1, k % 30 + 1))
        matrix += matrix.T
        values, vectors = symmetric_eigh(matrix)
        np.testing.assert_allclose(values, np.linalg.eigvalsh(matrix), atol=1e-12)
        np.testing.assert_allclose(matrix @ vectors, vectors * values, atol=1e-11)


def test_candidate_ncuts_equal_direct_evaluation():
    features, _ = planted_map(3, h=9, w=11, noise=0.8)
    w = affinity_matrix(features, 5.0)
    y = fiedler_vector(w)
    for thresholds in (grid_thresholds(y), sweep_thresholds(y)):
        values = candidate_ncuts(w, y, thresholds)
        direct = np.array([ncut_value(w, y > t) for t in thresholds])
        np.testing.assert_allclose(values, direct, rtol=1e-12)
    # empty and full candidates are not cuts
    ends = candidate_ncuts(w, y, np.array([y.max(), y.min() - 1.0]))
    assert np.isinf(ends).all()
    assert ncut_value(w, np.zeros(len(y), bool)) == np.inf


def test_grid_thresholds_are_the_papers():
    y = np.array([-2.0, 0.5, 3.0])
    t = grid_thresholds(y)
    assert len(t) == 100 and t[0] == pytest.approx(-1.98) and t[-1] == pytest.approx(2.97)
    # bit for bit numpy's linspace, on values of every scale (and degenerate ranges)
    rng = np.random.default_rng(5)
    for y in [rng.standard_normal(7) * 10.0 ** rng.integers(-300, 300) for _ in range(2000)] + [
        np.array([1.0, 1.0]),
        np.array([0.0, 5e-324]),
        np.array([-1e308, 1e308]),
    ]:
        with np.errstate(all="ignore"):  # the range of +-1e308 overflows in both
            expected = np.linspace(0.99 * y.min(), 0.99 * y.max(), 100)
            assert np.array_equal(grid_thresholds(y), expected, equal_nan=True)
    assert np.array_equal(sweep_thresholds(np.array([1.0, -1.0, 1.0, 0.0])), [-1.0, 0.0])


def test_best_cut_takes_first_minimum_and_exact_search_is_no_worse():
    for seed in range(4):
        features, _ = planted_map(seed, h=10, w=12, segments=4, noise=1.5)
        w = affinity_matrix(features, 3.0)
        y = fiedler_vector(w)
        thresholds = grid_thresholds(y)
        values = candidate_ncuts(w, y, thresholds)
        mask, value = best_cut(w, y)
        first = int(np.argmin(values))
        assert value == values[first] and np.array_equal(mask, y > thresholds[first])
        exact_mask, exact_value = best_cut(w, y, exact_search=True)
        brute = min(ncut_value(w, y > t) for t in sweep_thresholds(y))
        assert exact_value == pytest.approx(brute, rel=1e-12)
        assert exact_value <= value + 1e-12


# ----------------------------------------------------------------------------
# The recursion
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_planted_regions_recovered_exactly(seed):
    features, planted = planted_map(seed, h=16, w=18, segments=3 + 2 * seed, noise=0.1)
    labels = recursive_ncut(features, tau=0.5, alpha=10.0)
    assert labels.shape == (16, 18) and labels.dtype == np.int32
    assert np.array_equal(labels, canonical(planted))


@pytest.mark.parametrize(
    "seed, shape, tau, alpha",
    [(0, (9, 11), 0.5, 10.0), (1, (12, 12), 0.65, 4.0), (2, (16, 15), 0.4, 7.5), (3, (14, 20), 0.75, 2.0)],
)
def test_agrees_with_plain_definition(seed, shape, tau, alpha):
    features, _ = planted_map(seed, h=shape[0], w=shape[1], segments=6, noise=0.9, shared=0.7)
    expected = ncut_reference.recursive_ncut(features, tau, alpha)
    labels = recursive_ncut(features, tau, alpha)
    assert labels.max() >= 1  # the maps do split
    assert np.array_equal(labels, expected)


def test_warm_started_children_agree_with_plain_definition(monkeypatch):
    # Regions above the dense-eigh size start Lanczos from their parent's cluster
    # vectors (fiedler._warm_start); the segments must still be the definition's.
    from diffcut.method import fiedler

    warm_starts = []

    def counted(*args):
        start, basis = original(*args)
        warm_starts.append(start is not None)
        return start, basis

    original = fiedler._warm_start
    monkeypatch.setattr(fiedler, "_warm_start", counted)
    for seed in (21, 22):
        features, _ = planted_map(seed, h=24, w=26, channels=48, segments=12, noise=0.3, shared=0.6)
        expected = ncut_reference.recursive_ncut(features, 0.5, 10.0)
        labels = recursive_ncut(features, 0.5, 10.0)
        assert labels.max() >= 8
        assert np.array_equal(labels, expected)
    assert sum(warm_starts) >= 2


def test_labels_numbered_by_first_appearance():
    features, _ = planted_map(5, segments=6, noise=0.2)
    labels = recursive_ncut(features)
    assert labels[0, 0] == 0
    assert np.array_equal(labels, canonical(labels))
    assert set(np.unique(labels)) == set(range(labels.max() + 1))


def test_one_cell_and_two_cells():
    labels, tree = recursive_ncut(np.ones((1, 1, 8)), return_tree=True)
    assert labels.tolist() == [[0]]
    assert tree.parent.tolist() == [-1] and tree.ncut.tolist() == [np.inf]
    rng = np.random.default_rng(0)
    labels = recursive_ncut(rng.standard_normal((1, 2, 8)), tau=0.5)
    # two cells: the only cut has W_12 = 0 (the min-max minimum): NCut 0, split
    assert labels.tolist() == [[0, 1]]


@pytest.mark.parametrize("shape", [(6, 7), (15, 16)])  # dense and Lanczos paths
def test_identical_features_give_one_segment(shape):
    features = np.tile(np.arange(1.0, 6.0), shape + (1,))
    labels, tree = recursive_ncut(features, tau=0.9, alpha=10.0, return_tree=True)
    assert (labels == 0).all()
    # a complete graph: every cut has NCut exactly 1
    assert tree.ncut.tolist() == [pytest.approx(1.0, abs=1e-12)]


def test_zero_vectors():
    assert (recursive_ncut(np.zeros((5, 6, 4))) == 0).all()
    # Nonnegative features: the zero vectors' cosine is 0, the global minimum,
    # so they are isolated cells (degree 0) and each ends as its own segment.
    rng = np.random.default_rng(3)
    features = np.abs(rng.standard_normal((8, 8, 6))) + 1.0
    features[1, 2] = features[5, 5] = 0.0
    labels = recursive_ncut(features, tau=0.5, alpha=10.0)
    assert (labels == labels[1, 2]).sum() == 1 and (labels == labels[5, 5]).sum() == 1
    # The plain definition has no D^-1/2 there: it says so rather than dividing by zero.
    with pytest.raises(ValueError, match="degree 0"):
        ncut_reference.recursive_ncut(features, 0.5, 10.0)
    # Signed features: zero vectors get intermediate affinities and just take part.
    signed = rng.standard_normal((8, 8, 6))
    signed[0, :] = 0.0
    labels = recursive_ncut(signed, tau=0.5, alpha=6.0)
    assert labels.max() > 1
    assert np.array_equal(labels, ncut_reference.recursive_ncut(signed, 0.5, 6.0))


def test_disconnected_graph_splits_components_at_zero():
    # Two groups of nonnegative features on disjoint channels: cosine 0 (the
    # global minimum) across groups, so W is exactly 0 between them.
    rng = np.random.default_rng(4)
    features = np.zeros((10, 12, 8))
    group = np.zeros((10, 12), dtype=bool)
    group[:, 5:] = True
    features[~group, :4] = rng.uniform(0.5, 1.0, size=((~group).sum(), 4))
    features[group, 4:] = rng.uniform(0.5, 1.0, size=(group.sum(), 4))
    labels, tree = recursive_ncut(features, tau=0.3, alpha=10.0, return_tree=True)
    assert tree.ncut[0] == 0.0  # the root split is the component split
    for k in np.unique(labels):
        assert len(np.unique(group[labels == k])) == 1  # no segment straddles the groups
    # one-hot features: every category its own component, and its own segment
    onehot = np.eye(5)[rng.integers(0, 5, size=(6, 7))]
    labels = recursive_ncut(onehot, tau=0.5)
    assert np.array_equal(labels, canonical(onehot.argmax(-1)))


def test_invalid_inputs():
    good = np.ones((3, 3, 2))
    bad = good.copy()
    bad[1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        recursive_ncut(bad)
    bad[1, 1, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        affinity_matrix(bad)
    for shape in [(5,), (2, 2, 2, 2)]:
        with pytest.raises(ValueError, match="shape"):
            recursive_ncut(np.ones(shape))
    for shape in [(0, 3, 2), (3, 3, 0)]:
        with pytest.raises(ValueError, match="empty"):
            recursive_ncut(np.ones(shape))
    with pytest.raises(ValueError, match="alpha"):
        recursive_ncut(good, alpha=0.0)
    with pytest.raises(ValueError, match="tau"):
        recursive_ncut(good, tau=float("nan"))
    with pytest.raises(ValueError, match="real numbers"):
        recursive_ncut(np.full((2, 2, 2), "x"))


def test_torch_tensor_input():
    torch = pytest.importorskip("torch")
    features, _ = planted_map(6, segments=4)
    expected = recursive_ncut(features.astype(np.float32))
    tensor = torch.tensor(features, dtype=torch.float32, requires_grad=True)
    assert np.array_equal(recursive_ncut(tensor), expected)
    assert np.array_equal(recursive_ncut(tensor.to(torch.bfloat16)).shape, expected.shape)


# ----------------------------------------------------------------------------
# The split tree
# ----------------------------------------------------------------------------


def test_tree_structure():
    features, _ = planted_map(7, h=16, w=16, segments=6, noise=0.7)
    labels, tree = recursive_ncut(features, tau=0.7, alpha=8.0, return_tree=True)
    assert np.array_equal(tree.labels, labels) and tree.shape == (16, 16)
    assert (tree.tau, tree.alpha, tree.exact_search) == (0.7, 8.0, False)
    leaf = tree.is_leaf()
    assert tree.num_segments == leaf.sum() == labels.max() + 1
    assert (tree.ncut[~leaf] < 0.7).all() and (tree.ncut[leaf] >= 0.7).all()
    assert leaf[tree.leaf_of_label].all()
    assert tree.max_tau == tree.ncut[leaf].min()


def test_prune_equals_fresh_run():
    for seed, tau in [(8, 0.75), (9, 0.6)]:
        features, _ = planted_map(seed, h=18, w=20, segments=9, noise=0.9, shared=0.6)
        alpha = 6.0
        labels, tree = recursive_ncut(features, tau=tau, alpha=alpha, return_tree=True)
        assert np.array_equal(tree.prune(tau), labels)
        cut_values = np.sort(tree.ncut[~tree.is_leaf()])
        # thresholds at, between and beyond the accepted splits' NCut values
        taus = sorted({0.0, *cut_values[::2].tolist(), *(cut_values[1::3] + 1e-9).tolist(), tau * 0.8})
        counts = []
        for tau_prime in taus:
            pruned = tree.prune(tau_prime)
            assert np.array_equal(pruned, recursive_ncut(features, tau=tau_prime, alpha=alpha))
            counts.append(pruned.max() + 1)
        assert counts == sorted(counts) and counts[0] == 1 and len(set(counts)) > 2
        # beyond tau, up to the least leaf NCut, the tree is still the answer
        if np.isfinite(tree.max_tau):
            between = (tau + tree.max_tau) / 2
            assert np.array_equal(tree.prune(between), recursive_ncut(features, tau=between, alpha=alpha))
            with pytest.raises(ValueError, match="pruned only"):
                tree.prune(tree.max_tau + 1e-6)


def test_tree_dict_round_trip_through_json():
    features, _ = planted_map(10, h=12, w=13, segments=5, noise=0.8)
    labels, tree = recursive_ncut(features, tau=0.6, alpha=7.0, return_tree=True)
    data = tree.to_dict()
    assert "labels" not in data and data["format"] == "diffcut.split_tree/1"
    text = json.dumps(data, allow_nan=False)  # strict JSON: +inf is stored as null
    restored = SplitTree.from_dict(json.loads(text), labels=labels)
    assert np.array_equal(restored.parent, tree.parent)
    assert np.array_equal(restored.ncut, tree.ncut)  # floats survive JSON exactly
    assert np.array_equal(restored.leaf_of_label, tree.leaf_of_label)
    assert (restored.tau, restored.alpha, restored.shape) == (tree.tau, tree.alpha, tree.shape)
    for tau_prime in (0.2, 0.4, 0.6):
        assert np.array_equal(restored.prune(tau_prime), tree.prune(tau_prime))
    # with the label map inside, and from the JSON text directly
    with_labels = SplitTree.from_dict(json.dumps(tree.to_dict(include_labels=True)))
    assert np.array_equal(with_labels.labels, labels)
    # one-cell tree: +inf survives
    _, single = recursive_ncut(np.ones((1, 1, 3)), return_tree=True)
    data = json.loads(json.dumps(single.to_dict(include_labels=True), allow_nan=False))
    assert data["ncut"] == [None] and SplitTree.from_dict(data).ncut[0] == np.inf


def test_tree_from_dict_rejects_inconsistent_input():
    features, _ = planted_map(11, segments=4, noise=0.3)
    labels, tree = recursive_ncut(features, return_tree=True)
    data = tree.to_dict()
    with pytest.raises(ValueError, match="pass labels"):
        SplitTree.from_dict(data)
    with pytest.raises(ValueError, match="cells"):
        SplitTree.from_dict(data, labels=labels[:-1])
    with pytest.raises(ValueError, match="first appearance"):
        SplitTree.from_dict(data, labels=labels.max() - labels)
    with pytest.raises(ValueError, match="format"):
        SplitTree.from_dict({**data, "format": "other"}, labels=labels)
    broken = {**data, "parent": [-1] + [0] * (len(data["parent"]) - 1)}
    with pytest.raises(ValueError):
        SplitTree.from_dict(broken, labels=labels)


def test_exact_search_root_ncut_no_worse_than_grid():
    for seed in range(3):
        features, _ = planted_map(12 + seed, h=14, w=15, segments=5, noise=1.2, shared=0.5)
        _, grid_tree = recursive_ncut(features, tau=0.6, alpha=5.0, return_tree=True)
        _, exact_tree = recursive_ncut(features, tau=0.6, alpha=5.0, exact_search=True, return_tree=True)
        assert exact_tree.exact_search
        assert exact_tree.ncut[0] <= grid_tree.ncut[0] + 1e-12


def _depth(tree):
    depth = np.zeros(tree.num_nodes, dtype=int)
    for node in range(1, tree.num_nodes):
        depth[node] = depth[tree.parent[node]] + 1
    return depth.max()


def test_deep_chain_does_not_recurse():
    # One-hot features, one category per cell: W is the identity, every region
    # is disconnected and peels one cell off, so the tree is a chain of depth n-1.
    cells = 240
    features = np.eye(cells).reshape(12, 20, cells)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 80)
    try:
        labels, tree = recursive_ncut(features, tau=0.5, return_tree=True)
    finally:
        sys.setrecursionlimit(limit)
    assert np.array_equal(labels.reshape(-1), np.arange(cells))
    assert _depth(tree) == cells - 1


def test_large_map_with_many_segments():
    features, planted = planted_map(14, h=60, w=60, channels=32, segments=40, noise=0.9, shared=0.8)
    labels, tree = recursive_ncut(features, tau=0.8, alpha=10.0, return_tree=True)
    assert labels.shape == (60, 60)
    assert tree.num_segments >= 20 and _depth(tree) >= 8
    assert np.array_equal(tree.prune(0.8), labels)
