"""Untrusted datasets (issue 27, input side; issue 28 item 4, input identity): no damaged file, odd
name or link stops a run, poisons a label or makes the job read outside its input.

The corpus is generated here, with real files: every image format damaged in several ways, links
leaving and staying inside the input, a FIFO, a socket and a device named like images, names that
are not UTF-8 (files and tar members), tar shards with link members, keys repeated across shards and
gzip-compressed shards. The decoder, the listing, the opening and the tar reader are checked
without Ray; one run of the job (tiny model, local Ray) checks the whole path, and its reruns
under other spellings of the input label nothing twice.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import socket
import stat
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from test_webdataset import TINY

from diffcut.job import boundary, inputs, schema
from diffcut.job import webdataset as wds

pytestmark = pytest.mark.timeout(600)

#: Content of a file outside the input that a link points to: it must appear in no row or summary.
SECRET = "TOP-SECRET-CONTENT-4f1c9a"


def _scene(width: int = 80, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    pixels[height // 2 :, : width // 2] = rng.integers(0, 256, 3)
    pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _interlaced_rows(pixels: np.ndarray) -> bytes:
    """The image data of an Adam7-interlaced 8-bit RGB PNG (PIL writes no interlaced PNG)."""
    passes = [pixels[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
    return b"".join(b"\x00" + row.tobytes() for sub in passes if sub.size for row in sub)


def _png(rows: bytes, width: int, height: int, *, end: bool = True, interlaced: bool = False) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, int(interlaced))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + (_chunk(b"IEND", b"") if end else b"")
    )


def intact_images() -> dict[str, bytes]:
    """One valid file per format and variant the job labels today."""
    scene = _scene()
    return {
        "baseline.jpg": _encode(scene, "JPEG", quality=90),
        "progressive.jpg": _encode(scene, "JPEG", progressive=True),
        "plain.png": _encode(scene, "PNG"),
        "interlaced.png": _png(_interlaced_rows(np.asarray(scene)), 80, 64, interlaced=True),
        "palette.png": _encode(scene.convert("P"), "PNG"),
        # The image data is inflated again (the last row is all zeros): valid, so ok.
        "black-last-row.png": _encode(
            Image.fromarray(np.vstack([np.asarray(scene)[:-1], np.zeros((1, 80, 3), "u1")])), "PNG"
        ),
        "gray16.png": _encode(Image.fromarray(np.arange(80 * 64, dtype=np.uint16).reshape(64, 80) * 12), "PNG"),
        "image.gif": _encode(scene.convert("P"), "GIF"),
        "lossy.webp": _encode(scene, "WEBP", quality=80),
        "lossless.webp": _encode(scene, "WEBP", lossless=True),
        "plain.tiff": _encode(scene, "TIFF"),
        "lzw.tiff": _encode(scene, "TIFF", compression="tiff_lzw"),
        "image.bmp": _encode(scene, "BMP"),
    }


def damaged_images() -> dict[str, bytes]:
    """Damaged files, several kinds per format: cut at several points, chunks corrupted, streams short."""
    damaged = {}
    for name, data in intact_images().items():
        stem, ext = name.rsplit(".", 1)
        for fraction in (0.3, 0.6, 0.95):
            damaged[f"{stem}-cut{int(fraction * 100)}.{ext}"] = data[: int(len(data) * fraction)]
    scene = np.asarray(_scene())
    rows = b"".join(b"\x00" + scene[y].tobytes() for y in range(64))
    png = _encode(_scene(), "PNG")
    idat = png.index(b"IDAT")
    flipped = bytearray(png)
    flipped[idat + 40] ^= 0x01  # one bit of the image data: the chunk's CRC no longer matches
    recomputed = bytearray(flipped)  # the same damage with a CRC that matches: only zlib can tell
    length = struct.unpack(">I", png[idat - 4 : idat])[0]
    crc = zlib.crc32(bytes(recomputed[idat : idat + 4 + length]))
    recomputed[idat + 4 + length : idat + 8 + length] = struct.pack(">I", crc)
    gif = _encode(_scene().convert("P"), "GIF")
    jpeg = _encode(_scene(), "JPEG")
    damaged.update(
        {
            "png-idat-bit-flipped.png": bytes(flipped),
            "png-idat-corrupt-with-valid-crc.png": bytes(recomputed),
            "png-short-image-data.png": _png(rows[: len(rows) // 2], 80, 64),  # valid zlib stream, half the rows
            "png-interlaced-short.png": _png(_interlaced_rows(scene)[:-300], 80, 64, interlaced=True),
            "png-no-iend.png": _png(rows, 80, 64, end=False),
            "png-bad-chunk-type.png": png[:33] + b"\x00\x00\x00\x04\x01\x02\x03\x04abcd\x00\x00\x00\x00" + png[33:],
            "gif-cut-with-trailer.gif": gif[: len(gif) // 2] + b"\x00;",
            "jpeg-cut-in-header.jpg": jpeg[:40],
            "text-named.jpg": f"password={SECRET}\n".encode() * 20,
            "empty.png": b"",
        }
    )
    return damaged


# --------------------------------------------------------------------------- decoding, no Ray
def test_every_intact_kind_decodes_and_every_damaged_file_is_an_error():
    for name, data in intact_images().items():
        decoded = inputs.decode_image(data)
        assert (decoded.width, decoded.height) == (80, 64), name
    for name, data in damaged_images().items():
        with pytest.raises(inputs.ImageDecodeError) as caught:
            inputs.decode_image(data, (64, 64))
        message = str(caught.value)
        assert message and SECRET not in message and "password" not in message, (name, message)
        assert "\\x" not in message and "b'" not in message, (name, message)  # no bytes quoted from the file
    # The EXIF step used to load a PNG, swallow its decode error, and a second load() returned the
    # partly filled buffer; the header-only size used for batching must not decode either.
    assert inputs.upright_size(damaged_images()["png-idat-bit-flipped.png"]) == (80, 64)


def test_nothing_lets_pil_accept_truncated_images():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    package = Path(inputs.__file__).resolve().parents[1]
    assert not [p for p in package.rglob("*.py") if "LOAD_TRUNCATED_IMAGES" in p.read_text()]


# --------------------------------------------------------------------------- the corpus on disk
def _write_bytes_name(folder: Path, name: bytes, data: bytes) -> None:
    with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
        handle.write(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``root/input``: good images, damaged ones, non-UTF-8 names, links out of and inside the input,
    a FIFO, a socket and (as root) a device named like images; ``root/outside``: what links point to."""
    root = tmp_path_factory.mktemp("untrusted")
    outside, data = root / "outside", root / "input"
    (outside / "folder").mkdir(parents=True)
    (data / "sub").mkdir(parents=True)
    (outside / "secret.jpg").write_text(SECRET)
    (outside / "photo.jpg").write_bytes(_encode(_scene(seed=9), "JPEG"))
    (outside / "folder" / "more.png").write_bytes(_encode(_scene(seed=8), "PNG"))
    good = {"good-a.jpg": _encode(_scene(seed=1), "JPEG"), "sub/good-b.png": _encode(_scene(seed=2), "PNG")}
    for name, content in {
        **good,
        "sub/png-idat-bit-flipped.png": damaged_images()["png-idat-bit-flipped.png"],
        "jpeg-cut.jpg": damaged_images()["baseline-cut60.jpg"],
        "text-named.jpg": damaged_images()["text-named.jpg"],
    }.items():
        (data / name).write_bytes(content)
    _write_bytes_name(data, b"caf\xe9.jpg", _encode(_scene(seed=3), "JPEG"))  # Latin-1
    _write_bytes_name(data, b"caf%E9.jpg", _encode(_scene(seed=4), "JPEG"))  # the escape's text, as a real name
    _write_bytes_name(data / "sub", b"\xff\xfe-broken.png", _encode(_scene(seed=5), "PNG"))
    os.symlink(outside / "secret.jpg", data / "link-to-secret.jpg")
    os.symlink(outside / "photo.jpg", data / "link-to-outside-photo.jpg")
    os.symlink(outside / "folder", data / "link-to-outside-folder")
    os.symlink("../good-a.jpg", data / "sub" / "link-inside.jpg")
    os.symlink(data / "sub", data / "link-to-sub")
    os.symlink(data / "missing.jpg", data / "dangling.jpg")
    os.symlink("loop.jpg", data / "loop.jpg")
    os.mkfifo(data / "fifo.jpg")
    os.mkfifo(data / "fifo-no-extension")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(data / "socket.png"))
    device = False
    try:
        os.mknod(data / "device.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        device = True
    except (PermissionError, OSError):
        pass
    expected_ok = ["good-a.jpg", "sub/good-b.png", "caf%E9.jpg", "caf\udce9.jpg", "sub/\udcff\udcfe-broken.png"]
    expected_error = ["sub/png-idat-bit-flipped.png", "jpeg-cut.jpg", "text-named.jpg"]
    refused = [
        "link-to-secret.jpg",
        "link-to-outside-photo.jpg",
        "link-to-outside-folder",
        "sub/link-inside.jpg",
        "link-to-sub",
        "dangling.jpg",
        "loop.jpg",
        "fifo.jpg",
        "fifo-no-extension",
        "socket.png",
    ] + (["device.jpg"] if device else [])
    yield {
        "root": root,
        "input": data,
        "outside": outside,
        "ok": expected_ok,
        "error": expected_error,
        "refused": refused,
    }
    server.close()


def _text(folder: Path, relative: str) -> str:
    return boundary.path_text(os.path.join(os.path.realpath(folder), relative))


def test_listing_reads_only_regular_files_inside_the_root_and_names_the_rest(corpus):
    data = corpus["input"]
    listing = inputs.list_inputs(str(data))
    assert listing.format == "images"
    assert sorted(listing.files) == sorted(_text(data, f) for f in corpus["ok"] + corpus["error"])
    named = {entry["path"]: entry["reason"] for entry in listing.skipped_named}
    assert sorted(named) == sorted(_text(data, f) for f in corpus["refused"])
    assert listing.skipped == len(corpus["refused"])
    reasons = {path.rsplit("/", 1)[-1]: reason for path, reason in named.items()}
    assert "outside the input" in reasons["link-to-secret.jpg"] and "never opened" in reasons["link-to-secret.jpg"]
    assert "outside the input" in reasons["link-to-outside-folder"]
    assert "inside the input" in reasons["link-inside.jpg"] and "good-a.jpg" in reasons["link-inside.jpg"]
    assert "broken symbolic link" in reasons["dangling.jpg"] and "broken symbolic link" in reasons["loop.jpg"]
    assert "FIFO" in reasons["fifo.jpg"] and "FIFO" in reasons["fifo-no-extension"]
    assert "socket" in reasons["socket.png"]
    if "device.jpg" in reasons:
        assert "character device" in reasons["device.jpg"]
    assert not any(str(corpus["outside"]) in f for f in listing.files)
    # The escape is lossless and cannot collide with the real file named like its text.
    latin1, literal = _text(data, "caf\udce9.jpg"), _text(data, "caf%E9.jpg")
    assert latin1.startswith("file://") and latin1.endswith("/caf%E9.jpg") and not literal.startswith("file://")
    assert os.fsencode(boundary.local_path(latin1)).endswith(b"/caf\xe9.jpg")
    with pytest.raises(inputs.InputError, match="FIFO"):  # named as the input itself: refused, never opened
        inputs.list_inputs(str(data / "fifo.jpg"))


def test_every_spelling_of_the_input_is_the_same_dataset(corpus, monkeypatch):
    data, root = corpus["input"], corpus["root"]
    alias = root / "alias"
    if not alias.exists():
        os.symlink(data, alias)
    spellings = (
        "input",
        "./input/",
        "input//",
        str(data) + "/",
        f"{root}/./outside/../input",
        "alias",
        "./alias/",
        f"file://{data}",
    )
    # From the folder above it: the input's real path relative to there (an output made in a repository
    # copy stays valid where the copy moves).
    monkeypatch.chdir(root)
    below = inputs.list_inputs(str(data))
    assert below.root == "input" and all(f.startswith(("input/", "file:input/")) for f in below.files)
    for spelling in spellings:
        listing = inputs.list_inputs(spelling)
        assert (listing.root, listing.files) == (below.root, below.files), spelling
    # From anywhere else: its absolute real path, whatever the spelling and the working directory.
    for cwd in (root / "outside", Path("/")):
        monkeypatch.chdir(cwd)
        for spelling in spellings:
            listing = inputs.list_inputs(spelling if spelling.startswith(("/", "file:")) else f"{root}/{spelling}")
            absolute = sorted(f"file://{root}/{f[5:]}" if f.startswith("file:") else f"{root}/{f}" for f in below.files)
            assert (listing.root, listing.files) == (os.path.realpath(data), absolute), (cwd, spelling)


def test_reading_refuses_a_file_swapped_after_the_listing(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names = ["becomes-fifo.jpg", "becomes-link.jpg", "sub/behind-swapped-folder.jpg", "stays.jpg"]
    for name in names:
        (folder / name).write_bytes(_encode(_scene(), "JPEG"))
    (elsewhere / "behind-swapped-folder.jpg").write_text(SECRET)
    plan = inputs.plan_inputs(inputs.list_inputs(str(folder)))
    (folder / "becomes-fifo.jpg").unlink()
    os.mkfifo(folder / "becomes-fifo.jpg")
    (folder / "becomes-link.jpg").unlink()
    os.symlink(elsewhere / "behind-swapped-folder.jpg", folder / "becomes-link.jpg")
    shutil.rmtree(folder / "sub")
    os.symlink(elsewhere, folder / "sub")
    signal.alarm(20)  # a FIFO opened for reading would block here forever
    try:
        records = {r.source.rsplit("/", 1)[-1]: r for r in inputs.read_units(plan.units.to_pylist())}
    finally:
        signal.alarm(0)
    assert records["stays.jpg"].error is None and records["stays.jpg"].data
    assert "FIFO" in records["becomes-fifo.jpg"].error
    assert "symbolic link" in records["becomes-link.jpg"].error
    assert "another place" in records["behind-swapped-folder.jpg"].error
    assert all(r.data is None and SECRET not in r.error for name, r in records.items() if name != "stays.jpg")


# --------------------------------------------------------------------------- tar shards, no Ray
def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], compress: bool = False) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    path.write_bytes(gzip.compress(buffer.getvalue()) if compress else buffer.getvalue())
    return path


