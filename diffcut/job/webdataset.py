"""Inputs in the layouts large image datasets ship in: WebDataset tar shards and img2dataset's Parquet.

**WebDataset** (the format of img2dataset's ``--output_format webdataset``,
LAION / DataComp / COYO releases): a dataset is a set of ``.tar`` shards; a
*sample* is the group of consecutive members that share a key, the member's
path up to the first dot of its file name (``00000/000000012.jpg``,
``00000/000000012.json`` and ``00000/000000012.txt`` are the sample
``00000/000000012``). The image is the member whose extension is an image
extension (the first of :data:`IMAGE_MEMBER_EXTENSIONS` present); a
``.json`` member is the sample's metadata. img2dataset writes a ``.parquet``
and a ``_stats.json`` file beside every shard; they are not inputs.

A shard (``.tar``, or gzip-compressed ``.tar.gz`` / ``.tgz``) is read as a
stream (``tarfile`` stream mode over the file, local or ``s3://``, gzip
decompressed as it is read): member after member, only image and JSON members
read into memory, never a whole shard at once. Every sample gives exactly one
record: ``image_id`` = the key, ``source`` = ``<shard URI>#<key>`` (bytes of a
member name that are not UTF-8 as ``%XX``). A member that cannot be used
(corrupt bytes, a sample without an image, an image member that is a link or a
special entry -- never followed --, a key seen twice in one shard, a shard cut
off mid-member) is one error record; a shard whose tar or gzip structure breaks
in the middle gives one error record for the part that cannot be read
(``<shard URI>#@<byte offset>``), so nothing is lost silently. A key found in
two shards is reported by :func:`duplicate_keys` (the job's summary).

Planning is per shard (:func:`plan_shards`): a shard is a unit of work, read
whole, and which keys it holds is only known by reading it, which is the read
task's job.

**img2dataset's Parquet** (``--output_format parquet``): the image bytes in a
``jpg`` column, ``key``, ``url``, ``status``, ``error_message``...; run with
``--image-column jpg --id-column key``. Rows whose ``status`` is not
``success`` become error rows (:func:`img2dataset_status_errors`).

Plain Python on bytes and Arrow tables; no Ray.
"""

from __future__ import annotations

import gzip
import posixpath
import tarfile
import zlib
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence

import pyarrow as pa

from diffcut.job import boundary, inputs

#: Shard file name endings, longest first: tar, and gzip-compressed tar (img2dataset's and the
#: ``webdataset`` library's ``.tar.gz`` / ``.tgz``); both are streamed member by member.
SHARD_EXTENSIONS = (".tar.gz", ".tgz", ".tar")

#: Member extensions taken as the sample's image, in order of preference.
IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
METADATA_MEMBER_EXTENSION = "json"

#: Arrow schema of a WebDataset read unit: one shard, read whole (its output unit of the same name).
SHARD_UNIT_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string()),  # "webdataset"
        pa.field("path", pa.string()),  # URI of the shard
        pa.field("unit", pa.dictionary(pa.int32(), pa.string())),
    ]
)
UNIT_KIND = "webdataset"

#: img2dataset's status for a row whose image was downloaded and resized.
IMG2DATASET_SUCCESS = "success"


def is_shard(uri: str, ext: str | None = None) -> bool:
    """Whether ``uri`` names a shard (``ext``: its :func:`diffcut.job.inputs.extension`, if known)."""
    ext = inputs.extension(uri) if ext is None else ext
    return ext in (".tar", ".tgz") or (ext == ".gz" and uri.lower().endswith(".tar.gz"))


def _shard_stem(uri: str) -> str:
    lower = uri.lower()
    return next((uri[: -len(end)] for end in SHARD_EXTENSIONS if lower.endswith(end)), uri)


def shard_source(shard_uri: str, key: str) -> str:
    """The ``source`` of the sample ``key`` of a shard."""
    return f"{shard_uri}#{key}"


def split_source(source: str) -> tuple[str, str] | None:
    """(shard URI, key) of a WebDataset ``source``; None for any other kind of source."""
    found = [(index + len(ext), ext) for ext in SHARD_EXTENSIONS if (index := source.find(ext + "#")) >= 0]
    if not found:
        return None
    cut = min(found)[0]
    return source[:cut], source[cut + 1 :]


