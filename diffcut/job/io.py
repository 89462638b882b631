"""Inputs of the labeling job: filesystems, listing, planning, robust image decoding.

Everything here is plain Python on bytes, arrays and Arrow tables (no Ray), so
the labeling job's stages and the single-process tools share one
implementation:

* **Filesystems.** Local paths and ``s3://`` URIs through fsspec (s3fs). S3
  credentials come only from the standard AWS settings -- environment
  variables, shared config/credentials profiles, instance or pod roles -- and
  ``AWS_ENDPOINT_URL`` selects an S3-compatible store. URIs that carry
  credentials are refused, and :func:`redact` strips secret values from any
  message that might be logged or written.
* **Listing and planning.** :func:`list_inputs` finds image files (recursive,
  by extension) or Parquet files under a URI; :func:`plan_image_files` and
  :func:`plan_parquet` turn them into *read units* (one image file, or one
  Parquet row group with the rows still to do) minus what a previous run
  already finished.
* **Decoding.** :func:`decode_image` turns untrusted bytes into an RGB array or
  raises :class:`ImageDecodeError` with a message a person understands: a
  declared size over the pixel limit is refused before any pixel is decoded
  (decompression bombs), EXIF orientation is applied, every PIL colour mode
  becomes 8-bit RGB, animated images give their first frame, and large JPEGs
  are decoded at a reduced DCT scale (``draft``) when the model needs fewer
  pixels.
* **Sizes.** :func:`model_size` gives the model's input size (``square``: the
  paper's resolution x resolution; ``bucket``: aspect-preserving, about
  resolution**2 pixels, sides multiples of the stride), :class:`MaskSize` the
  output label-map size.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

#: Extensions listed as images (compared case-insensitively).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
PARQUET_EXTENSIONS = frozenset({".parquet"})

#: Pixel stride of the feature map of every supported model (SD 1.x/2.x and the
#: SDXL family: VAE /8, then two UNet downsamplings before the feature block).
DEFAULT_STRIDE = 32

#: Images declaring more pixels than this are refused before decoding. Equal to
#: the size at which PIL itself raises DecompressionBombError by default; an
#: 8000 x 6000 photo (48 MP) is far below it.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

RESIZE_MODES = ("bucket", "square")
INPUT_FORMATS = ("auto", "images", "parquet", "webdataset")


class InputError(ValueError):
    """A problem with the job's inputs or flags that a person has to fix (the job exits 2)."""


class ImageDecodeError(ValueError):
    """One image could not be used; the message becomes the row's ``error``."""


