"""Dataset-level classes: cluster the segment descriptors of a labeled dataset into K classes.

DiffCut's segments are per image: segment 3 of one image has nothing to do
with segment 3 of the next. Every segment also carries a descriptor, the mean
of the L2-normalized diffusion features over its cells (docs/method.md §2.4; the
paper's concept embedding), and segments of one kind of thing have similar
descriptors across images. Clustering the descriptors of the whole dataset
gives class ids that mean the same thing in every image, so a per-image label
map becomes a semantic one that a supervised model can train on, and that
``diffcut evaluate --matching dataset`` scores with one matching for the
whole dataset.

The method, plain numpy functions (no Ray) in :mod:`diffcut.method.kmeans` and
:mod:`diffcut.tools.discover_batches`:

* **spherical k-means** (Dhillon and Modha, "Concept decompositions for large
  sparse text data using clustering", Machine Learning 2001): descriptors
  are L2-normalized, a point goes to the centroid of largest cosine
  similarity, a centroid is the normalized (weighted) sum of its points;
  :func:`~diffcut.method.kmeans.spherical_kmeans`;
* **k-means++ seeding** (Arthur and Vassilvitskii, SODA 2007) with the cosine
  distance ``1 - cos``, from a seeded generator; :func:`~diffcut.method.kmeans.kmeans_plusplus`;
* fitted on a **sample** of segments (:func:`~diffcut.tools.discover_batches.sample_keys` gives every segment
  a deterministic pseudo-random key; the ``sample_size`` smallest keys form
  the sample, whatever the partitioning into batches); then every segment of
  the dataset is **assigned** to its nearest centroid (:func:`~diffcut.method.kmeans.assign_classes`).

Weighting (``weighting``): with ``"pixels"`` (the default) each sampled
segment weighs its share of its image's mask pixels, so every image counts
once and, within an image, large segments count more — the quantity mIoU
measures; segments with no pixel in the mask are left out of the fit (they
are still assigned a class). With ``"segments"`` every segment with pixels
weighs 1. The sample itself is uniform over segments with pixels.

The job (:func:`discover_classes`; Ray is imported only there and in its file
naming helper): pass 1 reads the label files of the recorded units
(:func:`diffcut.job.units.label_files`) with Ray Data and keeps the sample;
the driver fits the centroids; pass 2 (``map_batches`` over the label files)
writes one row per input row (:data:`~diffcut.tools.discover_batches.CLASSES_SCHEMA`):
the class id of every segment and the semantic label map (PNG, segment ids
replaced by class ids), as ``classes-*.parquet`` under the output, beside
``centroids.npy`` and ``centroids.json``. The flags
are in :mod:`diffcut.commands.discover`.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from diffcut.job import schema, units
from diffcut.method.kmeans import spherical_kmeans
from diffcut.tools.discover_batches import (
    _CLASSIFY_COLUMNS,
    _SAMPLE_COLUMNS,
    CLASSES_SCHEMA,
    WEIGHTINGS,
    classify_batch,
    draw_sample,
    sample_arrays,
    sample_batch,
)

__all__ = [
    "discover_classes",
    "read_classes",
    "read_centroids",
    "read_centroids_info",
    "write_centroids",
]

#: Output shards are ``classes-<run id>-....parquet``.
CLASSES_PREFIX = "classes-"
CENTROIDS_NPY = "centroids.npy"
CENTROIDS_JSON = "centroids.json"
DEFAULT_SAMPLE_SIZE = 50_000


# =========================================================================== reading an output
def _class_shards(output: str) -> list[str]:
    from diffcut.job.inputs import join_uri, open_filesystem

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
    from diffcut.job.inputs import join_uri, open_filesystem

    fs, path = open_filesystem(join_uri(output, CENTROIDS_NPY))
    with fs.open(path, "rb") as handle:
        return np.load(handle, allow_pickle=False)


def read_centroids_info(output: str) -> dict:
    """The ``centroids.json`` of a discover output (fit settings and statistics)."""
    from diffcut.job.inputs import join_uri, open_filesystem

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
    from diffcut.job.inputs import join_uri, open_filesystem

    if output == labels:
        raise ValueError("--output must differ from --input (the labels)")
    fs, root = open_filesystem(output)
    existing = _class_shards(output)
    if existing:
        if not overwrite:
            raise ValueError(
                f"{output} already holds a discover output ({len(existing)} shard(s)); pass --overwrite to replace it"
            )
        for uri in existing + [join_uri(output, CENTROIDS_NPY), join_uri(output, CENTROIDS_JSON)]:
            path = open_filesystem(uri)[1]
            if fs.exists(path):
                fs.rm(path)
    fs.makedirs(root, exist_ok=True)


def arrow_paths(labels: str, files: Sequence[str]):
    """(Arrow filesystem, paths) of the label files ``files`` of the output ``labels``, for Ray Data's readers."""
    from diffcut.job.inputs import arrow_filesystem

    filesystem, root = arrow_filesystem(labels)
    # Each file's URI is ``labels`` joined with its relative path (units.label_file): the same below ``root``.
    return filesystem, [root.rstrip("/") + uri[len(labels.rstrip("/")) :] for uri in files]


