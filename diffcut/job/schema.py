"""The output format of the labeling job: one Arrow schema, the mask codec, and a reader.

This module is the one source of the format (docs/architecture.md; the PNG label-map
codec is in :mod:`diffcut.job.mask_codec` and re-exported here). Every row the
labeling job writes is built by :func:`ok_row` or :func:`error_row` and
converted by :func:`rows_to_table`; readers use :func:`read_labels`,
:func:`decode_mask` and :func:`decode_tree`.

One row per input image (see ``docs/output-format.md`` for the full reference):

==============  ==========================================  ============================================
column          type                                        meaning
==============  ==========================================  ============================================
image_id        string                                      ``--id-column`` value, else the source
source          string                                      where the image came from (path / URI,
                                                            ``file.parquet#row=N`` for Parquet input);
                                                            unique per input record
width, height   int32                                       image size after EXIF orientation (null if
                                                            the image could not be read)
status          string                                      ``"ok"`` or ``"error"``
error           string                                      why the image failed (null when ok)
mask            binary                                      PNG label map at the mask size, 8-bit when
                                                            every label is < 256, else 16-bit
mask_width,     int32                                       size of ``mask``
mask_height
num_segments    int32                                       K = number of segments = len(segments);
                                                            every mask value is in 0..K-1
segments        list<struct<segment_id int32, area int64,   one entry per segment k = 0..K-1: its pixel
                bbox fixed_size_list<int32>[4],             count in ``mask``, box [x0, y0, x1, y1]
                descriptor list<float32>>>                  (x1, y1 exclusive; zeros when area is 0),
                                                            mean L2-normalized feature (length c)
latent_labels   binary                                      PNG label map at the feature-grid size
tree            string                                      JSON of ``SplitTree.to_dict()`` (without the
                                                            label map: see :func:`decode_tree`)
params          string                                      JSON: model, tau, alpha, timestep, ...
metadata        string (optional: only with                 the input sample's own JSON (WebDataset
                ``keep_metadata``)                          ``{key}.json``), verbatim; null without one
==============  ==========================================  ============================================

Segment ids are the labels of the recursive normalized cut (numbered by first
appearance in raster order of ``latent_labels``); ``mask`` uses the same ids.
The high-resolution assignment can leave a latent segment with no pixel of
``mask`` (area 0); it is still listed so ids, descriptors and the split tree
stay aligned.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from diffcut.job.mask_codec import MAX_LABEL, decode_mask, decode_tree, encode_mask  # noqa: F401 (the format's API)

#: Bumped when a column changes meaning or type; stored in the Parquet metadata.
SCHEMA_VERSION = "1"

STATUS_OK = "ok"
STATUS_ERROR = "error"

SUMMARY_NAME = "_summary.json"

SEGMENT_TYPE = pa.struct(
    [
        pa.field("segment_id", pa.int32(), nullable=False),
        pa.field("area", pa.int64(), nullable=False),
        pa.field("bbox", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("descriptor", pa.list_(pa.float32()), nullable=False),
    ]
)

LABELS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("mask", pa.binary()),
        pa.field("mask_width", pa.int32()),
        pa.field("mask_height", pa.int32()),
        pa.field("num_segments", pa.int32()),
        pa.field("segments", pa.list_(SEGMENT_TYPE)),
        pa.field("latent_labels", pa.binary()),
        pa.field("tree", pa.string()),
        pa.field("params", pa.string()),
    ],
    metadata={"diffcut.schema_version": SCHEMA_VERSION},
)

COLUMNS = tuple(LABELS_SCHEMA.names)

#: Columns written only when asked for (``label_dataset(keep_metadata=True)``); readers give
#: nulls for them in shards written without.
METADATA_FIELD = pa.field("metadata", pa.string())
OPTIONAL_FIELDS = (METADATA_FIELD,)

#: Optional naming columns (``--vocabulary``, :mod:`diffcut.method.naming`): every segment also gets
#: ``class_id`` (vocabulary index; -1 for a segment with no pixel), ``class_name`` (the class's
#: first synonym) and ``class_score`` (softmax probability), and the row a ``semantic_mask``
#: (PNG of class ids at the mask size). Outputs without naming keep :data:`LABELS_SCHEMA`.
NAMED_SEGMENT_TYPE = pa.struct(
    list(SEGMENT_TYPE)
    + [pa.field("class_id", pa.int32()), pa.field("class_name", pa.string()), pa.field("class_score", pa.float32())]
)
SEMANTIC_MASK_FIELD = pa.field("semantic_mask", pa.binary())
NAMED_LABELS_SCHEMA = pa.schema(
    [pa.field("segments", pa.list_(NAMED_SEGMENT_TYPE)) if f.name == "segments" else f for f in LABELS_SCHEMA]
    + [SEMANTIC_MASK_FIELD],
    metadata=LABELS_SCHEMA.metadata,
)
NAMED_COLUMNS = tuple(NAMED_LABELS_SCHEMA.names)


def labels_schema(keep_metadata: bool = False, named: bool = False) -> pa.Schema:
    """The schema of the shards of a run: :data:`LABELS_SCHEMA`, or :data:`NAMED_LABELS_SCHEMA` with
    naming, plus ``metadata`` if kept."""
    base = NAMED_LABELS_SCHEMA if named else LABELS_SCHEMA
    return base.append(METADATA_FIELD) if keep_metadata else base


# --------------------------------------------------------------------------- rows
def params_json(params: Mapping[str, Any]) -> str:
    """The ``params`` column: sorted-key JSON, identical for every row of a run."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"))