# =========================================================================== secrets
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY", re.I)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names say they are secrets (8+ characters)."""
    environ = os.environ if environ is None else environ
    return sorted({v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= 8}, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret environment value replaced by ``***``.

    Error messages from storage clients can echo request details; anything
    this job logs or writes to the output goes through here first.
    """
    text = str(text)
    for value in secret_values(environ):
        if value in text:
            text = text.replace(value, "***")
    return text


# =========================================================================== filesystems
def check_uri(uri: str) -> str:
    """Validate and normalize an input/output location.

    Local paths are normalized (``./a/`` -> ``a``) but kept relative when given
    relative, so ids derived from them stay the same when the job runs from a
    copy of the working directory (``ray job submit --working-dir``). Refuses
    URIs that embed credentials (``s3://KEY:SECRET@bucket``).
    """
    if not uri or not str(uri).strip():
        raise InputError("an empty path was given")
    uri = str(uri).strip()
    if uri.startswith("file:"):
        uri = uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):]
        return os.path.normpath(uri)
    if "://" in uri:
        parts = urlsplit(uri)
        if parts.username or parts.password or "@" in parts.netloc:
            raise InputError(
                f"{parts.scheme}:// locations must not contain credentials; use the standard AWS settings "
                "(environment variables, ~/.aws profiles, instance or pod roles) instead"
            )
        if not parts.netloc:
            raise InputError(f"{uri!r} has no bucket or host")
        return uri.rstrip("/") if parts.path.strip("/") else f"{parts.scheme}://{parts.netloc}"
    return os.path.normpath(uri)


def is_remote(uri: str) -> bool:
    return "://" in check_uri(uri)


def open_filesystem(uri: str):
    """(fsspec filesystem, path inside it) for a local path or a URI such as ``s3://bucket/key``.

    s3fs resolves credentials and the endpoint (``AWS_ENDPOINT_URL``) the way
    every AWS client does; nothing is passed explicitly, so no secret ever
    travels in task arguments.
    """
    import fsspec

    uri = check_uri(uri)
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path


#: botocore's retry policy for the job's S3 clients (docs/reliability.md): "standard" mode retries
#: throttling (503 SlowDown), 5xx answers and connection errors (reset, closed, timed out) with
#: exponential backoff and jitter, up to 20 s a wait; 10 attempts ride out about a minute of a
#: store's trouble. botocore's default ("legacy", 5 attempts) gives up within a few seconds.
S3_RETRIES = {"mode": "standard", "max_attempts": 10}


#: AWS credentials botocore sends as request headers, from the environment.
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def check_credential_variables() -> None:
    """Refuse credentials in the environment that no request can carry (a newline from a copy-paste).

    botocore refuses such a header with an HTTPClientError, which botocore's and
    s3fs's retries treat as a connection error and retry for minutes
    (:data:`S3_RETRIES` x ``S3FileSystem.retries``); failing here says what is wrong at once.
    The value is never echoed.
    """
    for name in CREDENTIAL_VARIABLES:
        value = os.environ.get(name)
        if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError(f"the environment variable {name} holds a control character (a newline from "
                             "a copy-paste?): no S3 request can carry it; set it again without it")


def storage_options(uri: str) -> dict:
    """fsspec options for ``uri``: :data:`S3_RETRIES` for ``s3://``, unless the AWS settings
    (``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS``) choose a retry policy themselves.

    s3fs adds its own retries on top (``S3FileSystem.retries``, 5 attempts): for errors botocore
    does not retry, a response body cut off mid-read above all.
    """
    if urlsplit(uri).scheme in ("s3", "s3a") and not (os.environ.get("AWS_RETRY_MODE")
                                                      or os.environ.get("AWS_MAX_ATTEMPTS")):
        return {"config_kwargs": {"retries": dict(S3_RETRIES)}}
    return {}


def arrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for writing with Arrow (Ray Data's ``write_parquet``).

    Local paths use Arrow's own filesystem; remote ones wrap the fsspec
    filesystem, so reading and writing resolve credentials and endpoints the
    same way.
    """
    import pyarrow.fs as pafs

    uri = check_uri(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = open_filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join_uri(root: str, relative: str) -> str:
    return root.rstrip("/") + "/" + relative.lstrip("/") if relative else root


# =========================================================================== listing
def extension(path: str) -> str:
    """``".jpg"`` for ``a/b.JPG``; ``""`` without one (``a/3f9a``, ``a/.hidden``), as ``posixpath.splitext``."""
    name = path[path.rfind("/") + 1:]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 and name[:dot].strip(".") else ""


#: How many skipped files the job's summary names (their total is always given).
SKIPPED_NAMED = 100

#: Leading bytes of the image formats of IMAGE_EXTENSIONS (WebP: "RIFF", 4 size bytes, "WEBP").
IMAGE_MAGIC = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",), "GIF": (b"GIF87a", b"GIF89a"),
               "TIFF": (b"II*\x00", b"MM\x00*"), "BMP": (b"BM",), "WEBP": (b"RIFF",)}
MAGIC_BYTES = 16


@dataclass
class InputListing:
    """What :func:`list_inputs` found.

    format: ``"images"``, ``"parquet"`` or ``"webdataset"``; files: their URIs, sorted;
    skipped: how many files under the input are not inputs (hidden files,
    ``.txt``, files without an extension that are not images, img2dataset's
    sidecars of the shards...); skipped_named: the first
    :data:`SKIPPED_NAMED` of them (sorted), each ``{"path": uri, "reason": why}``.
    """

    format: str
    files: list[str]
    skipped: int = 0
    skipped_named: list[dict] = field(default_factory=list)


def sniff_image_format(head: bytes) -> str | None:
    """The image format whose magic bytes ``head`` (a file's first bytes) starts with, else None.

    For files without an extension (content-addressed stores: ``images/3f9a...``).
    Weak two-byte BMP magic is confirmed by its reserved header bytes (zero).
    """
    for name, prefixes in IMAGE_MAGIC.items():
        if any(head.startswith(prefix) for prefix in prefixes):
            if name == "WEBP" and head[8:12] != b"WEBP":
                continue
            if name == "BMP" and head[6:10] != b"\x00\x00\x00\x00":
                continue
            return name
    return None


def sniff_images(uris: Sequence[str]) -> dict[str, str | None]:
    """uri -> image format from the file's first bytes, or None (not an image, unreadable).

    One ranged read per file, fetched concurrently on object stores (fsspec ``cat_ranges``).
    """
    if not uris:
        return {}
    fs, _ = open_filesystem(uris[0])
    paths = [open_filesystem(uri)[1] for uri in uris]
    try:
        heads = fs.cat_ranges(paths, [0] * len(paths), [MAGIC_BYTES] * len(paths), on_error="return")
    except Exception:  # noqa: BLE001 - then one by one
        heads = [_head(fs, path) for path in paths]
    return {uri: sniff_image_format(head) if isinstance(head, bytes) else None for uri, head in zip(uris, heads)}


def _head(fs, path: str) -> bytes | Exception:
    try:
        with fs.open(path, "rb") as handle:
            return handle.read(MAGIC_BYTES)
    except Exception as error:  # noqa: BLE001
        return error


def _walk_local(root: str) -> list[str]:
    """Every file under a local directory, recursively (symlinks followed as fsspec does).

    ``os.scandir`` reads entry types from the directory itself: no ``stat``
    per file and no info dict per file as ``fsspec``'s ``find`` builds, which
    made listing a million files take 22 s and ~1 GB here
    (benchmarks/resume_plan.py).
    """
    files, pending = [], [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir():
                    pending.append(entry.path)
                else:
                    files.append(entry.path)
    return files


def _relative_files(uri: str, exclude: str | None) -> tuple[list[str], list[str], bool]:
    """(URIs of every file under ``uri``, recursively; of the hidden ones among them; whether
    ``uri`` is itself a file)."""
    fs, root = open_filesystem(uri)
    fs.invalidate_cache()  # other processes may have written since this process last listed
    try:
        if is_remote(uri):
            check_credential_variables()
        if fs.isfile(root):
            return [uri], [], True
        exists = fs.exists(root)
        if exists and not is_remote(uri):
            paths = _walk_local(root.rstrip("/"))
        else:
            paths = fs.find(root.rstrip("/"), detail=False) if exists else []
    except Exception as error:  # noqa: BLE001 - storage errors (credentials, network) are the user's to fix
        raise InputError(f"cannot list {uri}: {_describe_exception(error)}") from None
    if not exists:
        raise InputError(f"input {uri!r} does not exist")
    excluded = None
    if exclude is not None:
        exclude_fs, exclude_root = open_filesystem(exclude)
        if type(exclude_fs) is type(fs):
            excluded = exclude_root.rstrip("/") + "/"
    root = root.rstrip("/")
    found, hidden = [], []
    for path in paths:
        if excluded is not None and (path + "/").startswith(excluded):
            continue
        relative = path[len(root):].lstrip("/") if path.startswith(root) else path
        # Hidden files and directories (".DS_Store", ".ipynb_checkpoints/") are never inputs.
        is_hidden = relative.startswith(".") or "/." in relative
        (hidden if is_hidden else found).append(join_uri(uri, relative))
    return found, hidden, False


def _skip_reason(uri: str, format: str) -> str:
    ext = extension(uri)
    if not ext:
        if format != "images":
            return "no file extension"
        return "no file extension, and its first bytes are not those of an image"
    if format == "webdataset":
        return f"not a .tar shard ({ext} file: img2dataset writes .parquet and _stats.json beside its shards)"
    if ext in PARQUET_EXTENSIONS and format == "images":
        return "a Parquet file among image files (choose with --format)"
    if ext in IMAGE_EXTENSIONS and format == "parquet":
        return "an image file among Parquet files (choose with --format)"
    return f"not an input kind ({ext} file)"


def list_inputs(uri: str, format: str = "auto", *, exclude: str | None = None) -> InputListing:
    """Find the inputs under ``uri`` (a file, a directory, or an ``s3://`` prefix; recursive).

    Args:
        uri: where the inputs are.
        format: ``"images"`` (files with an image extension), ``"parquet"``,
            ``"webdataset"`` (``.tar`` shards, :mod:`diffcut.job.webdataset`), or
            ``"auto"``: whichever kind is present (two kinds present is an error;
            img2dataset's ``.parquet`` / ``_stats.json`` files beside the ``.tar``
            shards of the same name are not inputs).
        exclude: a location never listed (the job's output, if it lies inside
            the input).
    """
    if format not in INPUT_FORMATS:
        raise InputError(f"unknown input format {format!r}; use one of {', '.join(INPUT_FORMATS)}")
    uri = check_uri(uri)
    found, hidden, single_file = _relative_files(uri, exclude)
    from diffcut.job import webdataset

    by_kind: dict[str, list[str]] = {"images": [], "parquet": [], "webdataset": [], "none": [], "other": []}
    for f in found:  # one pass, one extension() per file: a listing can hold millions
        ext = extension(f)
        kind = ("images" if ext in IMAGE_EXTENSIONS else "parquet" if ext in PARQUET_EXTENSIONS
                else "webdataset" if ext in webdataset.SHARD_EXTENSIONS else "other" if ext else "none")
        by_kind[kind].append(f)
    images, parquet, shards = by_kind["images"], by_kind["parquet"], by_kind["webdataset"]
    if format == "auto" and shards:
        sidecars = set(webdataset.sidecar_files(shards, parquet))
        others = images or [f for f in parquet if f not in sidecars]
        if others:
            raise InputError(
                f"{uri!r} holds both .tar shards ({len(shards)}) and other inputs ({others[0]}...); "
                "choose one with --format webdataset, --format images or --format parquet"
            )
        format = "webdataset"
    if format == "auto":
        if images and parquet:
            raise InputError(
                f"{uri!r} holds both image files ({len(images)}) and Parquet files ({len(parquet)}); "
                "choose one with --format images or --format parquet"
            )
        format = "parquet" if parquet else "images"
    if format == "images" and not single_file:
        # Content-addressed stores name files by hash alone: those are images when their bytes say so.
        sniffed = sniff_images(by_kind["none"])
        images += [f for f, kind in sniffed.items() if kind is not None]
    files = {"parquet": parquet, "webdataset": shards}.get(format, images)
    if single_file and not files:
        files = list(found)  # an explicitly named file is used whatever its extension
    if not files:
        kinds = {"parquet": "Parquet files", "webdataset": ".tar shards"}.get(
            format, f"image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        raise InputError(f"no {kinds} found under {uri!r}")
    if len(files) == len(found):
        skipped = [(f, "hidden file") for f in hidden]
    else:
        chosen = set(files)
        skipped = [(f, None) for f in found if f not in chosen] + [(f, "hidden file") for f in hidden]
    skipped.sort()
    named = [{"path": f, "reason": reason or _skip_reason(f, format)} for f, reason in skipped[:SKIPPED_NAMED]]
    return InputListing(format=format, files=sorted(files), skipped=len(skipped), skipped_named=named)


# =========================================================================== planning
#: Arrow schema of a read unit: one image file, or the pending rows of one Parquet row group.
UNIT_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string()),  # "file" or "parquet"
        pa.field("path", pa.string()),  # URI of the file
        pa.field("row_group", pa.int32()),  # Parquet only
        pa.field("rows", pa.list_(pa.int64())),  # Parquet: row indices within the row group
        pa.field("image_ids", pa.list_(pa.string())),
        pa.field("sources", pa.list_(pa.string())),
        pa.field("errors", pa.list_(pa.string())),  # known before reading (null id, duplicate id)
    ]
)


@dataclass
class Plan:
    """The work of one run: read units plus counts for the summary."""

    units: pa.Table
    listed: int | None  # input records found (None: only known once read, WebDataset shards)
    already_done: int  # records with a row in the output already (skipped)
    planned: int | None  # records this run will process (None: as for ``listed``)
    skipped_files: int = 0


def plan_image_files(files: Sequence[str], done: set[str] | frozenset = frozenset(), limit: int | None = None) -> Plan:
    """One read unit per image file not yet done; ``image_id`` = ``source`` = the file's URI."""
    pending = [uri for uri in files if uri not in done]
    if limit is not None:
        pending = pending[: max(0, int(limit))]
    units = pa.Table.from_pydict(
        {
            "kind": ["file"] * len(pending),
            "path": pending,
            "row_group": [None] * len(pending),
            "rows": [[0]] * len(pending),
            "image_ids": [[uri] for uri in pending],
            "sources": [[uri] for uri in pending],
            "errors": [[None]] * len(pending),
        },
        schema=UNIT_SCHEMA,
    )
    return Plan(units=units, listed=len(files), already_done=sum(uri in done for uri in files), planned=len(pending))


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
    image_column: str = "image",
    id_column: str | None = None,
    done: set[str] | frozenset = frozenset(),
    limit: int | None = None,
) -> Plan:
    """One read unit per Parquet row group that still has rows to do.

    Reads only footers and, with ``id_column``, that one column. Every row
    gets ``source = file#row=N``; ``image_id`` is the id column's value (as a
    string) or the source. A null id, an id already used by an earlier row
    (in file order), or an img2dataset ``status`` other than ``success``
    (:func:`diffcut.job.webdataset.img2dataset_status_errors`) is recorded as that
    row's error, so each input row still gives exactly one output row.
    """
    import pyarrow.parquet as pq

    from diffcut.job.webdataset import img2dataset_status_errors

    first_use: dict[str, str] = {}
    columns: dict[str, list] = {name: [] for name in UNIT_SCHEMA.names}
    listed = already_done = planned = 0
    remaining = None if limit is None else max(0, int(limit))
    for file_uri in files:
        fs, path = open_filesystem(file_uri)
        try:
            with fs.open(path, "rb") as handle:
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
                    parquet.schema_arrow, lambda names: parquet.read(columns=names, use_threads=False))
                group_sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 - an unreadable input file is a user-facing problem
            raise InputError(f"cannot read Parquet file {file_uri}: {redact(error)}") from error
        start = 0
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
                if source in done:
                    already_done += 1
                    continue
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
                columns["row_group"].append(group)
                columns["rows"].append(rows)
                columns["image_ids"].append(image_ids)
                columns["sources"].append(sources)
                columns["errors"].append(errors)
    units = pa.Table.from_pydict(columns, schema=UNIT_SCHEMA)
    return Plan(units=units, listed=listed, already_done=already_done, planned=planned)


