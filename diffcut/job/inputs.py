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
from collections.abc import Sequence
from dataclasses import dataclass, field

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

    format: ``"images"``, ``"parquet"`` or ``"webdataset"``; files: their URIs, sorted;
    skipped: how many files under the input are not inputs (hidden files,
    ``.txt``, files without an extension that are not images, img2dataset's
    sidecars of the shards, symbolic links, FIFOs...); skipped_named: the first
    :data:`SKIPPED_NAMED` of them (sorted), each ``{"path": uri, "reason": why}``.
    """

    format: str
    files: list[str]
    skipped: int = 0
    skipped_named: list[dict] = field(default_factory=list)
    root: str = ""  # the input's canonical spelling (:func:`canonical_input`)


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


def _local_files(shown: str, exclude: str | None) -> tuple[list[str], list[str], list[tuple[str, str]], bool]:
    """As :func:`_relative_files` for the canonical local path ``shown`` (``boundary.canonical_root``)."""
    root = os.path.realpath(shown)

    def text(path: str) -> str:
        return boundary.path_text(boundary.shown_path(path, root, shown))

    try:
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        raise InputError(f"input {boundary.path_text(shown)!r} does not exist") from None
    except OSError as error:
        raise InputError(f"cannot list {boundary.path_text(shown)}: {error.strerror or error}") from None
    if stat.S_ISREG(mode):
        return [boundary.path_text(shown)], [], [], True
    if not stat.S_ISDIR(mode):
        raise InputError(
            f"input {boundary.path_text(shown)!r} is {boundary.file_kind(mode)}: give a folder or a regular file"
        )
    excluded = None
    if exclude is not None and not is_remote(exclude):
        excluded = os.path.realpath(check_uri(exclude))
    if excluded is not None and boundary.inside(root, excluded):
        return [], [], [], False  # the input lies inside the output: nothing in it is an input
    try:
        paths, refused = boundary.walk(root, excluded)
    except OSError as error:
        raise InputError(f"cannot list {boundary.path_text(shown)}: {describe_exception(error)}") from None
    prefix = len(root.rstrip("/")) + 1
    visible, hidden = [], []
    for path in paths:
        (hidden if _hidden(path[prefix:]) else visible).append(text(path))
    return visible, hidden, [(text(p), reason) for p, reason in refused], False


def _relative_files(uri: str, exclude: str | None) -> tuple[list[str], list[str], list[tuple[str, str]], bool]:
    """(URIs of every file under ``uri``, recursively; of the hidden ones among them; [(URI, why not
    read)] of links and special files; whether ``uri`` is itself a file). ``uri`` is canonical."""
    if not is_remote(uri):
        return _local_files(boundary.local_path(uri), exclude)
    fs, root = open_filesystem(uri)
    fs.invalidate_cache()  # other processes may have written since this process last listed
    try:
        check_credential_variables()
        if fs.isfile(root):
            return [uri], [], [], True
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
    return visible, hidden, [], False


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
    found, hidden, refused, single_file = _relative_files(uri, exclude)
    from diffcut.job import webdataset

    by_kind: dict[str, list[str]] = {"images": [], "parquet": [], "webdataset": [], "none": [], "other": []}
    for f in found:  # one pass, one extension() per file: a listing can hold millions
        ext = extension(f)
        kind = (
            "images"
            if ext in IMAGE_EXTENSIONS
            else "parquet"
            if ext in PARQUET_EXTENSIONS
            else "webdataset"
            if webdataset.is_shard(f, ext)
            else "other"
            if ext
            else "none"
        )
        by_kind[kind].append(f)
    images, parquet, shards = by_kind["images"], by_kind["parquet"], by_kind["webdataset"]
    if format == "auto" and shards:
        sidecars = set(webdataset.sidecar_files(shards, parquet))
        others = images or [f for f in parquet if f not in sidecars]
        if others:
            raise InputError(
                f"{uri!r} holds both tar shards ({len(shards)}) and other inputs ({others[0]}...); "
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
        kinds = {"parquet": "Parquet files", "webdataset": ".tar, .tar.gz or .tgz shards"}.get(
            format, f"image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
        raise InputError(f"no {kinds} found under {uri!r}")
    skipped = [(f, "hidden file") for f in hidden] + refused
    if len(files) != len(found):
        chosen = set(files)
        skipped += [(f, None) for f in found if f not in chosen]
    skipped.sort()
    named = [{"path": f, "reason": reason or _skip_reason(f, format)} for f, reason in skipped[:SKIPPED_NAMED]]
    return InputListing(format=format, files=sorted(files), skipped=len(skipped), skipped_named=named, root=uri)


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