def discover_classes(
    labels: str,
    output: str,
    num_classes: int,
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    weighting: str = "pixels",
    max_iter: int = 100,
    n_init: int = 3,
    batch_rows: int = 64,
    cpus_per_task: float = 1.0,
    address: str | None = None,
    overwrite: bool = False,
) -> dict:
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

    from diffcut.job.inputs import InputError, arrow_filesystem, check_uri
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
    files = units.label_files(labels)
    if not files:
        raise InputError(f"no labels under {labels}: not the output of `diffcut label` (or it recorded no unit yet)")
    _prepare_output(labels, output, overwrite)
    # Short columns first: the number of segments (for the sample's key bound) and the run's parameters.
    total_segments, first_params = 0, None
    for uri in files:
        table = schema.read_shard(uri, columns=["status", "num_segments", "params"])
        for status, count, params in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            if status == schema.STATUS_OK:
                total_segments += int(count or 0)
                first_params = first_params or params

    started_ray = connect_ray(address, cpus_per_task)
    try:
        filesystem, paths = arrow_paths(labels, files)
        task_args = dict(batch_size=batch_rows, batch_format="pyarrow", num_cpus=cpus_per_task)

        def read(columns: list[str]):
            return ray.data.read_parquet(paths, filesystem=filesystem).select_columns(columns)

        # Pass 1: the sample, then the fit on the driver.
        def sample_pass(max_key: float):
            sampled = read(_SAMPLE_COLUMNS).map_batches(
                sample_batch,
                fn_kwargs=dict(sample_size=sample_size, seed=seed, weighting=weighting, max_key=max_key),
                **task_args,
            )
            return sampled.iter_batches(batch_format="pyarrow")

        sample = draw_sample(sample_pass, sample_size, total_segments)
        descriptors, weights = sample_arrays(sample)
        if descriptors.shape[0] < num_classes:
            raise ValueError(
                f"the labels hold {descriptors.shape[0]} segments with pixels; cannot fit {num_classes} classes"
            )
        fit = spherical_kmeans(descriptors, num_classes, weights=weights, seed=seed, max_iter=max_iter, n_init=n_init)
        fit_seconds = time.time() - started

        # Pass 2: every row's classes and semantic map.
        run_id = (
            time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            + "-"
            + hashlib.blake2b(f"{time.time_ns()}".encode(), digest_size=4).hexdigest()
        )
        out_filesystem, out_root = arrow_filesystem(output)
        classified = read(_CLASSIFY_COLUMNS).map_batches(
            classify_batch, fn_kwargs=dict(centroids=fit.centroids), **task_args
        )
        classified.write_parquet(
            out_root,
            filesystem=out_filesystem,
            filename_provider=_shard_names(run_id),
            ray_remote_args={"num_cpus": cpus_per_task},
            schema=CLASSES_SCHEMA,
        )
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
        "sample_and_fit_seconds": round(fit_seconds, 3),
        "seconds": round(time.time() - started, 3),
        "labels_params": json.loads(first_params) if first_params else None,
    }
    write_centroids(output, fit.centroids, info)
    return info


def write_centroids(output: str, centroids: np.ndarray, info: dict) -> None:
    """Write ``centroids.npy`` ((K, c) float32) and ``centroids.json`` (``info`` plus the centroids as lists)."""
    from diffcut.job.inputs import join_uri, open_filesystem

    centroids = np.asarray(centroids, dtype=np.float32)
    fs, root = open_filesystem(output)
    fs.makedirs(root, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, centroids, allow_pickle=False)
    fs.pipe_file(open_filesystem(join_uri(output, CENTROIDS_NPY))[1], buffer.getvalue())
    document = dict(info, num_classes=int(centroids.shape[0]), centroids=centroids.tolist())
    fs.pipe_file(
        open_filesystem(join_uri(output, CENTROIDS_JSON))[1], (json.dumps(document, indent=1) + "\n").encode("utf-8")
    )
