"""The output's layout: one label file and one done record per input unit (docs/output-format.md, docs/scale.md).

An *input unit* is the unit of work and of bookkeeping: a WebDataset shard, a
Parquet file, or a chunk of the listing of loose image files. Under ``--output``::

    labels/<unit>.parquet   the unit's label rows, one per input record, in order of source
    _units/<unit>.json      its done record (:class:`UnitRecord`), written once the label file is durable
    _parts/<run id>/...     rows as the pipeline hands them over, before their unit is whole (staging)
    _summary.json           the last run's summary
    _lease.json             the running job's lease (diffcut.job.lease)

A unit counts as done only through its record, and readers read only the label
files of recorded units, so a unit cut off midway (a killed run) is invisible
and redone whole; its label file is rewritten under the same name, so a retried
write never duplicates a row. Planning, resuming and the summary list
``_units/`` and read these small records, never the rows. Plain Python, no Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from diffcut.job.storage import InputError, describe_exception, is_remote, join_uri, open_filesystem

LABELS_DIR = "labels"
RECORDS_DIR = "_units"
PARTS_DIR = "_parts"

#: Longest unit name kept whole (bytes); longer ones keep a prefix and a hash (file names stop at 255).
MAX_NAME_BYTES = 160

#: Records read ahead at a time (:func:`iter_records`).
RECORDS_PER_BATCH = 64

#: Error messages a record keeps, most common first (the run summary's ``common_errors`` come from them).
RECORD_ERRORS = 10


class OldLayoutError(InputError):
    """An output written by an earlier diffcut (``labels-*.parquet`` directly under it)."""


# =========================================================================== names
def unit_name(relative: str) -> str:
    """The name of the unit of the input file at ``relative`` (its path inside the input): one file
    name, the same in every run, distinct for distinct paths (``a/b.tar`` -> ``a%2Fb.tar``). A leading
    ``.`` or ``_`` is escaped too: pyarrow, pandas and HF datasets skip files named so."""
    # "?" too: Ray Data's read_parquet takes it for a URL query and drops a file so named from a list of paths.
    name = relative.replace("%", "%25").replace("/", "%2F").replace("?", "%3F")
    if name.startswith((".", "_")):
        name = f"%{ord(name[0]):02X}" + name[1:]
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha256(relative.encode()).hexdigest()[:16]
        name = name.encode()[: MAX_NAME_BYTES - 17].decode(errors="ignore") + "-" + digest
    return name


def chunk_name(run_id: str, index: int) -> str:
    """The name of the ``index``-th chunk of loose image files a run labels (its record lists the files)."""
    return f"images-{run_id}-{index:06d}"


def relative_name(uri: str, root: str) -> str:
    """``uri``'s path inside the input ``root`` (its base name when ``uri`` is the input itself)."""
    root = root.rstrip("/")
    if root == "." and not uri.startswith("/"):
        return uri  # the input is the working directory: its files are listed relative to it
    if uri.startswith(root + "/"):
        return uri[len(root) + 1 :]
    return uri.rsplit("/", 1)[-1]


def label_file(output: str, unit: str) -> str:
    return join_uri(output, f"{LABELS_DIR}/{unit}.parquet")


def record_file(output: str, unit: str) -> str:
    return join_uri(output, f"{RECORDS_DIR}/{unit}.json")


def part_file(output: str, run_id: str, unit: str, sources: Sequence[str]) -> str:
    """Where a write task stages rows of ``unit``: named after their sources, so a retried task replaces its
    own file instead of adding one, and two different batches never share a name."""
    digest = hashlib.sha256("\0".join(sources).encode()).hexdigest()[:20]
    return join_uri(output, f"{PARTS_DIR}/{run_id}/{unit}/{digest}.parquet")


# =========================================================================== records
@dataclass
class UnitRecord:
    """The done record of one unit (``_units/<unit>.json``).

    rows/ok/error: its label rows; bytes: the label file's size; params: the
    label settings' JSON (``params`` column); input: the input file (shard,
    Parquet file), or None for a chunk of image files, whose ``sources`` are
    listed instead; complete: False when ``--limit`` cut the unit (its rows are
    read, the next run redoes it whole); errors: {message: count} of the
    most common errors.
    """

    unit: str
    rows: int
    ok: int
    error: int
    bytes: int
    params: str
    run_id: str
    input: str | None = None
    sources: list[str] | None = None
    complete: bool = True
    errors: dict[str, int] = field(default_factory=dict)
    written: float = 0.0

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> UnitRecord:
        try:
            values = json.loads(data)
            return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})
        except (ValueError, TypeError, KeyError) as error:
            raise InputError(f"{where} is not a diffcut unit record ({error}); delete it to redo that unit") from None


def _names(output: str, folder: str, suffix: str) -> list[str]:
    fs, root = open_filesystem(output)
    fs.invalidate_cache()  # Ray workers wrote there; this process may hold an older listing
    try:
        entries = fs.ls(f"{root.rstrip('/')}/{folder}", detail=False)
    except FileNotFoundError:
        return []
    names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
    return sorted(
        name[: len(name) - len(suffix)] for name in names if name.endswith(suffix) and not name.startswith(".")
    )


def recorded_units(output: str) -> list[str]:
    """The names of the units with a record (one listing of ``_units/``), sorted."""
    check_layout(output)
    return _names(output, RECORDS_DIR, ".json")