def sample_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member, WebDataset's rule: the extension is everything after
    the first dot of the file name (``a/b.seg.png`` -> (``a/b``, ``seg.png``)), lower-cased. Bytes of
    the name that are not UTF-8 are kept as ``%XX`` (:func:`diffcut.job.boundary.name_text`)."""
    directory, name = posixpath.split(boundary.name_text(member_name))
    stem, _, ext = name.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def sidecar_files(shards: Iterable[str], others: Iterable[str]) -> list[str]:
    """The files of ``others`` that img2dataset writes beside its shards (``00000.parquet``,
    ``00000_stats.json`` next to ``00000.tar``): not inputs."""
    stems = {_shard_stem(uri) for uri in shards}
    found = []
    for uri in others:
        stem = uri[: -len(inputs.extension(uri))] if inputs.extension(uri) else uri
        if stem in stems or (stem.endswith("_stats") and stem[: -len("_stats")] in stems):
            found.append(uri)
    return found


# =========================================================================== planning
def plan_shards(files: Sequence[str], *, root: str = "", done: inputs.Done | None = None) -> inputs.Plan:
    """One read unit, and one output unit, per shard not yet done (:func:`diffcut.job.units.unit_name` of its
    path inside the input ``root``). How many samples a shard holds is only known once it is read, so
    ``listed`` and ``planned`` are None and the plan expects None rows of each unit."""
    from diffcut.job import units

    done = done or inputs.Done()
    names = {shard: units.unit_name(units.relative_name(shard, root)) for shard in sorted(files)}
    pending = [shard for shard, name in names.items() if name not in done.units]
    table = pa.Table.from_pydict(
        {"kind": [UNIT_KIND] * len(pending), "path": pending, "unit": [names[s] for s in pending]},
        schema=SHARD_UNIT_SCHEMA,
    )
    return inputs.Plan(
        units=table,
        listed=None,
        already_done=done.rows,
        planned=None,
        units_listed=len(names),
        units_done=len(names) - len(pending),
        expected=dict.fromkeys((names[s] for s in pending), None),
        inputs={names[s]: s for s in pending},
    )


# =========================================================================== reading
def _sample_record(
    shard_uri: str,
    key: str,
    members: Mapping[str, bytes],
    extensions: Sequence[str],
    keep_metadata: bool,
    links: Mapping[str, str],
) -> inputs.RawRecord:
    """The record of one sample from the members read (``members``), the extensions of all of them, and
    its members that are links or special entries (``links``: extension -> what it is)."""
    source = shard_source(shard_uri, key)
    image_ext = next((ext for ext in IMAGE_MEMBER_EXTENSIONS if ext in members or ext in links), None)
    wanted = [image_ext] + ([METADATA_MEMBER_EXTENSION] if keep_metadata else [])
    refused = [links[ext] for ext in wanted if ext in links and ext not in members]
    if refused:
        return inputs.RawRecord(
            key, source, None, f"{refused[0]}; links and special entries in a shard are never followed or read"
        )
    metadata = None
    if keep_metadata and METADATA_MEMBER_EXTENSION in members:
        metadata = members[METADATA_MEMBER_EXTENSION].decode("utf-8", "replace")
    if image_ext is None:
        found = ", ".join(extensions) or "none"
        wanted_text = " .".join(IMAGE_MEMBER_EXTENSIONS)
        return inputs.RawRecord(
            key, source, None, f"the sample has no image member (.{wanted_text}); its members: {found}", metadata
        )
    return inputs.RawRecord(key, source, members[image_ext], None, metadata)


#: What reading a shard raises when its bytes are broken (gzip: BadGzipFile is an OSError, a cut stream EOFError).
_STREAM_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)

_MEMBER_KINDS = (
    ("issym", "a symbolic link"),
    ("islnk", "a hard link"),
    ("ischr", "a character device"),
    ("isblk", "a block device"),
    ("isfifo", "a FIFO"),
)


def _member_kind(info: tarfile.TarInfo) -> str:
    found = (name for test, name in _MEMBER_KINDS if getattr(info, test)())
    return next(found, f"a special entry (type {info.type!r})")


class _Recorder:
    """A read-only stream that keeps the last bytes read, so that the tar block at an offset the reader
    has passed can be checked without seeking back (a gzip stream or an S3 object cannot seek back)."""

    KEEP = 1 << 16

    def __init__(self, raw):
        self.raw, self.chunks, self.kept, self.position, self.ended = raw, deque(), 0, 0, False

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if not data and size != 0:
            self.ended = True
        self.chunks.append((self.position, data))  # whole chunks: no copying per read
        self.position += len(data)
        self.kept += len(data)
        while self.kept - len(self.chunks[0][1]) >= self.KEEP:
            self.kept -= len(self.chunks.popleft()[1])
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The tar block at ``offset`` (shorter at the end of the stream); None when no longer kept."""
        while offset + tarfile.BLOCKSIZE > self.position and not self.ended:
            self.read(tarfile.BLOCKSIZE)
        if not self.chunks or offset < self.chunks[0][0]:
            return None
        end = offset + tarfile.BLOCKSIZE
        return b"".join(
            data[max(0, offset - start) : end - start]
            for start, data in self.chunks
            if start < end and start + len(data) > offset
        )


