"""The discover job's per-batch work on label shards (Arrow + numpy, no Ray).

Pass 1 keeps a deterministic sample of segments (:func:`sample_keys` gives
every segment a pseudo-random key; the ``sample_size`` smallest keys form the
sample, whatever the partitioning into batches: :func:`sample_batch`,
:func:`merge_samples`, :func:`draw_sample`); pass 2 assigns every segment its
class and writes the semantic label map (:func:`classify_batch`, one row of
:data:`CLASSES_SCHEMA` per input row). The job itself is
:func:`diffcut.tools.discover.discover_classes`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from diffcut.job import schema
from diffcut.method.kmeans import assign_classes

WEIGHTINGS = ("pixels", "segments")

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
_CLASSIFY_COLUMNS = [
    "image_id",
    "source",
    "status",
    "error",
    "width",
    "height",
    "mask",
    "mask_width",
    "mask_height",
    "num_segments",
    "segments",
]

#: Sample element: its key, its weight, its descriptor.
SAMPLE_SCHEMA = pa.schema(
    [pa.field("key", pa.float64()), pa.field("weight", pa.float64()), pa.field("descriptor", pa.list_(pa.float32()))]
)


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
        return {
            "row": np.zeros(0, np.int64),
            "segment_id": np.zeros(0, np.int32),
            "area": np.zeros(0, np.int64),
            "descriptor": np.zeros((0, 0), np.float32),
            "pixels": np.zeros(0, np.int64),
        }
    lengths = np.diff(np.asarray(segments.offsets))
    flat = segments.flatten()
    descriptors = flat.field("descriptor")
    dims = np.diff(np.asarray(descriptors.offsets))
    if dims.size and (dims != dims[0]).any():
        raise ValueError("segment descriptors of different lengths in one output")
    dim = int(dims[0]) if dims.size else 0
    values = (
        np.asarray(descriptors.flatten(), dtype=np.float32).reshape(-1, dim)
        if dim
        else np.zeros((len(flat), 0), np.float32)
    )
    pixels = np.asarray(ok.column("mask_width").to_numpy(zero_copy_only=False), np.int64) * np.asarray(
        ok.column("mask_height").to_numpy(zero_copy_only=False), np.int64
    )
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


def sample_batch(batch: pa.Table, *, sample_size: int, seed: int, weighting: str, max_key: float = 1.0) -> pa.Table:
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
        [
            pa.array(keys[keep]),
            pa.array(weights[keep]),
            pa.ListArray.from_arrays(offsets, pa.array(descriptors.reshape(-1), pa.float32())),
        ],
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
            out.update(
                mask=schema.encode_mask(semantic), class_ids=row_ids.tolist(), class_scores=scores[start:stop].tolist()
            )
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=CLASSES_SCHEMA)
