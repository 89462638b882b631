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

A shard is read as a stream (``tarfile`` stream mode over the fsspec file,
local or ``s3://``): member after member, only image and JSON members read
into memory, never a whole shard at once. Every sample gives exactly one
record: ``image_id`` = the key, ``source`` = ``<shard URI>#<key>``. A member
that cannot be used (corrupt bytes, a sample without an image, a key seen
twice in one shard, a shard cut off mid-member) is one error record; a shard
whose tar structure breaks in the middle gives one error record for the part
that cannot be read (``<shard URI>#@<byte offset>``), so nothing is lost
silently.

Planning is per shard (:func:`plan_shards`): which keys a shard holds is only
known by reading it, which is the read task's job, so a read unit is a shard
plus the keys a previous run already finished (skipped while streaming).

**img2dataset's Parquet** (``--output_format parquet``): the image bytes in a
``jpg`` column, ``key``, ``url``, ``status``, ``error_message``...; run with
``--image-column jpg --id-column key``. Rows whose ``status`` is not
``success`` become error rows (:func:`img2dataset_status_errors`).

Plain Python on bytes and Arrow tables; no Ray.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections import defaultdict
from typing import Iterable, Iterator, Mapping, Sequence

import pyarrow as pa

from diffcut.job import io as dio

#: Shard file extensions (uncompressed tar: members can be streamed and the end of the
#: archive checked against the file size).
SHARD_EXTENSIONS = frozenset({".tar"})

#: Member extensions taken as the sample's image, in order of preference.
IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
METADATA_MEMBER_EXTENSION = "json"

#: Arrow schema of a WebDataset read unit: one shard and the keys already done in it.
SHARD_UNIT_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string()),  # "webdataset"
        pa.field("path", pa.string()),  # URI of the shard
        pa.field("done_keys", pa.list_(pa.string())),
    ]
)
UNIT_KIND = "webdataset"

#: img2dataset's status for a row whose image was downloaded and resized.
IMG2DATASET_SUCCESS = "success"


def is_shard(uri: str) -> bool:
    return dio.extension(uri) in SHARD_EXTENSIONS


def shard_source(shard_uri: str, key: str) -> str:
    """The ``source`` of the sample ``key`` of a shard."""
    return f"{shard_uri}#{key}"


def split_source(source: str) -> tuple[str, str] | None:
    """(shard URI, key) of a WebDataset ``source``; None for any other kind of source."""
    for ext in SHARD_EXTENSIONS:
        index = source.find(ext + "#")
        if index >= 0:
            cut = index + len(ext)
            return source[:cut], source[cut + 1:]
    return None


