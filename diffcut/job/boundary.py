"""The input boundary: which local files the job reads, how it opens them, and how their names are kept.

* **Canonical roots.** A local input is resolved once (``os.path.realpath``, then relative to
  the working directory when below it, :func:`canonical_root`): ``data``, ``./data/``,
  ``/abs/data`` and a symlinked alias of the folder are the same dataset, with the same
  ``source`` values, so a rerun in any spelling labels nothing twice.
* **What is read.** Only regular files that lie inside the root. The listing
  (:func:`walk`) never follows a symbolic link (one leading outside the root is never
  opened; one inside is not needed: its target is listed under its own path) and
  never opens a FIFO, socket or device; each is named with its reason.
* **Opening** (:func:`open_local`, in the read tasks, after the listing) checks again:
  ``O_NOFOLLOW`` (a link put in the file's place is refused), ``O_NONBLOCK`` (a FIFO
  cannot block the open), ``fstat`` (only a regular file is read), and the opened
  file's own path must be the listed one (a folder swapped for a link is refused).
* **Names.** Arrow strings are UTF-8; a name that is not (Latin-1 bytes from an old
  camera) is kept losslessly: a local path as a ``file://`` URI with RFC 3986
  percent-escapes of its bytes (:func:`path_text`; no other local source starts with
  ``file:``, so no real name gives that text), a tar member's key with ``%XX`` for
  each byte that is not UTF-8 (:func:`name_text`).

Plain Python on the local filesystem (no Ray).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from urllib.parse import quote

from diffcut.job.storage import check_uri, is_remote, open_filesystem

#: What a file of each non-regular type is called in a message.
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a symbolic link"),
)


def file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


# =========================================================================== names
def path_text(path: str) -> str:
    """The text of a local path: itself when its name is UTF-8, else ``file://`` (``file:`` for a relative
    path) + its percent-escaped bytes. No plain path text starts with ``file:`` (:func:`canonical_root`).

    ``path`` comes from the OS as ``str`` with undecodable bytes as lone surrogates
    (``surrogateescape``); :func:`diffcut.job.storage.check_uri` turns the ``file://``
    text back into that path.
    """
    if path.isascii():
        return path
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:  # file:///abs or file:relative (RFC 8089's form, and its relative twin)
        return ("file://" if path.startswith("/") else "file:") + quote(os.fsencode(path), safe="/")


def name_text(name: str) -> str:
    """A name read as UTF-8 with ``surrogateescape`` (a tar member's), each undecodable byte as ``%XX``."""
    if name.isascii():
        return name
    return "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in name)


def local_path(text: str) -> str:
    """The local path of a listed file's text (:func:`path_text` reversed)."""
    return check_uri(text)


_BYTES_LITERAL = re.compile(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"")


def describe_error(error: BaseException) -> str:
    """An exception from a decoder or archive reader as one line, with any bytes it quotes from the file
    left out (``broken PNG file (chunk b'...')``, ``Not a gzipped file (b'..')``): never a file's content."""
    message = _BYTES_LITERAL.sub("<bytes>", str(error) or type(error).__name__)
    return name_text(" ".join(message.split())[:300])


# =========================================================================== roots and listing
def canonical_root(path: str) -> str:
    """The one spelling of a local input: its real path (every symbolic link, ``.`` and ``..``
    resolved), relative to the real working directory when it lies below it.

    Relative there, an output made in a repository (the bundled example labels) or in a
    ``ray job submit --working-dir`` copy keeps naming its files when the folder moves; every
    spelling of the input from that directory is still the same text.
    """
    real = os.path.realpath(path)
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the working directory was deleted: no relative spelling
        return real
    relative = os.path.relpath(real, cwd) if cwd != "/" and inside(real, cwd) else real
    return real if relative.startswith("file:") else relative  # text of that form is an escaped name


def shown_path(path: str, real_root: str, root: str) -> str:
    """``path``, found under the real directory ``real_root``, as seen from the canonical ``root``."""
    return path[len(real_root) + 1 :] if root == "." else root + path[len(real_root) :]


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def walk(root: str, excluded: str | None = None, refused: list | None = None) -> Iterator[list[str]]:
    """The regular files under the real directory ``root``, recursively: one list per directory, so that a
    caller can keep a million names compactly (not as Python strings all at once); every
    (path, why not read) of a link, special file or unlistable folder is appended to ``refused``.

    ``os.scandir`` gives each entry's type from the directory itself: no ``stat`` per
    regular file; only the rare link or special file costs one. ``excluded``: a real folder
    never listed (the output). A folder below ``root`` that cannot be listed is named, not fatal;
    ``root`` itself raises ``OSError``.
    """
    refused = [] if refused is None else refused
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = os.scandir(directory)
        except OSError as error:
            if directory == root:
                raise
            refused.append((directory, f"a folder that cannot be listed ({error.strerror or error})"))
            continue
        files, folders = [], []
        with entries:
            # In name order, folders deepest-first from the stack's end: where every folder holds either files
            # or folders, the files come out in the order of their paths (the listing then need not sort them).
            for entry in sorted(entries, key=lambda entry: entry.name):
                if entry.is_dir(follow_symlinks=False):
                    if entry.path != excluded:
                        folders.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    files.append(entry.path)
                elif entry.is_symlink():
                    refused.append((entry.path, _link_reason(entry.path, root)))
                else:
                    kind = file_kind(entry.stat(follow_symlinks=False).st_mode)
                    refused.append((entry.path, f"{kind}, not a regular file: never opened"))
        pending.extend(reversed(folders))
        if files:
            yield files


def _link_reason(path: str, root: str) -> str:
    if not os.path.exists(path):  # follows the link: False when it dangles or loops
        return "a broken symbolic link (its target does not exist, or it loops): not followed"
    target = os.path.realpath(path)
    if not inside(target, root):
        return "a symbolic link to a place outside the input: not followed, never opened"
    relative = os.path.relpath(target, root)
    return (
        f"a symbolic link to {path_text(relative)!r} inside the input: not followed (the target is read under "
        "its own path)"
    )


# =========================================================================== opening
class NotReadable(OSError):
    """A listed file that must not be read (no longer a regular file, or no longer where it was)."""


def open_local(text: str):
    """Open a listed local file for reading, refusing anything but the regular file it was (see the module docstring).

    Returns a binary file object. Raises :class:`NotReadable` or ``OSError``.
    """
    path = local_path(text)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if os.path.islink(path):
            raise NotReadable(f"{path_text(path)} is now a symbolic link: not followed") from None
        raise NotReadable(f"{path_text(path)}: {error.strerror or error}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotReadable(f"{path_text(path)} is {file_kind(mode)}, not a regular file: not read")
        opened = _opened_path(fd)
        if opened is not None and opened != os.path.abspath(path):
            raise NotReadable(f"{path_text(path)} now resolves to another place: not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int) -> str | None:
    """The real path of an open file (Linux ``/proc``), None where the OS does not tell."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def read_local(text: str) -> bytes:
    with open_local(text) as handle:
        return handle.read()


def open_input(uri: str):
    """A listed input file opened for reading: a local one by :func:`open_local`, a remote one by fsspec."""
    if is_remote(uri):
        fs, path = open_filesystem(uri)
        return fs.open(path, "rb")
    return open_local(uri)
