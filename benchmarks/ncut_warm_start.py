"""Benchmark: what the warm-started Lanczos of diffcut.method.ncut saves, counted in products with W.

Every child region's Fiedler solve starts from its parent's near-1 cluster
(``diffcut.method.fiedler._warm_start``) and cold starts resolve that cluster for their
children. This script runs the recursion on the same maps with warm starts on
and off (off: ``_CLUSTER_MIN_RITZ`` above 1, so no Ritz value counts as the
cluster and every region starts cold, as before issue 11) and reports the work
of the Fiedler solves as the sum, over products with the affinity, of the
product's matrix size squared (a product on an ancestor's matrix counts the
ancestor's size; the block between a split's two sides, from which the
children's warm starts get their images, counts the entries of the rows it
reads): a count, not a time, so a loaded machine does not move it.
The segments of both runs are compared on every map.

Maps: benchmarks/segment_step.py's (SSD-1B-shaped 32x32x1280, 16 and 32
regions, i.i.d. noise; tau 0.5, alpha 10) and benchmarks/ncut.py's 30 maps
(their own tau and alpha).

    python benchmarks/ncut_warm_start.py
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent / "infra"))

import ncut as ncut_benchmark  # noqa: E402  (benchmarks/ncut.py)
from measure_ncut_time import random_features, structured_features  # noqa: E402

from diffcut.method import fiedler, ncut  # noqa: E402
from diffcut.method.region_graph import RegionGraph  # noqa: E402


def _counting(products: list[int]):
    plain = RegionGraph.product

    def product(graph):
        call = plain(graph)
        size = graph.ambient.shape[0] ** 2

        def counted(x):
            products[0] += size
            return call(x)

        return counted

    return product


def _counting_couplings(products: list[int]):
    plain = RegionGraph.coupling_products

    def coupling_products(graph, rows, *vectors):
        products[0] += rows.shape[0] * graph.ambient.shape[0]  # the whole rows it reads
        return plain(graph, rows, *vectors)

    return coupling_products


def recursion_work(maps: list[tuple[np.ndarray, float, float]], warm: bool) -> tuple[list[int], list[np.ndarray]]:
    """(work per map, labels per map) of the recursion with warm starts on or off."""
    products = [0]
    saved = fiedler._CLUSTER_MIN_RITZ, RegionGraph.product, RegionGraph.coupling_products
    RegionGraph.product = _counting(products)
    RegionGraph.coupling_products = _counting_couplings(products)
    if not warm:
        fiedler._CLUSTER_MIN_RITZ = 2.0
    work, labels = [], []
    try:
        for features, tau, alpha in maps:
            products[0] = 0
            labels.append(ncut.recursive_ncut(features, tau, alpha))
            work.append(products[0])
    finally:
        fiedler._CLUSTER_MIN_RITZ, RegionGraph.product, RegionGraph.coupling_products = saved
    return work, labels


def main() -> None:
    rng = np.random.default_rng(0)
    cases = {
        "16 regions (10 maps)": [(structured_features(rng, 32, 1280, 16, 0.5), 0.5, 10.0) for _ in range(10)],
        "32 regions (10 maps)": [(structured_features(rng, 32, 1280, 32, 0.5), 0.5, 10.0) for _ in range(10)],
        "i.i.d. noise (2 maps)": [(random_features(rng, 32, 1280), 0.5, 10.0) for _ in range(2)],
        "benchmarks/ncut.py (30 maps)": [
            (m["features"], m["tau"], m["alpha"]) for m in map(ncut_benchmark.synthetic_map, range(30))
        ],
    }
    print(
        "work = sum over products with W of (matrix cells)^2 + entries of W read for the children's warm starts,"
        " in millions; sum over the maps"
    )
    print(f"{'maps':30s} {'cold starts':>12s} {'warm starts':>12s} {'ratio':>7s}  segments")
    for name, maps in cases.items():
        cold, cold_labels = recursion_work(maps, warm=False)
        warm, warm_labels = recursion_work(maps, warm=True)
        same = sum(np.array_equal(a, b) for a, b in zip(cold_labels, warm_labels))
        print(
            f"{name:30s} {sum(cold) / 1e6:12.0f} {sum(warm) / 1e6:12.0f} {sum(cold) / sum(warm):6.2f}x"
            f"  identical on {same}/{len(maps)}"
        )


if __name__ == "__main__":
    main()
