"""Benchmark: diffcut.method.ncut.recursive_ncut against a straightforward implementation.

Both implement docs/method.md §2.2-2.3 (DiffCut's affinity and recursive
normalized cut). The reference below is written plainly, the way the definition
reads (its affinity is diffcut.method.ncut_reference's): a full symmetric
eigendecomposition (``numpy.linalg.eigh``) of the normalized Laplacian of every
region, then a Python loop over the 100 candidate thresholds that evaluates each NCut with dense
products, the published DiffCut code's ``z'Lz / z'Dz`` with ``L = D - W`` and ``D = diag(d)`` (``--light-reference``:
``z'(d * z)`` for the denominator). Every synthetic map goes through both, single-threaded, in one run; the
segments must be identical on every map (same partition; numbering is compared
after a canonical relabeling) and the script prints the total time ratio.

Synthetic maps (drawn by a fixed seeded rule, map i from seed (BASE_SEED, i),
no selection): 24..48 x 24..48 cells, 64..1280 channels (log-uniform), 2..40
planted segments as additively weighted Voronoi regions (mixed sizes); every
segment's centroid is a shared direction + a direction of its group (about 5
segments per group) + its own direction, with random magnitudes, plus a linear
drift across the map and Gaussian noise; tau uniform in [0.35, 0.75], alpha
uniform in [1, 10].

Usage:
    python benchmarks/ncut.py                      # 30 maps
    python benchmarks/ncut.py --quick              # 4 small maps (smoke run)
    python benchmarks/ncut.py --light-reference    # reference without the dense z'Dz
"""

from __future__ import annotations

import os

# Single-threaded BLAS for both implementations: set before numpy is imported.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from diffcut.method import ncut_reference  # noqa: E402
from diffcut.method.ncut import affinity_matrix, recursive_ncut  # noqa: E402

BASE_SEED = 2026


# ----------------------------------------------------------------------------
# Synthetic feature maps
# ----------------------------------------------------------------------------


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def synthetic_map(index: int, quick: bool = False) -> dict:
    """Feature map number ``index`` of the benchmark's fixed rule (see module docstring)."""
    rng = np.random.default_rng([BASE_SEED, index])
    low, high = (12, 20) if quick else (24, 48)
    h, w = (int(v) for v in rng.integers(low, high + 1, size=2))
    channels = int(round(np.exp(rng.uniform(np.log(64), np.log(1280)))))
    segments = int(rng.integers(2, 41))
    tau = float(rng.uniform(0.35, 0.75))
    alpha = float(rng.uniform(1.0, 10.0))

    seeds = rng.uniform(0, 1, size=(segments, 2)) * [h, w]
    weights = rng.exponential(0.15, size=segments) * max(h, w)
    rows, cols = np.mgrid[0:h, 0:w]
    distance = np.hypot(rows[..., None] - seeds[:, 0], cols[..., None] - seeds[:, 1]) - weights
    planted = distance.argmin(axis=-1)

    groups = max(1, segments // 5)
    group_of = rng.integers(0, groups, size=segments)
    shared = _unit(rng.standard_normal(channels))
    group_dirs = _unit(rng.standard_normal((groups, channels)))
    own_dirs = _unit(rng.standard_normal((segments, channels)))
    centroids = (
        shared * rng.uniform(0.5, 1.5)
        + group_dirs[group_of] * rng.uniform(0.2, 0.8, size=(segments, 1))
        + own_dirs * rng.uniform(0.3, 1.0, size=(segments, 1))
    )
    drift = _unit(rng.standard_normal((segments, channels))) * rng.uniform(0, 0.3, size=(segments, 1))
    noise = rng.uniform(0.15, 0.6)
    features = centroids[planted] + drift[planted] * ((cols - w / 2) / w)[..., None]
    features += rng.standard_normal((h, w, channels)) * (noise / np.sqrt(channels))
    return dict(features=features, tau=tau, alpha=alpha, planted=segments, channels=channels)


# ----------------------------------------------------------------------------
# Straightforward reference implementation of the definition
# ----------------------------------------------------------------------------


def reference_ncut(features: np.ndarray, tau: float, alpha: float, light: bool = False) -> np.ndarray:
    """Recursive NCut exactly as docs/method.md §2.3 reads, with no shortcuts.

    Each candidate's NCut is the published code's Rayleigh quotient
    ``z'Lz / z'Dz`` with dense ``L = D - W`` and ``D = diag(d)``; ``light=True``
    computes the denominator as ``z'(d * z)`` instead (one dense product per
    candidate instead of two).
    """
    h, w = features.shape[:2]
    affinity = ncut_reference.affinity_matrix(features, alpha)
    labels = np.zeros(h * w, dtype=np.int64)
    next_label = 0
    regions = [np.arange(h * w)]
    while regions:
        region = regions.pop()
        best_value, best_mask = np.inf, None
        if len(region) >= 2:
            a = affinity[np.ix_(region, region)]
            d = a.sum(axis=1)
            # eigenvector of the second-smallest eigenvalue of I - D^-1/2 A D^-1/2
            laplacian = np.eye(len(region)) - a / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]
            _, vectors = np.linalg.eigh(laplacian)
            y = vectors[:, 1] / np.sqrt(d)
            y = y * np.sign(y[np.argmax(np.abs(y))])
            degree_matrix = np.diag(d)
            full_laplacian = degree_matrix - a
            for t in np.linspace(0.99 * y.min(), 0.99 * y.max(), 100):
                in_s = y > t
                if in_s.all() or not in_s.any():
                    value = np.inf
                else:
                    # Shi-Malik: z = (1 + x) - b (1 - x), NCut = z'Lz / z'Dz
                    k = d[in_s].sum() / d.sum()
                    b = k / (1 - k)
                    z = np.where(in_s, 2.0, -2.0 * b)
                    denominator = z @ (d * z) if light else z @ degree_matrix @ z
                    value = (z @ full_laplacian @ z) / denominator
                if value < best_value:
                    best_value, best_mask = value, in_s
        if best_mask is not None and best_value < tau:
            regions.append(region[best_mask])
            regions.append(region[~best_mask])
        else:
            labels[region] = next_label
            next_label += 1
    return labels.reshape(h, w)


def canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel 0..K-1 by first appearance in raster order (same partition <=> equal arrays)."""
    flat = np.asarray(labels).reshape(-1)
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)].reshape(np.shape(labels))


# ----------------------------------------------------------------------------


def _blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed; OMP/OPENBLAS/MKL_NUM_THREADS=1 set before importing numpy"
    return ", ".join(f"{i['internal_api']}: {i['num_threads']} thread(s)" for i in threadpool_info())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 small maps, a smoke run")
    parser.add_argument("--maps", type=int, default=None, help="number of maps (default 30, 4 with --quick)")
    parser.add_argument(
        "--light-reference",
        action="store_true",
        help="reference computes z'Dz as z'(d*z) (one dense product per candidate, not two)",
    )
    args = parser.parse_args(argv)
    count = args.maps if args.maps is not None else (4 if args.quick else 30)

    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}")
    print(f"BLAS threads: {_blas_threads()}")
    header = (
        f"{'map':>3} {'cells':>9} {'c':>5} {'K*':>3} {'tau':>5} {'alpha':>5} {'segs':>4} "
        f"{'reference s':>11} {'diffcut s':>9} {'ratio':>6} same"
    )
    print(header)
    total_reference = total_ours = cpu_reference = cpu_ours = 0.0
    affinity_reference = affinity_ours = 0.0
    identical = 0
    for index in range(count):
        case = synthetic_map(index, quick=args.quick)
        features = case["features"]
        start, start_cpu = time.perf_counter(), time.process_time()
        expected = reference_ncut(features, case["tau"], case["alpha"], light=args.light_reference)
        reference_time = time.perf_counter() - start
        cpu_reference += time.process_time() - start_cpu
        start, start_cpu = time.perf_counter(), time.process_time()
        got = recursive_ncut(features, case["tau"], case["alpha"])
        our_time = time.perf_counter() - start
        cpu_ours += time.process_time() - start_cpu
        # Not part of the comparison: how much of each time is the affinity (the
        # Gram matrix of the features and its power), which both must compute.
        start = time.perf_counter()
        affinity_matrix(features, case["alpha"])
        affinity_ours += time.perf_counter() - start
        start = time.perf_counter()
        ncut_reference.affinity_matrix(features, case["alpha"])
        affinity_reference += time.perf_counter() - start
        same = bool(np.array_equal(canonical(expected), canonical(got)))
        identical += same
        total_reference += reference_time
        total_ours += our_time
        h, w = features.shape[:2]
        print(
            f"{index:>3} {f'{h}x{w}':>9} {case['channels']:>5} {case['planted']:>3} {case['tau']:>5.2f} "
            f"{case['alpha']:>5.2f} {int(got.max()) + 1:>4} {reference_time:>11.3f} {our_time:>9.3f} "
            f"{reference_time / our_time:>6.1f} {'yes' if same else 'NO'}",
            flush=True,
        )
    print(f"cpu time: reference {cpu_reference:.1f} s, diffcut {cpu_ours:.1f} s, ratio {cpu_reference / cpu_ours:.1f}x")
    rest_reference = total_reference - affinity_reference
    rest_ours = total_ours - affinity_ours
    print(
        f"affinity matrix alone (timed separately): reference {affinity_reference:.2f} s, "
        f"diffcut {affinity_ours:.2f} s; the rest (eigenvectors, cuts, recursion): "
        f"reference {rest_reference:.1f} s, diffcut {rest_ours:.2f} s, ratio {rest_reference / rest_ours:.1f}x"
    )
    ratio = total_reference / total_ours
    print(
        f"ncut speedup: {ratio:.1f}x (reference{' (light)' if args.light_reference else ''} "
        f"{total_reference:.1f} s, diffcut {total_ours:.1f} s, "
        f"{identical}/{count} maps identical)"
    )
    if identical != count:
        print("FAIL: segments differ from the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
