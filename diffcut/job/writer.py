"""The write stage: rows staged per unit, then each whole unit written as one label file and recorded.

Rows reach the end of the pipeline in any order, the rows of one unit spread
over many batches. :func:`write_parts` (a Ray Data task) stages each batch's
rows as one part file per unit and returns a small row per part
(:data:`PART_SCHEMA`); the driver counts them per unit (:class:`UnitProgress`)
and, once a unit has all its rows, :func:`finish_unit` (a Ray task) writes the
unit's label file from its parts and then its done record
(:mod:`diffcut.job.units`). The driver holds counts for the units in flight
only, never rows. Plain Python, no Ray.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diffcut.job import schema, units
from diffcut.job.storage import open_filesystem

#: Columns every row carries to the write stage besides the label columns: its unit, and (WebDataset, on the rows
#: of a shard's last chunk) the number of records in it, else -1: a shard's size is known once it is read.
UNIT_COLUMNS = (pa.field("unit", pa.string()), pa.field("unit_rows", pa.int64()))

#: What the write stage returns per part file staged.
PART_SCHEMA = pa.schema(
    [
        pa.field("unit", pa.string()),
        pa.field("part", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("ok", pa.int64()),
        pa.field("unit_rows", pa.int64()),
        pa.field("errors", pa.string()),  # JSON {message: count}
    ]
)


#: Messages of the transient storage errors the write stage retries (botocore's, aiohttp's and s3fs's wording
#: once their own retries are spent): up to :data:`WRITE_ATTEMPTS` times, backing off to 32 s. Every write
#: replaces a whole file under a name fixed by its content, so a retry never adds a row.
RETRIED_IO_ERRORS = (
    "SlowDown",
    "reduce your request rate",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Connection reset",
    "Connection was closed",
    "Server disconnected",
    "Could not connect to the endpoint",
    "Read timeout on endpoint",
)
WRITE_ATTEMPTS = 10


def retrying(call, *args, **kwargs):
    """``call(*args, **kwargs)``, again after a transient storage error (:data:`RETRIED_IO_ERRORS`)."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            return call(*args, **kwargs)
        except Exception as error:
            text = f"{type(error).__name__}: {error}"
            if attempt + 1 == WRITE_ATTEMPTS or not any(message in text for message in RETRIED_IO_ERRORS):
                raise
            time.sleep(min(32.0, 0.5 * 2**attempt))


def error_counts(table: pa.Table) -> Counter:
    """{error message: count} of a label table's error rows."""
    errors = table.filter(pc.equal(table.column("status"), schema.STATUS_ERROR)).column("error")
    return Counter(errors.to_pylist())


def write_parts(batch: pa.Table, *, output: str, run_id: str, label_schema: pa.Schema) -> pa.Table:
    """Ray Data UDF of the write stage: stage the batch's rows, one part file per unit
    (:func:`diffcut.job.units.part_file`); one :data:`PART_SCHEMA` row per file."""
    names = [f.name for f in UNIT_COLUMNS]
    unit_column = batch.column("unit").to_numpy(zero_copy_only=False)
    totals = batch.column("unit_rows").to_numpy(zero_copy_only=False)
    rows = []
    fs, _ = open_filesystem(output)
    for unit in dict.fromkeys(unit_column):
        taken = np.flatnonzero(unit_column == unit)
        table = batch.take(pa.array(taken)).drop_columns(names).select(label_schema.names).cast(label_schema)
        part = units.part_file(output, run_id, unit, table.column("source").to_pylist())
        path = open_filesystem(part)[1]
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        retrying(fs.pipe_file, path, units.table_bytes(table))
        errors = error_counts(table)
        rows.append(
            {
                "unit": unit,
                "part": part,
                "rows": table.num_rows,
                "ok": table.num_rows - sum(errors.values()),
                "unit_rows": int(totals[taken].max()),
                "errors": json.dumps(dict(errors)),
            }
        )
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


def finish_unit(*args, **kwargs) -> units.UnitRecord | None:
    """:func:`write_unit`, retried after transient storage errors (it is idempotent)."""
    return retrying(write_unit, *args, **kwargs)


def write_unit(
    output: str,
    unit: str,
    parts: list[str],
    *,
    expected: int | None,
    complete: bool,
    params: str,
    run_id: str,
    input: str | None,
    list_sources: bool,
    label_schema: pa.Schema,
) -> units.UnitRecord | None:
    """Write ``unit``'s label file from its staged ``parts`` (rows in order of source, one per source), then
    its done record; delete the parts. None, and nothing written, when fewer than ``expected`` distinct
    rows are staged (a row still on its way). A retry of a finish of this run that got as far as the record
    (its parts may be gone) returns that record."""
    recorded = _recorded(output, unit, run_id)
    if recorded is not None:
        return recorded
    tables = [schema.read_shard(part) for part in parts]
    table = pa.concat_tables([t.cast(label_schema) for t in tables]) if tables else label_schema.empty_table()
    table = schema.drop_duplicate_sources(table)
    if expected is not None and table.num_rows < expected:
        return None
    table = table.take(pc.sort_indices(table, [("source", "ascending")]))
    sources = table.column("source").to_pylist() if list_sources else None
    record = record_unit(
        output, unit, table, params=params, run_id=run_id, input=input, sources=sources, complete=complete
    )
    fs, _ = open_filesystem(output)
    for part in parts:
        try:
            fs.rm_file(open_filesystem(part)[1])
        except FileNotFoundError:
            pass
    return record


