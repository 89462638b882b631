"""Read units: what a run still has to do, and the bytes of every record in it.

:func:`plan_image_files` and :func:`plan_parquet` turn a listing into *read
units* (one image file, or one Parquet row group with the rows still to do)
minus what a previous run already finished (:func:`plan_inputs` picks by input
kind; WebDataset shards are planned by :mod:`diffcut.job.webdataset`);
:func:`read_units` yields every record's bytes, or why there are none. Plain
Python on Arrow tables (no Ray).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from diffcut.job import boundary, units
from diffcut.job.storage import InputError, describe_exception, is_remote, open_filesystem, redact

if TYPE_CHECKING:  # diffcut.job.inputs re-exports this module's names, so it is imported only for the type
    from diffcut.job.inputs import InputListing

# =========================================================================== planning
#: The type of a read unit's output unit name: dictionary-encoded, as thousands of read units share one.
UNIT_NAME_TYPE = pa.dictionary(pa.int32(), pa.string())

#: Arrow schema of a read unit: one image file, or the rows of one Parquet row group; ``unit`` names the
#: output unit its rows belong to (:mod:`diffcut.job.units`).
UNIT_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string()),  # "file" or "parquet"
        pa.field("path", pa.string()),  # URI of the file
        pa.field("unit", UNIT_NAME_TYPE),
        pa.field("row_group", pa.int32()),  # Parquet only
        pa.field("rows", pa.list_(pa.int64())),  # Parquet: row indices within the row group
        pa.field("image_ids", pa.list_(pa.string())),
        pa.field("sources", pa.list_(pa.string())),
        pa.field("errors", pa.list_(pa.string())),  # known before reading (null id, duplicate id)
    ]
)


class SortedSources:
    """The files of an output's recorded chunks of image files, streamed in path order, never all held.

    ``streams``: one zero-argument callable per run that recorded chunks, each giving that run's files
    in path order (its chunks were cut from a sorted listing, in order); ``count``: how many in all.
    """

    def __init__(self, streams: Sequence[Callable[[], Iterator[str]]], count: int):
        self.streams, self.count = list(streams), count

    def __iter__(self) -> Iterator[str]:
        return heapq.merge(*(stream() for stream in self.streams))

    def __len__(self) -> int:
        return self.count


def _not_in_sorted(paths: pa.ChunkedArray, sources: Iterable[str]) -> pa.ChunkedArray | None:
    """For each of the sorted ``paths``, whether it is not among the sorted ``sources`` (a merge, no hash
    of them); None when ``sources`` turn out not to be in order."""
    stream = iter(sources)
    current, masks = next(stream, None), []
    for chunk in paths.chunks:
        keep = []
        for path in chunk.to_pylist():
            while current is not None and current < path:
                previous, current = current, next(stream, None)
                if current is not None and current < previous:
                    return None
            keep.append(current != path)
        masks.append(pa.array(keep, pa.bool_()))
    return pa.chunked_array(masks, pa.bool_())


@dataclass
class Done:
    """What an output already holds, from its unit records (:func:`diffcut.job.resume.output_state`).

    units: the complete units' names; sources: the files of its chunks of image files, streamed
    (:class:`SortedSources`) or any collection of strings (files added to the input since are in no chunk);
    rows, ok, error: the recorded units' rows; partial: units recorded incomplete (cut by ``--limit``),
    redone whole.
    """

    units: set[str] = field(default_factory=set)
    sources: SortedSources | Collection[str] = field(default_factory=set)
    rows: int = 0
    ok: int = 0
    error: int = 0
    partial: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """The work of one run: read units, the output units they make, and counts for the summary.

    expected: every planned output unit -> its rows (None where only reading tells: WebDataset);
    partial: planned units that ``limit`` cut (recorded as incomplete); inputs: unit -> its input file
    (None for a chunk of image files).
    """

    units: pa.Table
    listed: int | None  # input records found (None: only known once read, WebDataset shards)
    already_done: int  # records with a row in the output already (skipped)
    planned: int | None  # records this run will process (None: as for ``listed``)
    skipped_files: int = 0
    units_listed: int | None = None  # output units in the input, done ones included (None: not known)
    units_done: int = 0
    expected: dict[str, int | None] = field(default_factory=dict)
    partial: set[str] = field(default_factory=set)
    inputs: dict[str, str | None] = field(default_factory=dict)


def plan_image_files(
    files: pa.Array | pa.ChunkedArray | Sequence[str],
    done: Done | None = None,
    limit: int | None = None,
    *,
    unit_files: int = 1000,
    run_id: str = "run",
) -> Plan:
    """One read unit per image file not yet done (``image_id`` = ``source`` = the file's URI), in output
    units of ``unit_files`` files (:func:`diffcut.job.units.chunk_name`). Built column by column in Arrow:
    a listing of millions of files costs its paths once, not a Python list per file (docs/scale.md)."""
    import numpy as np

    done = done or Done()
    if unit_files < 1:
        raise InputError(f"--unit-files must be at least 1; got {unit_files}")
    pending = files if isinstance(files, (pa.Array, pa.ChunkedArray)) else pa.array(list(files), pa.string())
    listed = len(pending)
    if not isinstance(pending, pa.ChunkedArray):
        pending = pa.chunked_array([pending], pa.string())
    if len(done.sources):
        keep = _not_in_sorted(pending, done.sources) if isinstance(done.sources, SortedSources) else None
        if keep is None:  # a plain collection, or recorded files out of order: a hash of them all
            keep = pc.invert(pc.is_in(pending, value_set=pa.array(list(done.sources), pa.string())))
        pending = pending.filter(keep)
    already_done = listed - len(pending)
    if limit is not None:
        pending = pending.slice(0, max(0, int(limit)))
    count = len(pending)
    chunks = -(-count // unit_files)
    names = pa.array([units.chunk_name(run_id, index) for index in range(chunks)], pa.string())

    def chunk_index(start: int, size: int) -> pa.Array:
        return pa.array(np.arange(start, start + size) // unit_files, pa.int32())

    # Column by column, chunk by chunk of the listing (one per folder): the paths are never copied.
    columns: list[list[pa.Array]] = [[] for _ in UNIT_SCHEMA]
    start = 0
    for paths in pending.chunks:
        size = len(paths)
        one_each = pa.array(np.arange(size + 1, dtype=np.int32))  # offsets: a list of one value per row
        for column, array in zip(
            columns,
            [
                pa.array(["file"] * size, pa.string()),
                paths,
                pa.DictionaryArray.from_arrays(chunk_index(start, size), names),
                pa.nulls(size, pa.int32()),
                pa.ListArray.from_arrays(one_each, pa.array(np.zeros(size, np.int64))),
                pa.ListArray.from_arrays(one_each, paths),
                pa.ListArray.from_arrays(one_each, paths),
                pa.ListArray.from_arrays(one_each, pa.nulls(size, pa.string())),
            ],
        ):
            column.append(array)
        start += size
    table = pa.Table.from_arrays(
        [pa.chunked_array(chunk_list, field.type) for chunk_list, field in zip(columns, UNIT_SCHEMA)],
        schema=UNIT_SCHEMA,
    )
    names = names.to_pylist()
    expected = {name: min(unit_files, count - index * unit_files) for index, name in enumerate(names)}
    return Plan(
        units=table,
        listed=listed,
        already_done=already_done,
        planned=count,
        units_listed=len(done.units) + chunks if limit is None else None,
        units_done=len(done.units),
        expected=dict(expected),
        inputs=dict.fromkeys(expected),
    )


def parquet_source(file_uri: str, row: int) -> str:
    """The ``source`` of row ``row`` (0-based, within the file) of a Parquet input file."""
    return f"{file_uri}#row={row}"


def image_column_kind(schema: pa.Schema, column: str, file_uri: str) -> str:
    """``"bytes"`` (binary column) or ``"struct"`` (HF datasets Image {bytes, path}); else InputError."""
    if column not in schema.names:
        raise InputError(
            f"{file_uri} has no column {column!r} (columns: {', '.join(schema.names)}); choose one with --image-column"
        )
    kind = schema.field(column).type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return "bytes"
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "struct"
    raise InputError(
        f"column {column!r} of {file_uri} has type {kind}; expected image bytes (binary) or the Hugging Face "
        "datasets Image struct {bytes, path}"
    )


def plan_parquet(
    files: Sequence[str],
    *,
    root: str = "",
    image_column: str = "image",
    id_column: str | None = None,
    done: Done | None = None,
    limit: int | None = None,
) -> Plan:
    """One read unit per row group of every Parquet file not yet done; a file is an output unit
    (:func:`diffcut.job.units.unit_name` of its path inside the input ``root``).

    Reads only the footers of those files and, with ``id_column``, that one column. Every row
    gets ``source = file#row=N``; ``image_id`` is the id column's value (as a
    string) or the source. A null id, an id already used by an earlier row
    (in file order, among the files planned), or an img2dataset ``status`` other than ``success``
    (:func:`diffcut.job.webdataset.img2dataset_status_errors`) is recorded as that
    row's error, so each input row still gives exactly one output row.
    """
    import pyarrow.parquet as pq

    from diffcut.job.webdataset import img2dataset_status_errors

    done = done or Done()
    expected: dict[str, int | None] = {}
    partial: set[str] = set()
    unit_inputs: dict[str, str | None] = {}
    first_use: dict[str, str] = {}
    columns: dict[str, list] = {name: [] for name in UNIT_SCHEMA.names}
    listed = planned = 0
    remaining = None if limit is None else max(0, int(limit))
    for file_uri in files:
        unit = units.unit_name(units.relative_name(file_uri, root))
        if unit in done.units or (remaining is not None and planned >= remaining):
            continue
        try:
            with boundary.open_input(file_uri) as handle:
                # Read in this thread: see diffcut.job.schema.read_shard (Arrow's IO threads vs. interpreter exit).
                parquet = pq.ParquetFile(handle, pre_buffer=False)
                image_column_kind(parquet.schema_arrow, image_column, file_uri)
                if id_column is not None and id_column not in parquet.schema_arrow.names:
                    raise InputError(
                        f"{file_uri} has no id column {id_column!r} (columns: {', '.join(parquet.schema_arrow.names)})"
                    )
                ids = None
                if id_column is not None:
                    ids = parquet.read(columns=[id_column], use_threads=False).column(id_column)
                    ids = ids.cast(pa.string()).to_pylist()
                status_errors = img2dataset_status_errors(
                    parquet.schema_arrow,
                    lambda names: parquet.read(columns=names, use_threads=False),  # noqa: B023 - called here
                )
                group_sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
        except InputError:
            raise
        except Exception as error:  # an unreadable input file is a user-facing problem (re-raised as one)
            raise InputError(f"cannot read Parquet file {file_uri}: {redact(error)}") from error
        start = 0
        unit_planned = planned
        for group, size in enumerate(group_sizes):
            rows, image_ids, sources, errors = [], [], [], []
            for offset in range(size):
                row = start + offset
                source = parquet_source(file_uri, row)
                listed += 1
                image_id, error = source, None
                if ids is not None:
                    value = ids[row]
                    if value is None:
                        error = f"the id column {id_column!r} is null in this row"
                    elif value in first_use and first_use[value] != source:
                        image_id = value
                        error = f"duplicate image_id {value!r}: already used by {first_use[value]}"
                    else:
                        image_id = value
                        first_use.setdefault(value, source)
                if error is None and status_errors is not None:
                    error = status_errors[row]
                if remaining is not None and planned >= remaining:
                    continue
                planned += 1
                rows.append(offset)
                image_ids.append(image_id)
                sources.append(source)
                errors.append(error)
            start += size
            if rows:
                columns["kind"].append("parquet")
                columns["path"].append(file_uri)
                columns["unit"].append(unit)
                columns["row_group"].append(group)
                columns["rows"].append(rows)
                columns["image_ids"].append(image_ids)
                columns["sources"].append(sources)
                columns["errors"].append(errors)
        expected[unit], unit_inputs[unit] = planned - unit_planned, file_uri
        if planned - unit_planned < start:
            partial.add(unit)
    table = pa.Table.from_pydict(columns, schema=UNIT_SCHEMA)
    return Plan(
        units=table,
        listed=listed + done.rows if limit is None else None,
        already_done=done.rows,
        planned=planned,
        units_listed=len(files),
        units_done=len(done.units),
        expected=expected,
        partial=partial,
        inputs=unit_inputs,
    )


def plan_inputs(
    listing: InputListing,
    *,
    image_column: str = "image",
    id_column: str | None = None,
    done: Done | None = None,
    limit: int | None = None,
    unit_files: int = 1000,
    run_id: str = "run",
) -> Plan:
    """The plan for what :func:`list_inputs` found, by its format: every unit not in ``done``
    (``limit`` cuts WebDataset shards in the stream: their records are only known once read)."""
    if listing.format == "parquet":
        plan = plan_parquet(
            listing.files, root=listing.root, image_column=image_column, id_column=id_column, done=done, limit=limit
        )
    elif listing.format == "webdataset":
        from diffcut.job.webdataset import plan_shards

        plan = plan_shards(listing.files, root=listing.root, done=done)
    else:
        plan = plan_image_files(listing.paths, done=done, limit=limit, unit_files=unit_files, run_id=run_id)
    plan.skipped_files = listing.skipped
    return plan


@dataclass
class RawRecord:
    """One input record as read: its bytes, or why there are none."""

    image_id: str
    source: str
    data: bytes | None
    error: str | None = None
    metadata: str | None = None  # the sample's JSON (WebDataset), kept with --keep-metadata
    unit: str | None = None  # the output unit of its row (set by read_units)


def _read_local(uri: str) -> bytes | Exception:
    try:
        return boundary.read_local(uri)
    except OSError as error:
        return error


def _struct_bytes(value) -> bytes | None:
    return None if value is None else value.get("bytes")


def read_units(
    units: Iterable[Mapping], *, image_column: str = "image", keep_metadata: bool = False
) -> Iterator[RawRecord]:
    """Bytes of every record of some read units (see :data:`UNIT_SCHEMA`), in order.

    Image files of one call are fetched together (s3fs fetches them
    concurrently); a Parquet unit reads its row group's image column once; a
    WebDataset shard (:data:`diffcut.job.webdataset.SHARD_UNIT_SCHEMA`) is
    streamed, its records come as they are read.
    A record that cannot be read comes back with ``error`` set, never raises.
    """
    import pyarrow.parquet as pq

    units = list(units)
    file_units = [u for u in units if u["kind"] == "file"]
    fetched: dict[str, object] = {}
    if file_units and not is_remote(file_units[0]["path"]):
        fetched = {u["path"]: _read_local(u["path"]) for u in file_units}
    elif file_units:
        fs, _ = open_filesystem(file_units[0]["path"])
        paths = {u["path"]: open_filesystem(u["path"])[1] for u in file_units}
        try:
            contents = fs.cat(list(paths.values()), on_error="return")
        except Exception as error:  # noqa: BLE001 - report it on every record of the batch
            contents = {path: error for path in paths.values()}
        fetched = {uri: contents.get(path, FileNotFoundError(path)) for uri, path in paths.items()}

    for unit in units:
        if unit["kind"] == "webdataset":
            from diffcut.job.webdataset import read_shard_unit

            for record in read_shard_unit(unit, keep_metadata=keep_metadata):
                record.unit = unit["unit"]
                yield record
            continue
        preset = unit["errors"]
        if unit["kind"] == "file":
            value = fetched[unit["path"]]
            data, error = (
                (value, None)
                if isinstance(value, bytes)
                else (None, f"cannot read the file: {describe_exception(value)}")
            )
            yield RawRecord(unit["image_ids"][0], unit["sources"][0], data, preset[0] or error, unit=unit["unit"])
            continue
        try:
            with boundary.open_input(unit["path"]) as handle:
                table = pq.ParquetFile(handle).read_row_group(unit["row_group"], columns=[image_column])
            column = table.column(image_column).combine_chunks()
            values = column.take(pa.array(unit["rows"], pa.int64())).to_pylist()
            failure = None
        except Exception as error:  # noqa: BLE001
            values, failure = (
                [None] * len(unit["rows"]),
                f"cannot read the Parquet row group: {describe_exception(error)}",
            )
        for image_id, source, error, value in zip(unit["image_ids"], unit["sources"], preset, values):
            if isinstance(value, dict):
                value = _struct_bytes(value)
            if error is None and failure is None and value is None:
                error = f"the image column {image_column!r} is null in this row (no image bytes)"
            yield RawRecord(image_id, source, value, error or failure, unit=unit["unit"])