def segments_column(mask: np.ndarray, descriptors: np.ndarray) -> list[dict]:
    """The ``segments`` list of one image: area and box in ``mask``, descriptor per segment.

    Args:
        mask: (H, W) labels in 0..K-1 at the output size.
        descriptors: (K, c) float array, row k the descriptor of segment k.
    """
    from diffcut.method.assign import segment_stats

    descriptors = np.asarray(descriptors, dtype=np.float32)
    if descriptors.ndim != 2:
        raise ValueError(f"descriptors must be (K, c); got shape {descriptors.shape}")
    stats = segment_stats(mask, num_segments=descriptors.shape[0])
    return [
        {
            "segment_id": k,
            "area": int(stats.area[k]),
            "bbox": [int(v) for v in stats.bbox[k]],
            "descriptor": descriptors[k],
        }
        for k in range(descriptors.shape[0])
    ]


def ok_row(
    *,
    image_id: str,
    source: str,
    width: int,
    height: int,
    mask: np.ndarray,
    latent_labels: np.ndarray,
    descriptors: np.ndarray,
    tree: Mapping[str, Any] | str,
    params: str,
) -> dict:
    """A successful row: encodes the masks, derives the segment list.

    ``tree`` is ``SplitTree.to_dict()`` (or its JSON); ``params`` is
    :func:`params_json`'s string.
    """
    mask = np.asarray(mask)
    num_segments = int(np.asarray(descriptors).shape[0])
    if mask.size and int(mask.max()) >= num_segments:
        raise ValueError(f"mask has label {int(mask.max())} but there are only {num_segments} segments")
    return {
        "image_id": image_id,
        "source": source,
        "width": int(width),
        "height": int(height),
        "status": STATUS_OK,
        "error": None,
        "mask": encode_mask(mask),
        "mask_width": int(mask.shape[1]),
        "mask_height": int(mask.shape[0]),
        "num_segments": num_segments,
        "segments": segments_column(mask, descriptors),
        "latent_labels": encode_mask(latent_labels),
        "tree": tree if isinstance(tree, str) else json.dumps(tree, separators=(",", ":")),
        "params": params,
    }


def named_row(row: dict, names, class_names: Sequence[str]) -> dict:
    """An ok ``row`` with the naming columns filled in (in place): ``names`` is a
    :class:`diffcut.method.naming.Names` for its segments, ``class_names`` the vocabulary's."""
    for segment, class_id, score in zip(row["segments"], names.class_id, names.class_score):
        segment.update(
            class_id=int(class_id),
            class_score=float(score),
            class_name=class_names[class_id] if class_id >= 0 else None,
        )
    row["semantic_mask"] = encode_mask(names.semantic_mask)
    return row