def plan_inputs(listing: InputListing, *, image_column: str = "image", id_column: str | None = None,
                done: set[str] | frozenset = frozenset(), limit: int | None = None) -> Plan:
    """The plan for what :func:`list_inputs` found, by its format (``limit`` does not apply to
    WebDataset shards: their records are only known once read)."""
    if listing.format == "parquet":
        plan = plan_parquet(listing.files, image_column=image_column, id_column=id_column, done=done, limit=limit)
    elif listing.format == "webdataset":
        from diffcut.job.webdataset import plan_shards

        plan = plan_shards(listing.files, done=done)
    else:
        plan = plan_image_files(listing.files, done=done, limit=limit)
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


def _struct_bytes(value) -> bytes | None:
    return None if value is None else value.get("bytes")


def read_units(units: Iterable[Mapping], *, image_column: str = "image",
               keep_metadata: bool = False) -> Iterator[RawRecord]:
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
    if file_units:
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

            yield from read_shard_unit(unit, keep_metadata=keep_metadata)
            continue
        preset = unit["errors"]
        if unit["kind"] == "file":
            value = fetched[unit["path"]]
            data, error = (value, None) if isinstance(value, bytes) else (None, f"cannot read the file: {_describe_exception(value)}")
            yield RawRecord(unit["image_ids"][0], unit["sources"][0], data, preset[0] or error)
            continue
        try:
            fs, path = open_filesystem(unit["path"])
            with fs.open(path, "rb") as handle:
                table = pq.ParquetFile(handle).read_row_group(unit["row_group"], columns=[image_column])
            column = table.column(image_column).combine_chunks()
            values = column.take(pa.array(unit["rows"], pa.int64())).to_pylist()
            failure = None
        except Exception as error:  # noqa: BLE001
            values, failure = [None] * len(unit["rows"]), f"cannot read the Parquet row group: {_describe_exception(error)}"
        for image_id, source, error, value in zip(unit["image_ids"], unit["sources"], preset, values):
            if isinstance(value, dict):
                value = _struct_bytes(value)
            if error is None and failure is None and value is None:
                error = f"the image column {image_column!r} is null in this row (no image bytes)"
            yield RawRecord(image_id, source, value, error or failure)