def _is_end_of_archive(stream: _Recorder, position: int) -> bool:
    """Whether the block at ``position``, where tarfile stopped, is the end-of-archive marker (zeros)
    or the end of the stream. tarfile also stops, silently, at a header it cannot parse."""
    try:
        block = stream.block_at(position)
    except _STREAM_ERRORS:
        return False
    return block is None or not any(block)


def _tar_stream(handle) -> _Recorder:
    """The tar bytes of an open shard: gzip-compressed ones (by their magic bytes) decompressed as they are read."""
    head = handle.read(2)
    handle.seek(0)
    return _Recorder(gzip.GzipFile(fileobj=handle, mode="rb") if head == b"\x1f\x8b" else handle)


def iter_shard(handle, shard_uri: str, *, keep_metadata: bool = False) -> Iterator[inputs.RawRecord]:
    """One record per sample of an open tar shard, streamed (see the module docstring).

    Args:
        handle: a seekable binary file object at the start of the shard (tar, or gzip-compressed tar).
        shard_uri: the shard's URI, the prefix of every ``source``.
        keep_metadata: read the ``.json`` member into ``RawRecord.metadata``.
    """
    wanted = set(IMAGE_MEMBER_EXTENSIONS) | ({METADATA_MEMBER_EXTENSION} if keep_metadata else set())
    seen: dict[str, int] = {}  # key -> offset of its first member, to report duplicates
    key: str | None = None  # the current sample's key ...
    source_key = ""  # ... and what follows '#' in its source (the key, or key@offset for a duplicate)
    members: dict[str, bytes] = {}  # the members read: image and JSON ones
    links: dict[str, str] = {}  # its members that are links or special entries: extension -> what it is
    extensions: list[str] = []  # of all its members
    problem: str | None = None  # why the current sample cannot be used
    stream_error: str | None = None
    position = 0

    def finish() -> inputs.RawRecord | None:
        if key is None:
            return None
        if problem is not None:
            return inputs.RawRecord(key, shard_source(shard_uri, source_key), None, problem)
        return _sample_record(shard_uri, key, members, extensions, keep_metadata, links)

    try:
        stream = _tar_stream(handle)
        archive = tarfile.open(fileobj=stream, mode="r|")
    except _STREAM_ERRORS as error:
        yield inputs.RawRecord(
            "@0", shard_source(shard_uri, "@0"), None, f"not a readable tar shard: {_message(error)}"
        )
        return
    with archive:
        while True:
            try:
                info = archive.next()
            except _STREAM_ERRORS as error:
                stream_error = f"the shard cannot be read past byte {position}: {_message(error)}"
                break
            # Stream mode keeps every member header in a list; nothing here looks members up by name.
            archive.members.clear()
            if info is None:
                position = archive.offset
                break
            position = info.offset
            if info.isdir():
                continue  # structure, not a member of any sample
            member_key, ext = sample_key(info.name)
            if member_key != key:
                record = finish()
                if record is not None:
                    yield record
                key, source_key, members, links, extensions, problem = member_key, member_key, {}, {}, [], None
                if member_key in seen:
                    source_key = f"{member_key}@{info.offset}"
                    problem = (
                        f"duplicate key {member_key!r} in this shard: its first sample starts at byte "
                        f"{seen[member_key]}; the members of a WebDataset sample must be consecutive"
                    )
                else:
                    seen[member_key] = info.offset
            extensions.append(ext)
            if not info.isfile():  # never followed nor extracted: a link may point anywhere
                links.setdefault(ext, f"its member {boundary.name_text(info.name)!r} is {_member_kind(info)}")
                continue
            if problem is not None or ext not in wanted or ext in members:
                continue  # stream mode skips the member's data when the next header is read
            try:
                members[ext] = archive.extractfile(info).read()
            except _STREAM_ERRORS as error:
                problem = (
                    f"member {boundary.name_text(info.name)!r} cannot be read ({_message(error)}); "
                    "the shard is truncated or corrupt"
                )
                stream_error = ""  # the sample's own error row reports it
                break
    record = finish()
    if record is not None:
        yield record
    if stream_error is None and not _is_end_of_archive(stream, position):
        stream_error = f"the tar structure is broken at byte {position}: the samples after it cannot be read"
    if stream_error:
        marker = f"@{position}"
        yield inputs.RawRecord(marker, shard_source(shard_uri, marker), None, stream_error)