def error_row(
    image_id: str,
    source: str,
    error: str,
    *,
    params: str | None = None,
    width: int | None = None,
    height: int | None = None,
) -> dict:
    """A row for an image that could not be labeled; ``error`` says why, for a person."""
    row = dict.fromkeys(COLUMNS)
    row.update(
        image_id=image_id,
        source=source,
        status=STATUS_ERROR,
        error=str(error) or "unknown error",
        params=params,
        width=None if width is None else int(width),
        height=None if height is None else int(height),
    )
    return row


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema = LABELS_SCHEMA) -> pa.Table:
    """Rows (dicts with the schema's columns) -> a table with ``schema`` (:func:`labels_schema`)."""
    names = schema.names
    columns = {name: [] for name in names}
    for row in rows:
        extra = set(row) - set(names)
        if extra:
            raise ValueError(f"unknown output columns {sorted(extra)}")
        for name in names:
            columns[name].append(row.get(name))
    segments = columns["segments"]
    columns["segments"] = [
        None if value is None else [dict(s, descriptor=np.asarray(s["descriptor"], np.float32).tolist()) for s in value]
        for value in segments
    ]
    arrays = [pa.array(columns[field.name], type=field.type) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


# --------------------------------------------------------------------------- reading
def read_labels(output: str, columns: Iterable[str] | None = None) -> pa.Table:
    """Read the labels a job wrote to ``output`` (a local directory or ``s3://`` prefix).

    Reads the label file of every unit recorded as done (:mod:`diffcut.job.units`), in order of unit;
    what a killed run left unrecorded is never read, so every input record has at most one row.

    Parameters
    ----------
    output : str
        The job's ``--output``.
    columns : iterable of str, optional
        A subset of the columns (optional ones included, see
        :data:`OPTIONAL_FIELDS`); default all, optional ones when a shard has them.

    Returns
    -------
    pyarrow.Table
        A table with :data:`LABELS_SCHEMA`, or :data:`NAMED_LABELS_SCHEMA` for a
        job run with ``--vocabulary`` (or the chosen columns). Decode ``mask``
        and ``latent_labels`` with :func:`decode_mask`, ``tree`` with :func:`decode_tree`.

    References
    ----------
    .. [1] docs/output-format.md, the full reference of the columns.

    Examples
    --------
    An output holding one row, written here by hand as the job writes it:

    >>> import tempfile
    >>> import numpy as np
    >>> from diffcut.job.schema import decode_mask, ok_row, read_labels, rows_to_table
    >>> output = tempfile.mkdtemp()
    >>> mask = np.array([[0, 0, 1], [0, 1, 1]])
    >>> row = ok_row(image_id="cat", source="cat.jpg", width=3, height=2, mask=mask, latent_labels=mask,
    ...              descriptors=np.eye(2, 4, dtype=np.float32), tree={}, params="{}")
    >>> from diffcut.job import units
    >>> table = rows_to_table([row])
    >>> units.put_durably(units.label_file(output, "cats"), units.table_bytes(table))
    >>> units.write_record(output, units.UnitRecord("cats", rows=1, ok=1, error=0, bytes=0, params="{}", run_id="x"))
    >>> table = read_labels(output)
    >>> table.num_rows, table.column("num_segments").to_pylist()
    (1, [2])
    >>> print(decode_mask(table.column("mask")[0].as_py()))
    [[0 0 1]
     [0 1 1]]
    >>> [segment["area"] for segment in table.column("segments")[0].as_py()]
    [3, 3]
    """
    from diffcut.job.units import label_files

    return labels_of_files(label_files(output), columns)


def labels_of_files(complete: Sequence[str], columns: Iterable[str] | None = None) -> pa.Table:
    """:func:`read_labels` of label files a caller has listed already (:func:`diffcut.job.units.label_files`)."""
    optional = {field.name: field for field in OPTIONAL_FIELDS}
    shard_columns = {uri: set(shard_schema(uri).names) for uri in complete}
    present = set().union(*shard_columns.values()) if shard_columns else set()
    # A job run with --vocabulary writes the named schema (its params make a resume keep it).
    base = labels_schema(named=SEMANTIC_MASK_FIELD.name in present)
    if columns is None:
        wanted = list(base.names) + [name for name in optional if name in present]
    else:
        wanted = list(columns)
    unknown = set(wanted) - set(base.names) - set(optional)
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}; the output has {list(base.names)}")
    read_columns = wanted if "source" in wanted else [*wanted, "source"]
    fields = {**{name: base.field(name) for name in base.names}, **optional}
    schema = pa.schema([fields[name] for name in read_columns], metadata=base.metadata)
    tables = []
    for uri in complete:
        table = read_shard(uri, [name for name in read_columns if name in shard_columns[uri]])
        for name in read_columns:  # an optional column the shard was written without
            if name not in table.column_names:
                table = table.append_column(fields[name], pa.nulls(table.num_rows, fields[name].type))
        tables.append(table.select(read_columns))
    if not tables:
        return schema.empty_table().select(wanted)
    return pa.concat_tables([t.cast(schema) for t in tables]).select(wanted)


def shard_schema(uri: str) -> pa.Schema:
    """The Arrow schema of one shard file (its footer only)."""
    import pyarrow.parquet as pq

    from diffcut.job.inputs import open_filesystem

    fs, path = open_filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle, pre_buffer=False).schema_arrow


def read_shard(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of one shard file (local path or ``s3://`` URI).

    Arrow reads the Python file object (what fsspec gives) in the calling
    thread only. By default (``pre_buffer``, worker threads) Arrow's IO threads
    read it and can drop the last reference to it later, outside the call;
    when that happens while the interpreter exits the process aborts
    (apache/arrow#33975, #49942): a resumed job that had written all its rows
    exited with that crash in 4 of 8 runs here.
    """
    import pyarrow.parquet as pq

    from diffcut.job.inputs import open_filesystem

    fs, path = open_filesystem(uri)
    with fs.open(path, "rb") as handle:
        shard = pq.ParquetFile(handle, pre_buffer=False)
        return shard.read(columns=None if columns is None else list(columns), use_threads=False)


def iter_shard_batches(handle, batch_rows: int, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of an open shard file, read in the calling thread (see :func:`read_shard`)."""
    import pyarrow.parquet as pq

    shard = pq.ParquetFile(handle, pre_buffer=False)
    yield from shard.iter_batches(
        batch_size=batch_rows, columns=None if columns is None else list(columns), use_threads=False
    )


def drop_duplicate_sources(table: pa.Table) -> pa.Table:
    """Keep the first row of every ``source`` (file order), drop the rest."""
    sources = table.column("source").to_numpy(zero_copy_only=False)
    _, first = np.unique(sources, return_index=True)
    if len(first) == table.num_rows:
        return table
    return table.take(pa.array(np.sort(first)))