def _describe_exception(error: BaseException) -> str:
    message = str(error) or type(error).__name__
    if isinstance(error, FileNotFoundError):
        message = f"file not found ({message})"
    return redact(message)


# =========================================================================== sizes
def bucket_size(width: int, height: int, resolution: int, stride: int = DEFAULT_STRIDE) -> tuple[int, int]:
    """Aspect-preserving model input size of about ``resolution**2`` pixels, sides multiples of ``stride``.

    The width is the multiple of ``stride`` nearest to
    ``sqrt(resolution**2 * width / height)`` and the height follows from the
    area, so every aspect ratio maps to one of a fixed set of buckets (one per
    width) and images of one bucket batch together. No side exceeds
    ``resolution**2 / stride``, which keeps the feature grid at about
    ``(resolution / stride)**2`` cells even for extreme panoramas.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    area = resolution * resolution
    longest = max(stride, (area // stride) // stride * stride)
    bucket_width = round(math.sqrt(area * width / height) / stride) * stride
    bucket_width = min(longest, max(stride, bucket_width))
    bucket_height = min(longest, max(stride, round(area / bucket_width / stride) * stride))
    return int(bucket_width), int(bucket_height)


def model_size(width: int, height: int, resolution: int, resize: str = "bucket",
               stride: int = DEFAULT_STRIDE) -> tuple[int, int]:
    """(width, height) the model sees for a ``width`` x ``height`` image.

    ``square``: resolution x resolution, as in the paper (1024 x 1024).
    ``bucket``: :func:`bucket_size`.
    """
    if resize == "square":
        return int(resolution), int(resolution)
    if resize == "bucket":
        return bucket_size(width, height, resolution, stride)
    raise InputError(f"unknown resize mode {resize!r}; use one of {', '.join(RESIZE_MODES)}")


def check_resolution(resolution: int, stride: int = DEFAULT_STRIDE) -> None:
    if int(resolution) < stride or int(resolution) % stride:
        raise InputError(f"--resolution must be a positive multiple of the model stride {stride}; got {resolution}")


@dataclass(frozen=True)
class MaskSize:
    """Size of the output label map: ``original`` (the image's own size), ``model``
    (the model input size), ``N`` (longest side N, aspect kept) or ``WxH``."""

    kind: str
    width: int | None = None
    height: int | None = None

    @classmethod
    def parse(cls, text: "str | int | MaskSize") -> "MaskSize":
        if isinstance(text, MaskSize):
            return text
        value = str(text).strip().lower()
        if value in ("original", "model"):
            return cls(value)
        match = re.fullmatch(r"(\d+)\s*[x,]\s*(\d+)", value)
        if match:
            width, height = int(match.group(1)), int(match.group(2))
            if width > 0 and height > 0:
                return cls("fixed", width, height)
        if value.isdigit() and int(value) > 0:
            return cls("longest", int(value), int(value))
        raise InputError(f"--mask-size must be 'original', 'model', a longest side N, or WxH; got {text!r}")

    def resolve(self, image_size: tuple[int, int], model_input_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the mask for an image of ``image_size`` run at ``model_input_size``."""
        if self.kind == "original":
            return tuple(image_size)
        if self.kind == "model":
            return tuple(model_input_size)
        if self.kind == "fixed":
            return self.width, self.height
        width, height = image_size
        scale = self.width / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def __str__(self) -> str:
        if self.kind in ("original", "model"):
            return self.kind
        if self.kind == "fixed":
            return f"{self.width}x{self.height}"
        return str(self.width)


# =========================================================================== decoding
@dataclass
class DecodedImage:
    """An image ready for the model: ``pixels`` (h, w, 3) uint8 RGB at the requested
    size; ``width`` x ``height`` the image's own size after EXIF orientation."""

    pixels: np.ndarray
    width: int
    height: int


_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def _describe_bytes(data: bytes) -> str:
    head = data[:8]
    text = head.decode("ascii", "replace") if all(32 <= b < 127 for b in head) else head.hex(" ")
    return f"{len(data):,} bytes starting with {text!r}"


def _open(data: bytes | None, max_pixels: int):
    """Open ``data`` lazily (header only) after the emptiness and size checks."""
    from PIL import Image, UnidentifiedImageError

    if data is None:
        raise ImageDecodeError("no image bytes")
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    # PIL refuses images over 2 * MAX_IMAGE_PIXELS on its own; make room when the
    # configured limit is higher, the check below is the one that applies.
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        # PIL's own guard (at 2 * Image.MAX_IMAGE_PIXELS) fired first; same verdict, our wording.
        declared = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(declared.group(1)):,} pixels" if declared else "too many pixels"
        raise ImageDecodeError(
            f"the image declares {size}, more than the limit of {min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS):,} "
            "(--max-image-pixels); refused without decoding it (decompression-bomb guard)"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image in a format PIL can read ({_describe_bytes(data)})") from None
    except Exception as error:  # noqa: BLE001 - any header failure is a bad input
        raise ImageDecodeError(f"cannot read the image header: {error}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"the image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the {image.format} image declares {width}x{height} = {width * height:,} pixels, more than the limit "
            f"of {max_pixels:,} (--max-image-pixels); refused without decoding it (decompression-bomb guard)"
        )
    return image


def _orientation(image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: treat as upright
        return 1


def to_rgb(image):
    """Any PIL image -> 8-bit RGB.

    16-bit and 32-bit grayscale are scaled (not clipped) to 8 bits; images
    with transparency are composited over white (transparent backgrounds are
    usually meant to be shown on white); CMYK, palette, YCbCr, 1-bit convert
    with PIL's conversions.
    """
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        levels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        levels = np.asarray(image, dtype=np.float64)
        levels = levels * 255.0 if np.nanmax(levels, initial=0.0) <= 1.0 else levels
        image = Image.fromarray(np.clip(np.nan_to_num(np.rint(levels)), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except Exception as error:  # noqa: BLE001
        raise ImageDecodeError(f"unsupported colour mode {image.mode!r}: {error}") from None


def upright_size(data: bytes | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an encoded image after EXIF orientation, from its header only.

    Nothing is decoded, so it costs microseconds; the job uses it to order a
    batch of images by model input size before decoding them.

    Raises:
        ImageDecodeError: as :func:`decode_image` would for an empty, unknown
            or too large image.
    """
    image = _open(data, max_pixels)
    width, height = image.size
    return (height, width) if _orientation(image) in _SWAPS_AXES else (width, height)


SizeRule = Callable[[int, int], tuple[int, int]]


def decode_image(data: bytes | None, size: tuple[int, int] | SizeRule | None = None, *,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode untrusted image bytes to an RGB array of the wanted size.

    Args:
        data: the encoded image (JPEG, PNG, WebP, BMP, TIFF, GIF...).
        size: output (width, height), or a function of the upright image's
            (width, height) returning it (e.g. ``lambda w, h: model_size(w, h, 1024)``);
            None keeps the image's size. Resizing is bilinear.
        max_pixels: images declaring more pixels are refused before decoding.

    Raises:
        ImageDecodeError: with a message for a person (empty, not an image,
            truncated, too large, unsupported mode).
    """
    from PIL import Image, ImageOps

    image = _open(data, max_pixels)
    raw_width, raw_height = image.size
    swapped = _orientation(image) in _SWAPS_AXES
    width, height = (raw_height, raw_width) if swapped else (raw_width, raw_height)
    target = size(width, height) if callable(size) else (tuple(size) if size is not None else (width, height))
    target = (int(target[0]), int(target[1]))
    try:
        if image.format == "JPEG" and target[0] < width and target[1] < height:
            # Decode at a reduced DCT scale (1/2, 1/4, 1/8) that is still at least
            # the target size: a 8000x6000 photo never exists at full size in memory.
            image.draft(None, (target[1], target[0]) if swapped else target)
        image.seek(0)  # animated GIF/PNG/WebP, multi-page TIFF: the first frame
        image.load()
    except ImageDecodeError:
        raise
    except Exception as error:  # noqa: BLE001
        raise ImageDecodeError(f"the image data is truncated or corrupt ({error})") from None
    try:
        upright = ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not lose the image
        upright = image
    rgb = to_rgb(upright)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.uint8)
    if pixels.shape != (target[1], target[0], 3):
        raise ImageDecodeError(f"decoding gave an array of shape {pixels.shape}, expected {(target[1], target[0], 3)}")
    return DecodedImage(pixels=pixels, width=width, height=height)