def iter_records(output: str, units: Sequence[str] | None = None, threads: int | None = None) -> Iterator[UnitRecord]:
    """The records of ``units`` (default: every recorded unit), read ``threads`` at a time and handed over a
    batch at a time, so that a caller folding them into counts never holds them all."""
    units = recorded_units(output) if units is None else units
    fs, root = open_filesystem(output)
    folder = f"{root.rstrip('/')}/{RECORDS_DIR}"

    def read(unit: str) -> UnitRecord:
        return UnitRecord.from_json(fs.cat_file(f"{folder}/{unit}.json"), record_file(output, unit))

    if len(units) < RECORDS_PER_BATCH:
        yield from map(read, units)
        return
    with ThreadPoolExecutor(max_workers=threads or (32 if is_remote(output) else 4)) as pool:
        for start in range(0, len(units), RECORDS_PER_BATCH):
            yield from pool.map(read, units[start : start + RECORDS_PER_BATCH])


def read_records(output: str, units: Sequence[str] | None = None, threads: int | None = None) -> list[UnitRecord]:
    """The records of ``units`` (default: every recorded unit) as a list (:func:`iter_records`)."""
    return list(iter_records(output, units, threads))


def put_durably(uri: str, data: bytes) -> None:
    """Write a whole file that is on stable storage when this returns: an S3 PUT (an object appears whole), or
    locally a temporary file, fsync, then an atomic rename over the name."""
    fs, path = open_filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Hidden until renamed: a reader listing the folder (pyarrow, pandas, HF datasets) skips dot files.
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise


def write_record(output: str, record: UnitRecord) -> None:
    """Record ``record.unit`` as done (call only once its label file is durable)."""
    record.written = record.written or time.time()
    put_durably(record_file(output, record.unit), record.to_json())


def table_bytes(table: pa.Table) -> bytes:
    """A label table as the bytes of one Parquet file (row groups of 1,024 rows, zstd)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=1024, compression="zstd")
    return sink.getvalue().to_pybytes()


def remove_units(output: str, units: Iterable[str]) -> int:
    """Delete units' records first (so they stop counting as done), then their label files."""
    fs, _ = open_filesystem(output)
    units = list(units)
    for make in (record_file, label_file):
        paths = [open_filesystem(make(output, unit))[1] for unit in units]
        for path in paths:
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass
    return len(units)


def remove_parts(output: str) -> None:
    """Delete the staging folder (``_parts/``): after a run whose every unit was finished, or before one."""
    fs, root = open_filesystem(output)
    parts = f"{root.rstrip('/')}/{PARTS_DIR}"
    if fs.exists(parts):
        fs.rm(parts, recursive=True)


def sweep(output: str, recorded: Iterable[str], *, delete: bool = True) -> int:
    """Delete what no record accounts for: every staged part (``_parts/``) and the label files of units
    without a record (a run killed before recording them). Only the lease's holder may delete.
    Returns how many units had something there (``delete=False``: counts only, for a dry run)."""
    fs, _ = open_filesystem(output)
    staged = set()
    for run in _names(output, PARTS_DIR, ""):
        staged.update(_names(output, f"{PARTS_DIR}/{run}", ""))
    keep = set(recorded)
    orphans = [unit for unit in _names(output, LABELS_DIR, ".parquet") if unit not in keep]
    if delete:
        remove_parts(output)
        for unit in orphans:
            fs.rm_file(open_filesystem(label_file(output, unit))[1])
    return len(staged.union(orphans) - keep)


def remove_layout(output: str) -> int:
    """Delete everything the job writes under ``output`` (``--overwrite``); other files stay. Returns how many
    units were recorded."""
    fs, root = open_filesystem(output)
    fs.invalidate_cache()
    old_shards = old_layout_shards(output)  # an earlier diffcut's shards go too
    recorded = len(_names(output, RECORDS_DIR, ".json")) + len(old_shards)
    for folder in (RECORDS_DIR, LABELS_DIR, PARTS_DIR):
        path = f"{root.rstrip('/')}/{folder}"
        if fs.exists(path):
            fs.rm(path, recursive=True)
    for name in ["_summary.json", *old_shards]:
        path = f"{root.rstrip('/')}/{name}"
        if fs.exists(path):
            fs.rm_file(path)
    return recorded


# =========================================================================== readers
def old_layout_shards(output: str) -> list[str]:
    """``labels-*.parquet`` files directly under ``output``: the layout of diffcut before units."""
    fs, root = open_filesystem(output)
    fs.invalidate_cache()
    try:
        entries = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
    return sorted(n for n in names if n.startswith("labels-") and n.endswith(".parquet"))


def check_layout(output: str) -> None:
    """Refuse an output in the old layout, in one line that says what to do."""
    old = old_layout_shards(output)
    if old:
        raise OldLayoutError(
            f"{output} holds label shards in the layout of an earlier diffcut ({old[0]}"
            f"{f' and {len(old) - 1} more' if len(old) > 1 else ''} directly under it), which this version "
            "does not read: label the input again into a new --output (or pass --overwrite to replace them)"
        )


def label_files(output: str) -> list[str]:
    """The label files of every recorded unit of ``output``, in order of unit name: what readers read.

    Raises InputError when ``output`` holds no labels (or is in the old layout).
    """
    try:
        units = recorded_units(output)
    except OldLayoutError:
        raise
    except Exception as error:  # noqa: BLE001 - storage errors name the output
        raise InputError(f"cannot list the labels under {output}: {describe_exception(error)}") from None
    return [label_file(output, unit) for unit in units]