def record_unit(
    output: str,
    unit: str,
    table: pa.Table,
    *,
    params: str,
    run_id: str,
    input: str | None,
    sources: list[str] | None,
    complete: bool,
) -> units.UnitRecord:
    """Write ``table`` as ``unit``'s label file, durably, then its record (counted from the table): the unit
    counts as done only once its label file is whole. Returns the record."""
    data = units.table_bytes(table)
    units.put_durably(units.label_file(output, unit), data)
    errors = error_counts(table)
    record = units.UnitRecord(
        unit=unit,
        rows=table.num_rows,
        ok=table.num_rows - sum(errors.values()),
        error=sum(errors.values()),
        bytes=len(data),
        params=params,
        run_id=run_id,
        input=input,
        sources=sources,
        complete=complete,
        errors=dict(errors.most_common(units.RECORD_ERRORS)),
    )
    units.write_record(output, record)
    return record


def _recorded(output: str, unit: str, run_id: str) -> units.UnitRecord | None:
    """``unit``'s record when run ``run_id`` wrote it, else None."""
    where = units.record_file(output, unit)
    fs, path = open_filesystem(where)
    try:
        record = units.UnitRecord.from_json(fs.cat_file(path), where)
    except FileNotFoundError:
        return None
    return record if record.run_id == run_id else None


@dataclass
class _InFlight:
    parts: list[str] = field(default_factory=list)
    rows: int = 0
    total: int = -1  # WebDataset: the shard's record count, once its last chunk arrived
    finishing: bool = False


@dataclass
class RunCounts:
    """What a run recorded: units, rows, ok, errors and the messages of its errors."""

    units: int = 0
    rows: int = 0
    ok: int = 0
    error: int = 0
    errors: Counter = field(default_factory=Counter)

    def add(self, record: units.UnitRecord) -> None:
        self.units += 1
        self.rows += record.rows
        self.ok += record.ok
        self.error += record.error
        self.errors.update(record.errors)


class UnitProgress:
    """The driver's view of the units in flight: staged parts and row counts, and which units are whole.

    ``expected`` maps each planned unit to its number of rows, or None where only the read tells
    (WebDataset shards); ``partial`` are units a ``--limit`` cut in the plan.
    """

    def __init__(self, expected: dict[str, int | None], partial: Iterable[str] = ()):
        self.expected = expected
        self.partial = set(partial)
        self.flight: dict[str, _InFlight] = {}
        self.finished: set[str] = set()
        self.counts = RunCounts()

    def _whole(self, unit: str, state: _InFlight) -> bool:
        target = self.target(unit)
        return target is not None and state.rows >= target

    def add(self, parts: pa.Table) -> list[str]:
        """Count a batch of :data:`PART_SCHEMA` rows; returns the units that just became whole."""
        ready = []
        for row in parts.to_pylist():
            if row["unit"] in self.finished:  # a late copy of rows already recorded (its part is swept next run)
                continue
            state = self.flight.setdefault(row["unit"], _InFlight())
            state.parts.append(row["part"])
            state.rows += row["rows"]
            state.total = max(state.total, row["unit_rows"])
            if not state.finishing and self._whole(row["unit"], state):
                state.finishing = True
                ready.append(row["unit"])
        return ready

    def target(self, unit: str) -> int | None:
        state = self.flight.get(unit)
        expected = self.expected.get(unit)
        return expected if expected is not None else (state.total if state and state.total >= 0 else None)

    def finished_unit(self, unit: str, record: units.UnitRecord | None) -> None:
        """A finish of ``unit`` returned: its record, or None when a row was still missing (it waits for more)."""
        state = self.flight[unit]
        if record is None:
            state.finishing = False
            return
        del self.flight[unit]
        self.finished.add(unit)
        self.counts.add(record)

    def at_end(self, cut: bool) -> list[tuple[str, bool]]:
        """After the stream ended cleanly: (unit, complete) of what is still to finish. Units no row reached
        are empty (a shard without samples), unless ``cut`` (``--limit`` stopped the stream); units a limit
        cut are finished as partial."""
        left = []
        for unit in self.expected:
            if unit in self.finished or (unit in self.flight and self.flight[unit].finishing):
                continue
            state = self.flight.get(unit)
            if state is None and cut:
                continue
            whole = state is not None and self._whole(unit, state)
            if state is None and self.expected[unit] in (None, 0):
                whole = True
            if state is not None:
                state.finishing = True
            else:
                self.flight[unit] = _InFlight(finishing=True)
            left.append((unit, whole and unit not in self.partial))
        return left

    def parts(self, unit: str) -> list[str]:
        return list(self.flight[unit].parts)