def sample_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member, WebDataset's rule: the extension is everything after
    the first dot of the file name (``a/b.seg.png`` -> (``a/b``, ``seg.png``)), lower-cased."""
    directory, name = posixpath.split(member_name)
    stem, _, ext = name.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def sidecar_files(shards: Iterable[str], others: Iterable[str]) -> list[str]:
    """The files of ``others`` that img2dataset writes beside its shards (``00000.parquet``,
    ``00000_stats.json`` next to ``00000.tar``): not inputs."""
    stems = {uri[: -len(dio.extension(uri))] for uri in shards}
    found = []
    for uri in others:
        stem = uri[: -len(dio.extension(uri))] if dio.extension(uri) else uri
        if stem in stems or (stem.endswith("_stats") and stem[: -len("_stats")] in stems):
            found.append(uri)
    return found


# =========================================================================== planning
def plan_shards(files: Sequence[str], done: set[str] | frozenset = frozenset()) -> dio.Plan:
    """One read unit per shard, carrying the keys of that shard already done.

    The number of samples is only known once the shards are read, so the plan
    leaves ``listed`` and ``planned`` as None; ``already_done`` counts the
    done sources that belong to these shards.
    """
    done_keys: dict[str, list[str]] = defaultdict(list)
    for source in done:
        parts = split_source(source)
        if parts is not None:
            done_keys[parts[0]].append(parts[1])
    shards = sorted(files)
    units = pa.Table.from_pydict(
        {"kind": [UNIT_KIND] * len(shards), "path": shards,
         "done_keys": [sorted(done_keys.get(s, [])) for s in shards]},
        schema=SHARD_UNIT_SCHEMA,
    )
    already_done = sum(len(done_keys.get(s, [])) for s in shards)
    return dio.Plan(units=units, listed=None, already_done=already_done, planned=None)


# =========================================================================== reading
def _sample_record(shard_uri: str, key: str, members: Mapping[str, bytes], extensions: Sequence[str],
                   keep_metadata: bool) -> dio.RawRecord:
    """The record of one sample from the members read (``members``) and the extensions of all of them."""
    source = shard_source(shard_uri, key)
    image_ext = next((ext for ext in IMAGE_MEMBER_EXTENSIONS if ext in members), None)
    metadata = None
    if keep_metadata and METADATA_MEMBER_EXTENSION in members:
        metadata = members[METADATA_MEMBER_EXTENSION].decode("utf-8", "replace")
    if image_ext is None:
        found = ", ".join(extensions) or "none"
        wanted = " .".join(IMAGE_MEMBER_EXTENSIONS)
        return dio.RawRecord(key, source, None, f"the sample has no image member (.{wanted}); its members: {found}",
                             metadata)
    return dio.RawRecord(key, source, members[image_ext], None, metadata)


def _is_end_of_archive(handle, position: int) -> bool:
    """Whether the block at ``position``, where tarfile stopped, is the end-of-archive marker (zeros)
    or the end of the file. tarfile also stops, silently, at a header it cannot parse."""
    try:
        handle.seek(position)
        block = handle.read(tarfile.BLOCKSIZE)
    except (OSError, ValueError):  # not seekable: nothing more can be checked
        return True
    return not any(block)


def iter_shard(handle, shard_uri: str, *, done_keys: Iterable[str] = (),
               keep_metadata: bool = False) -> Iterator[dio.RawRecord]:
    """One record per sample of an open tar shard, streamed (see the module docstring).

    Args:
        handle: a binary file object positioned at the start of the shard; seekable,
            so that a tar structure broken before the end is reported.
        shard_uri: the shard's URI, the prefix of every ``source``.
        done_keys: keys to skip (done by an earlier run): their data is not kept.
        keep_metadata: read the ``.json`` member into ``RawRecord.metadata``.
    """
    wanted = set(IMAGE_MEMBER_EXTENSIONS) | ({METADATA_MEMBER_EXTENSION} if keep_metadata else set())
    done = set(done_keys)
    seen: dict[str, int] = {}  # key -> offset of its first member, to report duplicates
    key: str | None = None  # the current sample's key ...
    source_key = ""  # ... and what follows '#' in its source (the key, or key@offset for a duplicate)
    members: dict[str, bytes] = {}  # the members read: image and JSON ones
    extensions: list[str] = []  # of all its members
    problem: str | None = None  # why the current sample cannot be used
    stream_error: str | None = None
    position = 0

    def finish() -> dio.RawRecord | None:
        if key is None or source_key in done:
            return None
        if problem is not None:
            return dio.RawRecord(key, shard_source(shard_uri, source_key), None, problem)
        return _sample_record(shard_uri, key, members, extensions, keep_metadata)

    try:
        archive = tarfile.open(fileobj=handle, mode="r|")
    except (tarfile.TarError, OSError, EOFError) as error:
        if "@0" not in done:
            yield dio.RawRecord("@0", shard_source(shard_uri, "@0"), None,
                                f"not a readable tar shard: {dio.redact(error)}")
        return
    with archive:
        while True:
            try:
                info = archive.next()
            except (tarfile.TarError, OSError, EOFError) as error:
                stream_error = f"the shard cannot be read past byte {position}: {dio.redact(error)}"
                break
            # Stream mode keeps every member header in a list; nothing here looks members up by name.
            archive.members.clear()
            if info is None:
                position = archive.offset
                break
            position = info.offset
            if not info.isfile():
                continue
            member_key, ext = sample_key(info.name)
            if member_key != key:
                record = finish()
                if record is not None:
                    yield record
                key, source_key, members, extensions, problem = member_key, member_key, {}, [], None
                if member_key in seen:
                    source_key = f"{member_key}@{info.offset}"
                    problem = (f"duplicate key {member_key!r} in this shard: its first sample starts at byte "
                               f"{seen[member_key]}; the members of a WebDataset sample must be consecutive")
                else:
                    seen[member_key] = info.offset
            extensions.append(ext)
            if source_key in done or problem is not None or ext not in wanted or ext in members:
                continue  # stream mode skips the member's data when the next header is read
            try:
                members[ext] = archive.extractfile(info).read()
            except (tarfile.TarError, OSError, EOFError) as error:
                problem = (f"member {info.name!r} cannot be read ({dio.redact(error)}); "
                           "the shard is truncated or corrupt")
                stream_error = ""  # the sample's own error row reports it
                break
    record = finish()
    if record is not None:
        yield record
    if stream_error is None and not _is_end_of_archive(handle, position):
        stream_error = f"the tar structure is broken at byte {position}: the samples after it cannot be read"
    if stream_error:
        marker = f"@{position}"
        if marker not in done:
            yield dio.RawRecord(marker, shard_source(shard_uri, marker), None, stream_error)


def read_shard_unit(unit: Mapping, *, keep_metadata: bool = False) -> Iterator[dio.RawRecord]:
    """The records of one WebDataset read unit (:data:`SHARD_UNIT_SCHEMA`); never raises."""
    uri = unit["path"]
    try:
        fs, path = dio.open_filesystem(uri)
        handle = fs.open(path, "rb")
    except Exception as error:  # noqa: BLE001 - one error record for the shard, the job goes on
        marker = "@0"
        if marker not in (unit.get("done_keys") or ()):
            yield dio.RawRecord(marker, shard_source(uri, marker), None,
                                f"cannot open the shard: {dio.redact(error)}")
        return
    with handle:
        yield from iter_shard(handle, uri, done_keys=unit.get("done_keys") or (), keep_metadata=keep_metadata)


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
            detail = f": {dio.redact(message)}" if message else ""
            errors.append(f"img2dataset status {status!r}{detail}")
    return errors