def _special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _read(path: Path) -> list[inputs.RawRecord]:
    return list(wds.read_shard_unit({"kind": wds.UNIT_KIND, "path": str(path), "unit": "u"}))


def test_tar_links_special_members_and_non_utf8_names_each_give_a_row(tmp_path):
    jpeg = _encode(_scene(), "JPEG")
    shard = _tar(
        tmp_path / "odd.tar",
        [
            ("0001.jpg", jpeg),
            ("0001.txt", b"caption"),
            _special("0002.jpg", tarfile.SYMTYPE, "/etc/passwd"),
            _special("0003.jpg", tarfile.LNKTYPE, "0001.jpg"),
            _special("0004.jpg", tarfile.FIFOTYPE),
            _special("0005.png", tarfile.CHRTYPE),
            ("0006.jpg", jpeg),
            _special("0006.txt", tarfile.SYMTYPE, "/etc/shadow"),  # a link the job never reads
            _special("dir", tarfile.DIRTYPE),
            ("caf\udce9.jpg", jpeg),
            ("\udcff.png", jpeg),
        ],
    )
    got = {r.image_id: r for r in _read(shard)}
    assert sorted(got) == ["%FF", "0001", "0002", "0003", "0004", "0005", "0006", "caf%E9"]
    assert got["0001"].error is None and got["0006"].error is None
    for key, kind in (("0002", "symbolic link"), ("0003", "hard link"), ("0004", "FIFO"), ("0005", "character device")):
        assert kind in got[key].error and got[key].data is None, key
    assert got["caf%E9"].error is None and got["caf%E9"].source == f"{shard}#caf%E9"
    assert all(r.source.encode("utf-8") for r in got.values())


