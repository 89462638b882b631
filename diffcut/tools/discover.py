"""Dataset-level classes: cluster the segment descriptors of a labeled dataset into K classes.

DiffCut's segments are per image: segment 3 of one image has nothing to do
with segment 3 of the next. Every segment also carries a descriptor, the mean
of the L2-normalized diffusion features over its cells (DESIGN.md §2.4; the
paper's concept embedding), and segments of one kind of thing have similar
descriptors across images. Clustering the descriptors of the whole dataset
gives class ids that mean the same thing in every image, so a per-image label
map becomes a semantic one that a supervised model can train on, and that
``diffcut evaluate --matching dataset`` scores with one matching for the
whole dataset.

The method, plain numpy functions (no Ray):

* **spherical k-means** (Dhillon and Modha, "Concept decompositions for large
  sparse text data using clustering", Machine Learning 2001): descriptors
  are L2-normalized, a point goes to the centroid of largest cosine
  similarity, a centroid is the normalized (weighted) sum of its points;
  :func:`spherical_kmeans`;
* **k-means++ seeding** (Arthur and Vassilvitskii, SODA 2007) with the cosine
  distance ``1 - cos``, from a seeded generator; :func:`kmeans_plusplus`;
* fitted on a **sample** of segments (:func:`sample_keys` gives every segment
  a deterministic pseudo-random key; the ``sample_size`` smallest keys form
  the sample, whatever the partitioning into batches); then every segment of
  the dataset is **assigned** to its nearest centroid (:func:`assign_classes`).

Weighting (``weighting``): with ``"pixels"`` (the default) each sampled
segment weighs its share of its image's mask pixels, so every image counts
once and, within an image, large segments count more — the quantity mIoU
measures; segments with no pixel in the mask are left out of the fit (they
are still assigned a class). With ``"segments"`` every segment with pixels
weighs 1. The sample itself is uniform over segments with pixels.

The job (:func:`discover_classes`; Ray is imported only there and in its file
naming helper): pass 1
reads the label shards with Ray Data and keeps the sample; the driver fits the
centroids; pass 2 (``map_batches`` over the shards) writes one row per input
row (:data:`CLASSES_SCHEMA`): the class id of every segment and the semantic
label map (PNG, segment ids replaced by class ids), as ``classes-*.parquet``
under the output, beside ``centroids.npy`` and ``centroids.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from diffcut.job import schema

__all__ = [
    "CLASSES_SCHEMA",
    "WEIGHTINGS",
    "normalize_rows",
    "kmeans_plusplus",
    "spherical_kmeans",
    "KMeansResult",
    "assign_classes",
    "segment_arrays",
    "sample_keys",
    "sample_batch",
    "merge_samples",
    "sample_key_bound",
    "draw_sample",
    "classify_batch",
    "discover_classes",
    "read_classes",
    "read_centroids",
    "read_centroids_info",
    "write_centroids",
    "add_arguments",
    "run",
]

#: Output shards are ``classes-<run id>-....parquet``.
CLASSES_PREFIX = "classes-"
CENTROIDS_NPY = "centroids.npy"
CENTROIDS_JSON = "centroids.json"
WEIGHTINGS = ("pixels", "segments")
DEFAULT_SAMPLE_SIZE = 50_000

#: One row per input row. ``mask`` is the semantic label map (class ids), PNG
#: like the labels' ``mask``; the columns ``image_id``, ``status`` and ``mask``
#: are what ``diffcut evaluate`` reads from Parquet predictions.
CLASSES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("mask", pa.binary()),
        pa.field("mask_width", pa.int32()),
        pa.field("mask_height", pa.int32()),
        pa.field("num_segments", pa.int32()),
        pa.field("class_ids", pa.list_(pa.int32())),
        pa.field("class_scores", pa.list_(pa.float32())),
    ],
    metadata={"diffcut.classes_version": "1"},
)

# Columns of the label shards each pass reads.
_SAMPLE_COLUMNS = ["source", "status", "mask_width", "mask_height", "segments"]
_CLASSIFY_COLUMNS = ["image_id", "source", "status", "error", "width", "height", "mask", "mask_width",
                     "mask_height", "num_segments", "segments"]

#: Sample element: its key, its weight, its descriptor.
SAMPLE_SCHEMA = pa.schema([pa.field("key", pa.float64()), pa.field("weight", pa.float64()),
                           pa.field("descriptor", pa.list_(pa.float32()))])


# =========================================================================== math (numpy only)
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


def kmeans_plusplus(points: np.ndarray, k: int, rng: np.random.Generator,
                    weights: np.ndarray | None = None) -> np.ndarray:
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


def _lloyd(points: np.ndarray, weights: np.ndarray, centroids: np.ndarray, max_iter: int,
           tol: float) -> KMeansResult:
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


def spherical_kmeans(x: np.ndarray, k: int, *, weights: np.ndarray | None = None, seed: int = 0,
                     max_iter: int = 100, tol: float = 1e-7, n_init: int = 3,
                     init: np.ndarray | None = None) -> KMeansResult:
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


# =========================================================================== per-batch work (Arrow, numpy)
def segment_arrays(batch: pa.Table) -> dict[str, np.ndarray]:
    """The segments of the ok rows of a label batch, flattened.

    Returns a dict of arrays over all segments: ``row`` (index of the row in
    ``batch``), ``segment_id``, ``area``, ``descriptor`` (n, c) float32, and
    ``pixels`` (the mask size of the segment's row).
    """
    status = batch.column("status").to_pylist()
    rows = [index for index, value in enumerate(status) if value == schema.STATUS_OK]
    ok = batch.take(pa.array(rows, pa.int64())) if len(rows) != batch.num_rows else batch
    segments = ok.column("segments").combine_chunks() if ok.num_rows else None
    if segments is None or len(segments) == 0:
        return {"row": np.zeros(0, np.int64), "segment_id": np.zeros(0, np.int32), "area": np.zeros(0, np.int64),
                "descriptor": np.zeros((0, 0), np.float32), "pixels": np.zeros(0, np.int64)}
    lengths = np.diff(np.asarray(segments.offsets))
    flat = segments.flatten()
    descriptors = flat.field("descriptor")
    dims = np.diff(np.asarray(descriptors.offsets))
    if dims.size and (dims != dims[0]).any():
        raise ValueError("segment descriptors of different lengths in one output")
    dim = int(dims[0]) if dims.size else 0
    values = np.asarray(descriptors.flatten(), dtype=np.float32).reshape(-1, dim) if dim else \
        np.zeros((len(flat), 0), np.float32)
    pixels = (np.asarray(ok.column("mask_width").to_numpy(zero_copy_only=False), np.int64)
              * np.asarray(ok.column("mask_height").to_numpy(zero_copy_only=False), np.int64))
    return {
        "row": np.repeat(np.asarray(rows, np.int64), lengths),
        "segment_id": np.asarray(flat.field("segment_id"), dtype=np.int32),
        "area": np.asarray(flat.field("area"), dtype=np.int64),
        "descriptor": values,
        "pixels": np.repeat(pixels, lengths),
    }


def sample_keys(source: str, num_segments: int, seed: int) -> np.ndarray:
    """(num_segments,) keys in [0, 1) of an image's segments, a function of (seed, source, segment) only.

    The sample is the segments with the smallest keys: a uniform sample without
    replacement that does not depend on how the rows are batched or ordered.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{source}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little")).random(int(num_segments))


def _segment_weights(arrays: dict[str, np.ndarray], weighting: str) -> np.ndarray:
    if weighting == "pixels":
        return arrays["area"] / np.maximum(arrays["pixels"], 1)
    if weighting == "segments":
        return (arrays["area"] > 0).astype(np.float64)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")


def _smallest(table: pa.Table, size: int) -> pa.Table:
    """The ``size`` rows of a sample table with the smallest keys (duplicate keys once: a row read twice)."""
    keys = table.column("key").to_numpy()
    _, first = np.unique(keys, return_index=True)  # sorted by key
    return table.take(pa.array(first[:size], pa.int64()))


def sample_batch(batch: pa.Table, *, sample_size: int, seed: int, weighting: str,
                 max_key: float = 1.0) -> pa.Table:
    """Pass 1 on one batch of label rows: its segments with key below ``max_key``, at most the
    ``sample_size`` of smallest key (:data:`SAMPLE_SCHEMA`).

    Only segments with pixels in the mask take part. ``max_key`` (see
    :func:`sample_key_bound`) keeps what travels to the driver near the
    sample size instead of every descriptor of the dataset.
    """
    arrays = segment_arrays(batch)
    if arrays["row"].size == 0:
        return SAMPLE_SCHEMA.empty_table()
    sources = batch.column("source").to_pylist()
    rows, segment_ids = arrays["row"], arrays["segment_id"]
    keys = np.empty(rows.size)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    for start, stop in zip(starts.tolist(), np.r_[starts[1:], rows.size].tolist()):
        ids = segment_ids[start:stop]
        keys[start:stop] = sample_keys(sources[rows[start]], int(ids.max()) + 1, seed)[ids]
    weights = _segment_weights(arrays, weighting)
    keep = np.flatnonzero((arrays["area"] > 0) & (keys < max_key))
    keep = keep[np.argsort(keys[keep], kind="stable")[:sample_size]]
    descriptors = arrays["descriptor"][keep]
    offsets = pa.array(np.arange(keep.size + 1, dtype=np.int32) * descriptors.shape[1], pa.int32())
    return pa.Table.from_arrays(
        [pa.array(keys[keep]), pa.array(weights[keep]),
         pa.ListArray.from_arrays(offsets, pa.array(descriptors.reshape(-1), pa.float32()))],
        schema=SAMPLE_SCHEMA,
    )


def merge_samples(samples: Iterable[pa.Table], sample_size: int) -> pa.Table:
    """The ``sample_size`` smallest-key elements of several partial samples, merged as they arrive.

    Parts are buffered and trimmed whenever the buffer passes twice the
    sample size, so memory stays within a few sample sizes.
    """
    buffered: list[pa.Table] = []
    count = 0
    for sample in samples:
        if sample.num_rows:
            buffered.append(sample.select(SAMPLE_SCHEMA.names).cast(SAMPLE_SCHEMA))
            count += sample.num_rows
        if count > 2 * sample_size:
            buffered = [_smallest(pa.concat_tables(buffered), sample_size)]
            count = buffered[0].num_rows
    return _smallest(pa.concat_tables([SAMPLE_SCHEMA.empty_table(), *buffered]), sample_size)


def sample_key_bound(sample_size: int, total_segments: int) -> float:
    """A key bound below which ``total_segments`` uniform keys hold the ``sample_size`` smallest, almost surely.

    About ``1.2 * sample_size + 10 sqrt(sample_size) + 100`` keys fall below it
    (mean of a binomial; the margin is many standard deviations). When fewer
    than ``sample_size`` do after all, :func:`draw_sample` reads again
    without a bound, so the sample never depends on this.
    """
    if total_segments <= 0:
        return 1.0
    expected = 1.2 * sample_size + 10 * np.sqrt(sample_size) + 100
    return float(min(1.0, expected / total_segments))


def draw_sample(run_pass, sample_size: int, total_segments: int) -> pa.Table:
    """The ``sample_size`` segments of smallest key of a dataset.

    Args:
        run_pass: ``max_key -> iterable of`` :func:`sample_batch` tables over
            every batch of the dataset (the Ray Data pass, or a loop).
        sample_size: S.
        total_segments: segments in the dataset (an upper bound on those with pixels).
    """
    bound = sample_key_bound(sample_size, total_segments)
    sample = merge_samples(run_pass(bound), sample_size)
    if sample.num_rows < sample_size and bound < 1.0:
        # Fewer than S keys below the bound (or fewer than S segments with pixels): take them all.
        sample = merge_samples(run_pass(1.0), sample_size)
    return sample


def sample_arrays(sample: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(descriptors (n, c) float32, weights (n,)) of a merged sample."""
    if sample.num_rows == 0:
        return np.zeros((0, 0), np.float32), np.zeros(0)
    column = sample.column("descriptor").combine_chunks()
    values = np.asarray(column.flatten(), dtype=np.float32).reshape(sample.num_rows, -1)
    return values, sample.column("weight").to_numpy()


def classify_batch(batch: pa.Table, *, centroids: np.ndarray) -> pa.Table:
    """Pass 2 on one batch of label rows: class ids and the semantic label map of every row.

    Ok rows: ``class_ids[k]`` is segment k's class (:func:`assign_classes` of
    its descriptor, all segments of the batch in one product), ``mask`` the
    label map with every segment id replaced by its class id. Error rows keep
    their error and get no mask.
    """
    arrays = segment_arrays(batch)
    if arrays["row"].size:
        ids, scores = assign_classes(arrays["descriptor"], centroids)
    else:
        ids, scores = np.zeros(0, np.int32), np.zeros(0, np.float32)
    columns = [name for name in _CLASSIFY_COLUMNS if name != "segments"]
    rows = []
    for index, row in enumerate(batch.select(columns).to_pylist()):
        out = {name: row.get(name) for name in CLASSES_SCHEMA.names if name in row}
        out.update(mask=None, class_ids=None, class_scores=None)
        if row["status"] == schema.STATUS_OK:
            start, stop = np.searchsorted(arrays["row"], [index, index + 1])
            # segments are stored in id order: position k is segment k
            row_ids = ids[start:stop]
            semantic = row_ids[schema.decode_mask(row["mask"])]
            out.update(mask=schema.encode_mask(semantic), class_ids=row_ids.tolist(),
                       class_scores=scores[start:stop].tolist())
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=CLASSES_SCHEMA)


# =========================================================================== reading an output
def _class_shards(output: str) -> list[str]:
    from diffcut.job.io import join_uri, open_filesystem

    fs, root = open_filesystem(output)
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    return [join_uri(output, n) for n in names if n.startswith(CLASSES_PREFIX) and n.endswith(".parquet")]


def read_classes(output: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows a :func:`discover_classes` run wrote to ``output`` (first row of every ``source``)."""
    wanted = list(CLASSES_SCHEMA.names if columns is None else columns)
    read_columns = wanted if "source" in wanted else [*wanted, "source"]
    tables = []
    for uri in _class_shards(output):
        tables.append(schema.read_shard(uri, columns=read_columns))
    if not tables:
        raise FileNotFoundError(f"no {CLASSES_PREFIX}*.parquet under {output}: not a discover output")
    target = pa.schema([CLASSES_SCHEMA.field(n) for n in read_columns])
    return schema.drop_duplicate_sources(pa.concat_tables([t.cast(target) for t in tables])).select(wanted)


def read_centroids(output: str) -> np.ndarray:
    """(K, c) float32 unit centroids of a discover output."""
    from diffcut.job.io import join_uri, open_filesystem

    fs, path = open_filesystem(join_uri(output, CENTROIDS_NPY))
    with fs.open(path, "rb") as handle:
        return np.load(handle, allow_pickle=False)


def read_centroids_info(output: str) -> dict:
    """The ``centroids.json`` of a discover output (fit settings and statistics)."""
    from diffcut.job.io import join_uri, open_filesystem

    fs, path = open_filesystem(join_uri(output, CENTROIDS_JSON))
    with fs.open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


# =========================================================================== the Ray Data job
def _shard_names(run_id: str):
    """A Ray Data FilenameProvider naming the pass-2 files ``classes-<run id>-<write>-<task>.parquet``."""
    from ray.data.datasource import FilenameProvider

    class ClassShardNames(FilenameProvider):
        def __init__(self) -> None:
            super().__init__(file_format="parquet")

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{CLASSES_PREFIX}{run_id}-{write_uuid}-{task_index:06d}.parquet"

    return ClassShardNames()


def _prepare_output(labels: str, output: str, overwrite: bool) -> None:
    from diffcut.job.io import join_uri, open_filesystem

    if output == labels:
        raise ValueError("--output must differ from --input (the labels)")
    fs, root = open_filesystem(output)
    existing = _class_shards(output)
    if existing:
        if not overwrite:
            raise ValueError(f"{output} already holds a discover output ({len(existing)} shard(s)); "
                             "pass --overwrite to replace it")
        for uri in existing + [join_uri(output, CENTROIDS_NPY), join_uri(output, CENTROIDS_JSON)]:
            path = open_filesystem(uri)[1]
            if fs.exists(path):
                fs.rm(path)
    fs.makedirs(root, exist_ok=True)


def discover_classes(labels: str, output: str, num_classes: int, *, sample_size: int = DEFAULT_SAMPLE_SIZE,
                     seed: int = 0, weighting: str = "pixels", max_iter: int = 100, n_init: int = 3,
                     batch_rows: int = 64, cpus_per_task: float = 1.0, address: str | None = None,
                     overwrite: bool = False) -> dict:
    """Fit K classes on the segment descriptors of ``labels`` and write classes per segment to ``output``.

    Pass 1 (Ray Data): every batch of label rows gives its ``sample_size``
    smallest-key segments (:func:`sample_batch`), merged on the driver into
    the dataset's. The driver fits :func:`spherical_kmeans`. Pass 2 (Ray Data
    ``map_batches``, :func:`classify_batch`) writes ``classes-*.parquet``
    (:data:`CLASSES_SCHEMA`), then ``centroids.npy`` and ``centroids.json``.

    Joins the Ray cluster at ``address`` / ``RAY_ADDRESS`` or starts an
    embedded one on 127.0.0.1 (an already initialized Ray is used as is).

    Returns:
        The content of ``centroids.json`` (without the centroids): settings,
        sample size, objective, rows written.
    """
    import ray

    from diffcut.job.io import arrow_filesystem, check_uri
    from diffcut.job.ray_session import connect_ray

    started = time.time()
    labels, output = check_uri(labels), check_uri(output)
    num_classes, sample_size = int(num_classes), int(sample_size)
    if not 1 <= num_classes <= schema.MAX_LABEL + 1:
        raise ValueError(f"--num-classes must be in 1..{schema.MAX_LABEL + 1}; got {num_classes}")
    if sample_size < num_classes:
        raise ValueError(f"--sample-size ({sample_size}) must be at least --num-classes ({num_classes})")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"--weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    shards, incomplete = schema.list_shards(labels)
    if not shards:
        raise ValueError(f"no label shards ({schema.SHARD_PREFIX}*.parquet) under {labels}")
    _prepare_output(labels, output, overwrite)
    # Short columns first: the number of segments (for the sample's key bound) and the run's parameters.
    total_segments, first_params = 0, None
    for uri in shards:
        table = schema.read_shard(uri, columns=["status", "num_segments", "params"])
        for status, count, params in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            if status == schema.STATUS_OK:
                total_segments += int(count or 0)
                first_params = first_params or params

    started_ray = connect_ray(address, cpus_per_task)
    try:
        filesystem, root = arrow_filesystem(labels)
        paths = [root.rstrip("/") + "/" + uri.rsplit("/", 1)[-1] for uri in shards]
        task_args = dict(batch_size=batch_rows, batch_format="pyarrow", num_cpus=cpus_per_task)

        def read(columns: list[str]):
            return ray.data.read_parquet(paths, filesystem=filesystem).select_columns(columns)

        # Pass 1: the sample, then the fit on the driver.
        def sample_pass(max_key: float):
            sampled = read(_SAMPLE_COLUMNS).map_batches(
                sample_batch, fn_kwargs=dict(sample_size=sample_size, seed=seed, weighting=weighting,
                                             max_key=max_key), **task_args)
            return sampled.iter_batches(batch_format="pyarrow")

        sample = draw_sample(sample_pass, sample_size, total_segments)
        descriptors, weights = sample_arrays(sample)
        if descriptors.shape[0] < num_classes:
            raise ValueError(f"the labels hold {descriptors.shape[0]} segments with pixels; "
                             f"cannot fit {num_classes} classes")
        fit = spherical_kmeans(descriptors, num_classes, weights=weights, seed=seed, max_iter=max_iter,
                               n_init=n_init)
        fit_seconds = time.time() - started

        # Pass 2: every row's classes and semantic map.
        run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + hashlib.blake2b(
            f"{time.time_ns()}".encode(), digest_size=4).hexdigest()
        out_filesystem, out_root = arrow_filesystem(output)
        classified = read(_CLASSIFY_COLUMNS).map_batches(
            classify_batch, fn_kwargs=dict(centroids=fit.centroids), **task_args)
        classified.write_parquet(out_root, filesystem=out_filesystem, filename_provider=_shard_names(run_id),
                                 ray_remote_args={"num_cpus": cpus_per_task}, schema=CLASSES_SCHEMA)
    finally:
        if started_ray:
            ray.shutdown()

    written = read_classes(output, columns=["source", "status"])
    status = written.column("status").to_pylist()
    class_weight = np.bincount(fit.labels, weights=weights, minlength=num_classes)
    info = {
        "format": "diffcut.classes/1",
        "labels": labels,
        "output": output,
        "num_classes": num_classes,
        "feature_dim": int(fit.centroids.shape[1]),
        "method": "spherical k-means, k-means++ seeding, cosine similarity",
        "seed": int(seed),
        "weighting": weighting,
        "sample_size": sample_size,
        "sampled_segments": int(descriptors.shape[0]),
        "n_init": int(n_init),
        "max_iter": int(max_iter),
        "iterations": int(fit.iterations),
        "converged": bool(fit.converged),
        "objective_mean_cosine": round(float(fit.objective), 6),
        "class_sample_share": [round(float(v), 6) for v in class_weight / max(class_weight.sum(), 1e-300)],
        "rows": len(status),
        "ok": sum(s == schema.STATUS_OK for s in status),
        "error": sum(s != schema.STATUS_OK for s in status),
        "skipped_incomplete_shards": incomplete,
        "sample_and_fit_seconds": round(fit_seconds, 3),
        "seconds": round(time.time() - started, 3),
        "labels_params": json.loads(first_params) if first_params else None,
    }
    write_centroids(output, fit.centroids, info)
    return info


def write_centroids(output: str, centroids: np.ndarray, info: dict) -> None:
    """Write ``centroids.npy`` ((K, c) float32) and ``centroids.json`` (``info`` plus the centroids as lists)."""
    from diffcut.job.io import join_uri, open_filesystem

    centroids = np.asarray(centroids, dtype=np.float32)
    fs, root = open_filesystem(output)
    fs.makedirs(root, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, centroids, allow_pickle=False)
    fs.pipe_file(open_filesystem(join_uri(output, CENTROIDS_NPY))[1], buffer.getvalue())
    document = dict(info, num_classes=int(centroids.shape[0]), centroids=centroids.tolist())
    fs.pipe_file(open_filesystem(join_uri(output, CENTROIDS_JSON))[1],
                 (json.dumps(document, indent=1) + "\n").encode("utf-8"))


# =========================================================================== command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``jobs/discover.py``."""
    parser.add_argument("--input", "-i", required=True, help="output of `diffcut label` (directory or s3:// prefix)")
    parser.add_argument("--output", "-o", required=True,
                        help="where to write classes-*.parquet, centroids.npy and centroids.json")
    parser.add_argument("--num-classes", "-k", required=True, type=int, help="K, the number of classes")
    parser.add_argument("--sample-size", type=int, default=DEFAULT_SAMPLE_SIZE,
                        help="segments the centroids are fitted on (a uniform sample of segments with pixels)")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="pixels",
                        help="pixels: a segment weighs its share of its image's pixels; segments: every segment 1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of k-means++")
    parser.add_argument("--max-iter", type=int, default=100, help="k-means iterations per run")
    parser.add_argument("--n-init", type=int, default=3, help="k-means runs from different seeds; the best is kept")
    parser.add_argument("--batch-rows", type=int, default=64, help="label rows per Ray Data batch")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs reserved per Ray Data task")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else an embedded Ray on 127.0.0.1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a discover output already at --output")


def run(args: argparse.Namespace) -> int:
    from diffcut.job.io import InputError

    try:
        info = discover_classes(args.input, args.output, args.num_classes, sample_size=args.sample_size,
                                seed=args.seed, weighting=args.weighting, max_iter=args.max_iter,
                                n_init=args.n_init, batch_rows=args.batch_rows, cpus_per_task=args.cpus_per_task,
                                address=args.address, overwrite=args.overwrite)
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"discover: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in info.items() if k != "labels_params"}, indent=1))
    return 0