def _message(error: BaseException) -> str:
    return inputs.redact(boundary.describe_error(error))


def read_shard_unit(unit: Mapping, *, keep_metadata: bool = False) -> Iterator[inputs.RawRecord]:
    """The records of one WebDataset read unit (:data:`SHARD_UNIT_SCHEMA`); never raises."""
    uri = unit["path"]
    try:
        handle = boundary.open_input(uri)
    except Exception as error:  # noqa: BLE001 - one error record for the shard, the job goes on
        marker = "@0"
        yield inputs.RawRecord(marker, shard_source(uri, marker), None, f"cannot open the shard: {_message(error)}")
        return
    with handle:
        yield from iter_shard(handle, uri, keep_metadata=keep_metadata)


def write_shard(path_or_handle, members: Iterable[tuple[str, bytes]]) -> None:
    """Write a tar shard with these (member name, data) members, in order, as img2dataset and
    WebDataset's ``TarWriter`` lay them out (``key.jpg``, ``key.json``, ``key.txt`` ...).

    For examples and tests: small datasets in the format the labeling job reads.
    """
    import io

    kwargs = {"fileobj": path_or_handle} if hasattr(path_or_handle, "write") else {"name": str(path_or_handle)}
    with tarfile.open(mode="w", **kwargs) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


#: How many sample keys used in several shards the summary names (their total is always given).
DUPLICATES_NAMED = 100


def duplicate_keys(image_ids: Sequence[str], sources: Sequence[str]) -> dict:
    """Sample keys found in more than one shard, from an output's ``image_id`` and ``source`` columns.

    Every such sample has its own row (its ``source`` names its shard), but they share an
    ``image_id``; the job's summary warns about them, as a Parquet ``--id-column`` value used
    twice is an error row. Returns ``{"count": keys, "named": [{"image_id", "sources"}...]}``.
    """
    shards: dict[str, set[str]] = defaultdict(set)
    for image_id, source in zip(image_ids, sources):
        parts = split_source(source)
        if parts is not None and not image_id.startswith("@"):  # "@offset": a shard's unreadable rest
            shards[image_id].add(parts[0])
    repeated = sorted(key for key, found in shards.items() if len(found) > 1)
    named = [
        {"image_id": key, "sources": sorted(shard_source(shard, key) for shard in shards[key])}
        for key in repeated[:DUPLICATES_NAMED]
    ]
    return {"count": len(repeated), "named": named}


# =========================================================================== img2dataset Parquet
def img2dataset_status_errors(schema: pa.Schema, read_columns) -> list[str | None] | None:
    """Per-row errors of an img2dataset Parquet file: rows whose ``status`` is not ``success``.

    img2dataset's Parquet output has a ``status`` and an ``error_message``
    column (both are what identifies the layout: a ``status`` column alone
    may mean anything). Returns None for any other file. ``read_columns(names)``
    reads those columns of the whole file as a table.
    """
    if "status" not in schema.names or "error_message" not in schema.names:
        return None
    table = read_columns(["status", "error_message"])
    errors = []
    for status, message in zip(table.column("status").to_pylist(), table.column("error_message").to_pylist()):
        if status == IMG2DATASET_SUCCESS:
            errors.append(None)
        else:
            detail = f": {inputs.redact(message)}" if message else ""
            errors.append(f"img2dataset status {status!r}{detail}")
    return errors
