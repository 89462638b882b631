"""Inputs of the labeling job: what is under an input URI, and the job's input API in one place.

:func:`list_inputs` finds image files (recursive, by extension), Parquet files
or WebDataset shards under a URI, sniffing image files whose extension is
missing. The rest of the input side lives beside it and is re-exported here, so
``from diffcut.job import inputs`` gives the whole of it:

* :mod:`diffcut.job.storage` -- filesystems (local, ``s3://``), URIs, redacting secrets;
* :mod:`diffcut.job.plan` -- read units (what a run still has to do) and reading their bytes;
* :mod:`diffcut.job.images` -- robust decoding of untrusted image bytes and the model's input size.

Everything here is plain Python on bytes, arrays and Arrow tables (no Ray), so
the labeling job's stages and the single-process tools share one
implementation.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from diffcut.job import boundary
from diffcut.job.images import (  # noqa: F401 (re-exported)
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_STRIDE,
    RESIZE_MODES,
    DecodedImage,
    ImageDecodeError,
    MaskSize,
    SizeRule,
    bucket_size,
    check_resolution,
    decode_image,
    model_size,
    to_rgb,
    upright_size,
)
from diffcut.job.storage import (  # noqa: F401 (re-exported)
    CREDENTIAL_VARIABLES,
    InputError,
    arrow_filesystem,
    check_credential_variables,
    check_uri,
    describe_exception,
    is_remote,
    join_uri,
    open_filesystem,
    redact,
    secret_values,
    storage_options,
)

#: Extensions listed as images (compared case-insensitively).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
PARQUET_EXTENSIONS = frozenset({".parquet"})
INPUT_FORMATS = ("auto", "images", "parquet", "webdataset")


# =========================================================================== listing
def extension(path: str) -> str:
    """``".jpg"`` for ``a/b.JPG``; ``""`` without one (``a/3f9a``, ``a/.hidden``), as ``posixpath.splitext``."""
    name = path[path.rfind("/") + 1 :]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 and name[:dot].strip(".") else ""


#: How many skipped files the job's summary names (their total is always given).
SKIPPED_NAMED = 100

#: Leading bytes of the image formats of IMAGE_EXTENSIONS (WebP: "RIFF", 4 size bytes, "WEBP").
IMAGE_MAGIC = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "BMP": (b"BM",),
    "WEBP": (b"RIFF",),
}
MAGIC_BYTES = 16


@dataclass
class InputListing:
    """What :func:`list_inputs` found.

    format: ``"images"``, ``"parquet"`` or ``"webdataset"``; paths: their URIs, sorted (``files``: as a list);
    skipped: how many files under the input are not inputs (hidden files,
    ``.txt``, files without an extension that are not images, img2dataset's
    sidecars of the shards, symbolic links, FIFOs...); skipped_named: the first
    :data:`SKIPPED_NAMED` of them (sorted), each ``{"path": uri, "reason": why}``.
    """

    format: str
    paths: pa.ChunkedArray  # the files' URIs (strings), sorted: compact, for listings of millions
    skipped: int = 0
    skipped_named: list[dict] = field(default_factory=list)
    root: str = ""  # the input's canonical spelling (:func:`canonical_input`)

    @property
    def files(self) -> list[str]:
        """The files' URIs as a list (a copy of :attr:`paths`: for the few units of Parquet and WebDataset inputs)."""
        return self.paths.to_pylist()


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

    One ranged read per file, fetched concurrently on object stores (fsspec ``cat_ranges``);
    local files are opened as the read tasks open them (:func:`diffcut.job.boundary.open_local`).
    """
    if not uris:
        return {}
    if not is_remote(uris[0]):
        return {
            uri: sniff_image_format(head) if isinstance(head, bytes) else None
            for uri, head in ((uri, _local_head(uri)) for uri in uris)
        }
    fs, _ = open_filesystem(uris[0])
    paths = [open_filesystem(uri)[1] for uri in uris]
    try:
        heads = fs.cat_ranges(paths, [0] * len(paths), [MAGIC_BYTES] * len(paths), on_error="return")
    except Exception:  # noqa: BLE001 - then one by one
        heads = [_head(fs, path) for path in paths]
    return {uri: sniff_image_format(head) if isinstance(head, bytes) else None for uri, head in zip(uris, heads)}


def _local_head(uri: str) -> bytes | None:
    try:
        with boundary.open_local(uri) as handle:
            return handle.read(MAGIC_BYTES)
    except OSError:
        return None


def _head(fs, path: str) -> bytes | Exception:
    try:
        with fs.open(path, "rb") as handle:
            return handle.read(MAGIC_BYTES)
    except Exception as error:  # noqa: BLE001
        return error


def _hidden(relative: str) -> bool:
    # Hidden files and directories (".DS_Store", ".ipynb_checkpoints/") are never inputs.
    return relative.startswith(".") or "/." in relative


@dataclass
class _Found:
    """Every file under an input: ``chunks`` yields the visible ones a folder at a time (a local walk is
    streamed: the caller keeps them compactly), ``hidden`` and ``refused`` fill as it is consumed."""

    chunks: Iterable[list[str]]
    hidden: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    single_file: bool = False


def _local_files(shown: str, exclude: str | None) -> _Found:
    """As :func:`_relative_files` for the canonical local path ``shown`` (``boundary.canonical_root``)."""
    root = os.path.realpath(shown)
    try:
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        raise InputError(f"input {boundary.path_text(shown)!r} does not exist") from None
    except OSError as error:
        raise InputError(f"cannot list {boundary.path_text(shown)}: {error.strerror or error}") from None
    if stat.S_ISREG(mode):
        return _Found([[boundary.path_text(shown)]], single_file=True)
    if not stat.S_ISDIR(mode):
        raise InputError(
            f"input {boundary.path_text(shown)!r} is {boundary.file_kind(mode)}: give a folder or a regular file"
        )
    excluded = None
    if exclude is not None and not is_remote(exclude):
        excluded = os.path.realpath(check_uri(exclude))
    if excluded is not None and boundary.inside(root, excluded):
        return _Found([])  # the input lies inside the output: nothing in it is an input
    found = _Found([])
    walked: list[tuple[str, str]] = []
    prefix = len(root.rstrip("/")) + 1

    # The walked path is the shown one when the input is its own real path: no second copy of every name.
    def text(path: str) -> str:
        return boundary.path_text(path if shown == root else boundary.shown_path(path, root, shown))

    def chunks() -> Iterator[list[str]]:
        try:
            for paths in boundary.walk(root, excluded, walked):
                visible = []
                for path in paths:
                    if _hidden(path[prefix:]):
                        found.hidden.append(text(path))
                    else:
                        visible.append(text(path))
                yield visible
        except OSError as error:
            raise InputError(f"cannot list {boundary.path_text(shown)}: {describe_exception(error)}") from None
        found.refused.extend((text(p), reason) for p, reason in walked)

    found.chunks = chunks()
    return found


def _relative_files(uri: str, exclude: str | None) -> _Found:
    """Every file under ``uri``, recursively (visible ones by folder, hidden ones, and [(URI, why not
    read)] of links and special files), and whether ``uri`` is itself a file. ``uri`` is canonical."""
    if not is_remote(uri):
        return _local_files(boundary.local_path(uri), exclude)
    fs, root = open_filesystem(uri)
    fs.invalidate_cache()  # other processes may have written since this process last listed
    try:
        check_credential_variables()
        if fs.isfile(root):
            return _Found([[uri]], single_file=True)
        exists = fs.exists(root)
        paths = fs.find(root.rstrip("/"), detail=False) if exists else []
    except Exception as error:  # noqa: BLE001 - storage errors (credentials, network) are the user's to fix
        raise InputError(f"cannot list {uri}: {describe_exception(error)}") from None
    if not exists:
        raise InputError(f"input {uri!r} does not exist")
    excluded = None
    if exclude is not None and is_remote(exclude):
        exclude_fs, exclude_root = open_filesystem(exclude)
        if type(exclude_fs) is type(fs):
            excluded = exclude_root.rstrip("/") + "/"
    root = root.rstrip("/")
    visible, hidden = [], []
    for path in paths:
        if excluded is not None and (path + "/").startswith(excluded):
            continue
        relative = path[len(root) :].lstrip("/") if path.startswith(root) else path
        (hidden if _hidden(relative) else visible).append(join_uri(uri, relative))
    return _Found([visible], hidden=hidden)


def canonical_input(uri: str) -> str:
    """The one spelling of an input location: a local one's real path (:mod:`diffcut.job.boundary`), a URI as given."""
    uri = check_uri(uri)
    return uri if is_remote(uri) else boundary.path_text(boundary.canonical_root(boundary.local_path(uri)))


