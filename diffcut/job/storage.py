"""Where the job's bytes live: local paths and ``s3://`` URIs, and keeping secrets out of messages.

Local paths and ``s3://`` URIs go through fsspec (s3fs). S3 credentials come
only from the standard AWS settings -- environment variables, shared
config/credentials profiles, instance or pod roles -- and ``AWS_ENDPOINT_URL``
selects an S3-compatible store. URIs that carry credentials are refused, and
:func:`redact` strips secret values from any message that might be logged or
written. Plain Python, no Ray.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from urllib.parse import unquote_to_bytes, urlsplit


class InputError(ValueError):
    """A problem with the job's inputs or flags that a person has to fix (the job exits 2)."""


class OutputError(InputError):
    """A problem with the job's output (missing bucket, not writable, full, in use) that a person has to fix."""


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
        uri = uri[len("file://") :] if uri.startswith("file://") else uri[len("file:") :]
        # RFC 8089: percent-escapes stand for the path's bytes (how diffcut.job.boundary keeps non-UTF-8 names).
        return os.path.normpath(os.fsdecode(unquote_to_bytes(uri)))
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


def check_credential_variables(uri: str | None = None, flag: str = "location") -> None:
    """Refuse credentials in the environment that no request can carry (a newline from a copy-paste),
    for an S3 ``uri`` (given as ``flag``; any location when None).

    botocore refuses such a header with an HTTPClientError, which botocore's and
    s3fs's retries treat as a connection error and retry for minutes
    (:data:`S3_RETRIES` x ``S3FileSystem.retries``); failing here says what is wrong at once.
    The value is never echoed.
    """
    if uri is not None and urlsplit(uri).scheme not in ("s3", "s3a"):
        return
    for name in CREDENTIAL_VARIABLES:
        value = os.environ.get(name)
        if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            where = f"{flag} {uri}: " if uri is not None else ""
            raise InputError(
                f"{where}the environment variable {name} holds a control character (a newline "
                "from a copy-paste?): no S3 request can carry it; set it again without it"
            )


def storage_options(uri: str) -> dict:
    """fsspec options for ``uri``: :data:`S3_RETRIES` for ``s3://``, unless the AWS settings
    (``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS``) choose a retry policy themselves.

    s3fs adds its own retries on top (``S3FileSystem.retries``, 5 attempts): for errors botocore
    does not retry, a response body cut off mid-read above all.
    """
    if urlsplit(uri).scheme in ("s3", "s3a") and not (
        os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")
    ):
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


def describe_exception(error: BaseException) -> str:
    """A one-line, redacted message for a failed read (the row's ``error``)."""
    message = str(error) or type(error).__name__
    if isinstance(error, FileNotFoundError):
        message = f"file not found ({message})"
    return redact(message)


#: errno values of a write the output refused: full, over quota, read-only, denied.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def write_failure(error: BaseException, output: str) -> str | None:
    """One line for a pipeline that failed writing the output (full, read-only, denied); None for other errors."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in OUTPUT_ERRNOS:
            reason = os.strerror(current.errno).lower()
            break
        pending += [getattr(current, "cause", None), current.__cause__, current.__context__]
    else:
        text = str(error)
        # A full disk named only in the message (an error that crossed processes as text).
        reason = next((os.strerror(n).lower() for n in (errno.ENOSPC, errno.EDQUOT) if os.strerror(n) in text), None)
        if reason is None:
            return None
    return (
        f"writing to --output {output} failed: {reason}; the units recorded so far are kept: make room (or "
        "fix the output) and run the same command to resume"
    )