def test_gzip_shards_read_like_tar_shards_and_are_listed(tmp_path):
    members = [
        (f"{i:04d}.{ext}", data)
        for i in range(3)
        for ext, data in (("jpg", _encode(_scene(seed=i), "JPEG")), ("json", b"{}"))
    ]
    folder = tmp_path / "shards"
    folder.mkdir()
    plain = _read(_tar(folder / "a.tar", members))
    for name in ("b.tar.gz", "c.tgz"):
        packed = _read(_tar(folder / name, members, compress=True))
        assert [(r.image_id, r.data, r.error) for r in packed] == [(r.image_id, r.data, r.error) for r in plain]
    (folder / "a.tar").unlink()
    (folder / "b_stats.json").write_text("{}")
    listing = inputs.list_inputs(str(folder))
    assert listing.format == "webdataset" and [f.rsplit("/", 1)[-1] for f in listing.files] == ["b.tar.gz", "c.tgz"]
    assert [e["path"].rsplit("/", 1)[-1] for e in listing.skipped_named] == ["b_stats.json"]
    # Cut or corrupted compressed streams: the samples before the damage, then one error row for the rest.
    whole = (folder / "b.tar.gz").read_bytes()
    (folder / "cut.tar.gz").write_bytes(whole[: len(whole) * 2 // 3])
    cut = _read(folder / "cut.tar.gz")
    failed = [r.error is not None for r in cut]
    assert failed[-1] and failed == sorted(failed)  # good samples, then the damage: nothing after it is lost quietly
    corrupt = bytearray(whole)
    corrupt[len(whole) // 2 : len(whole) // 2 + 64] = b"\x55" * 64
    (folder / "corrupt.tgz").write_bytes(bytes(corrupt))
    failed = [r.error is not None for r in _read(folder / "corrupt.tgz")]
    assert failed[-1] and failed == sorted(failed)
    (folder / "not-gzip.tgz").write_bytes(b"\x1f\x8b\x63" + SECRET.encode() * 30)  # gzip magic, then anything
    (junk,) = _read(folder / "not-gzip.tgz")
    assert junk.image_id == "@0" and junk.error and "b'" not in junk.error and SECRET not in junk.error


def test_a_key_in_two_shards_is_named():
    ids = ["a", "b", "a", "@0", "@0", "c"]
    sources = ["x/1.tar#a", "x/1.tar#b", "x/2.tar.gz#a", "x/1.tar#@0", "x/2.tar.gz#@0", "x/1.tar#c"]
    assert wds.duplicate_keys(ids, sources) == {
        "count": 1,
        "named": [{"image_id": "a", "sources": ["x/1.tar#a", "x/2.tar.gz#a"]}],
    }
    assert wds.split_source("d/x.tar.gz#k#1") == ("d/x.tar.gz", "k#1")


# --------------------------------------------------------------------------- the job, end to end
def test_the_job_labels_every_input_once_reads_nothing_outside_and_reruns_label_nothing(
    ray_local, corpus, tmp_path, monkeypatch
):
    from diffcut.job.pipeline import label_dataset
    from diffcut.job.settings import job_arguments

    data, output = corpus["input"], tmp_path / "labels"
    monkeypatch.chdir(corpus["outside"])  # inputs outside the working directory: absolute real paths
    first = label_dataset(str(data), str(output), **job_arguments(dict(**TINY)))
    rows = schema.read_labels(str(output), columns=["image_id", "source", "status", "error"]).to_pylist()
    by_source = {r["source"]: r for r in rows}
    assert len(rows) == len(by_source) == len(corpus["ok"]) + len(corpus["error"])
    assert {s for s, r in by_source.items() if r["status"] == "ok"} == {_text(data, f) for f in corpus["ok"]}
    assert {s for s, r in by_source.items() if r["status"] == "error"} == {_text(data, f) for f in corpus["error"]}
    assert "corrupt" in by_source[_text(data, "sub/png-idat-bit-flipped.png")]["error"]
    assert "truncated" in by_source[_text(data, "jpeg-cut.jpg")]["error"]
    summary_text = (output / schema.SUMMARY_NAME).read_text()
    assert (first["ok"], first["error"]) == (len(corpus["ok"]), len(corpus["error"]))
    assert sorted(e["path"] for e in first["skipped_files"]) == sorted(_text(data, f) for f in corpus["refused"])
    everything = json.dumps(rows) + summary_text
    assert SECRET not in everything and "password" not in everything
    assert not any(str(corpus["outside"]) in r["source"] for r in rows)

    # The same dataset spelled otherwise: nothing to do, nothing labeled twice.
    alias = corpus["root"] / "alias-e2e"
    os.symlink(data, alias)
    for spelling in ("../input/", "../alias-e2e", str(data) + "/", f"file://{alias}"):
        again = label_dataset(spelling, str(output), **job_arguments(dict(**TINY)))
        assert (again["processed"], again["already_done"], again["input"]) == (0, len(rows), first["input"]), spelling
    assert len(schema.read_labels(str(output), columns=["source"])) == len(rows)


def test_gzip_shards_with_odd_members_and_a_key_in_two_shards(ray_local, tmp_path):
    from diffcut.job.pipeline import label_dataset
    from diffcut.job.settings import job_arguments

    folder = tmp_path / "shards"
    folder.mkdir()
    jpeg = [_encode(_scene(seed=s), "JPEG") for s in range(3)]
    _tar(
        folder / "000.tar.gz",
        [
            ("k0.jpg", jpeg[0]),
            ("shared.jpg", jpeg[1]),
            ("caf\udce9.jpg", jpeg[2]),
            _special("link.jpg", tarfile.SYMTYPE, "/etc/passwd"),
        ],
        compress=True,
    )
    _tar(folder / "001.tgz", [("shared.jpg", jpeg[2]), ("k1.jpg", jpeg[0])], compress=True)
    summary = label_dataset(str(folder), str(tmp_path / "labels"), **job_arguments(dict(**TINY)))
    rows = schema.read_labels(str(tmp_path / "labels"), columns=["image_id", "source", "status", "error"]).to_pylist()
    real = os.path.realpath(folder)
    assert sorted((r["source"], r["status"]) for r in rows) == [
        (f"{real}/000.tar.gz#caf%E9", "ok"),
        (f"{real}/000.tar.gz#k0", "ok"),
        (f"{real}/000.tar.gz#link", "error"),
        (f"{real}/000.tar.gz#shared", "ok"),
        (f"{real}/001.tgz#k1", "ok"),
        (f"{real}/001.tgz#shared", "ok"),
    ]
    assert "symbolic link" in next(r["error"] for r in rows if r["image_id"] == "link")
    assert summary["format"] == "webdataset" and summary["inputs_listed"] == 6
    assert summary["duplicate_keys"] == {
        "checked": True,
        "count": 1,
        "named": [{"image_id": "shared", "sources": [f"{real}/000.tar.gz#shared", f"{real}/001.tgz#shared"]}],
    }
    assert "more than one shard" in summary["warning"]


def test_gzip_shards_stream_from_s3(s3_bucket, tmp_path):
    import boto3

    members = [(f"{i:04d}.jpg", _encode(_scene(seed=i), "JPEG")) for i in range(3)]
    local = _read(_tar(tmp_path / "a.tgz", members, compress=True))
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="wds/a.tgz", Body=(tmp_path / "a.tgz").read_bytes())
    listing = inputs.list_inputs(f"s3://{s3_bucket}/wds/")
    assert (listing.format, listing.files) == ("webdataset", [f"s3://{s3_bucket}/wds/a.tgz"])
    remote = list(wds.read_shard_unit({"kind": wds.UNIT_KIND, "path": listing.files[0], "unit": "a.tgz"}))
    assert [(r.image_id, r.data) for r in remote] == [(r.image_id, r.data) for r in local]
    assert [r.image_id for r in remote] == ["0000", "0001", "0002"] and all(r.error is None for r in remote)