def _skip_reason(uri: str, format: str) -> str:
    ext = extension(uri)
    if not ext:
        if format != "images":
            return "no file extension"
        return "no file extension, and its first bytes are not those of an image"
    if format == "webdataset":
        return (
            f"not a .tar, .tar.gz or .tgz shard ({ext} file: img2dataset writes .parquet and _stats.json "
            "beside its shards)"
        )
    if ext in PARQUET_EXTENSIONS and format == "images":
        return "a Parquet file among image files (choose with --format)"
    if ext in IMAGE_EXTENSIONS and format == "parquet":
        return "an image file among Parquet files (choose with --format)"
    return f"not an input kind ({ext} file)"


def list_inputs(uri: str, format: str = "auto", *, exclude: str | None = None) -> InputListing:
    """Find the inputs under ``uri`` (a file, a directory, or an ``s3://`` prefix; recursive).

    Args:
        uri: where the inputs are; a local one is resolved to its real path first
            (:func:`canonical_input`), which prefixes every listed file.
        format: ``"images"`` (files with an image extension), ``"parquet"``,
            ``"webdataset"`` (``.tar``, ``.tar.gz``, ``.tgz`` shards, :mod:`diffcut.job.webdataset`), or
            ``"auto"``: whichever kind is present (two kinds present is an error;
            img2dataset's ``.parquet`` / ``_stats.json`` files beside the ``.tar``
            shards of the same name are not inputs).
        exclude: a location never listed (the job's output, if it lies inside
            the input).
    """
    if format not in INPUT_FORMATS:
        raise InputError(f"unknown input format {format!r}; use one of {', '.join(INPUT_FORMATS)}")
    uri = canonical_input(uri)
    found = _relative_files(uri, exclude)
    from diffcut.job import webdataset

    # Image files are kept as Arrow strings a folder at a time (a listing can hold millions, docs/scale.md);
    # the other kinds are few (units) and stay lists.
    image_chunks: list[pa.Array] = []
    by_kind: dict[str, list[str]] = {"parquet": [], "webdataset": [], "none": [], "other": []}
    single: list[str] = []
    for chunk in found.chunks:
        images_here = []
        for f in chunk:  # one extension() per file
            ext = extension(f)
            if ext in IMAGE_EXTENSIONS:
                images_here.append(f)
                continue
            kind = (
                "parquet"
                if ext in PARQUET_EXTENSIONS
                else "webdataset"
                if webdataset.is_shard(f, ext)
                else "other"
                if ext
                else "none"
            )
            by_kind[kind].append(f)
        if images_here:
            image_chunks.append(pa.array(images_here, pa.string()))
        if found.single_file:
            single = list(chunk)
    images = pa.chunked_array(image_chunks, pa.string())  # no copy of the names until they are sorted
    del image_chunks
    parquet, shards, none = by_kind["parquet"], by_kind["webdataset"], by_kind["none"]
    if format == "auto" and shards:
        sidecars = set(webdataset.sidecar_files(shards, parquet))
        others = images[:1].to_pylist() or [f for f in parquet if f not in sidecars]
        if others:
            raise InputError(
                f"{uri!r} holds both tar shards ({len(shards)}) and other inputs ({others[0]}...); "
                "choose one with --format webdataset, --format images or --format parquet"
            )
        format = "webdataset"
    if format == "auto":
        if len(images) and parquet:
            raise InputError(
                f"{uri!r} holds both image files ({len(images)}) and Parquet files ({len(parquet)}); "
                "choose one with --format images or --format parquet"
            )
        format = "parquet" if parquet else "images"
    if format == "images" and not found.single_file:
        # Content-addressed stores name files by hash alone: those are images when their bytes say so.
        sniffed = sniff_images(none)
        sniffed_images = pa.array([f for f in none if sniffed[f] is not None], pa.string())
        images = pa.chunked_array([*images.chunks, sniffed_images], pa.string())
        none = [f for f in none if sniffed[f] is None]
    if format == "images":
        files, not_chosen = images, parquet + shards + by_kind["other"] + none
    elif format == "parquet":
        files, not_chosen = pa.array(parquet, pa.string()), shards + images.to_pylist() + by_kind["other"] + none
    else:
        files, not_chosen = pa.array(shards, pa.string()), parquet + images.to_pylist() + by_kind["other"] + none
    if found.single_file and not len(files):
        files, not_chosen = pa.array(single, pa.string()), []  # a file named as the input, whatever its extension
    if not len(files):
        kinds = {"parquet": "Parquet files", "webdataset": ".tar, .tar.gz or .tgz shards"}.get(
            format, f"image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
        raise InputError(f"no {kinds} found under {uri!r}")
    skipped = [(f, "hidden file") for f in found.hidden] + found.refused + [(f, None) for f in not_chosen]
    skipped.sort()
    named = [{"path": f, "reason": reason or _skip_reason(f, format)} for f, reason in skipped[:SKIPPED_NAMED]]
    return InputListing(format=format, paths=_sorted(files), skipped=len(skipped), skipped_named=named, root=uri)


def _sorted(paths: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """``paths`` sorted; a listing walked in order (:func:`diffcut.job.boundary.walk`) is only checked, and
    keeps its chunks (one per folder): no second copy of a million names."""
    paths = paths if isinstance(paths, pa.ChunkedArray) else pa.chunked_array([paths], pa.string())
    if len(paths) > 1 and not pc.all(pc.less_equal(paths[:-1], paths[1:])).as_py():
        paths = pa.chunked_array([paths.combine_chunks().take(pc.sort_indices(paths))], pa.string())
    return paths


# Read units: defined in diffcut.job.plan (imported last: plan imports InputListing from here).
from diffcut.job.plan import (  # noqa: E402,F401
    UNIT_SCHEMA,
    Done,
    Plan,
    RawRecord,
    image_column_kind,
    parquet_source,
    plan_image_files,
    plan_inputs,
    plan_parquet,
    read_units,
)
