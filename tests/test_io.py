"""Inputs of the labeling job: decoding untrusted bytes, sizes, listing, planning, S3."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffcut.job import inputs


# ------------------------------------------------------------------------------------ decoding
def test_every_tricky_input_decodes_or_fails_with_a_readable_message(tricky_images):
    for name, (data, expected, upright) in tricky_images.items():
        if expected == "ok":
            decoded = inputs.decode_image(data, (32, 32))
            assert decoded.pixels.shape == (32, 32, 3), name
            assert decoded.pixels.dtype == np.uint8, name
            assert (decoded.width, decoded.height) == upright, name
        else:
            with pytest.raises(inputs.ImageDecodeError) as caught:
                inputs.decode_image(data, (32, 32))
            message = str(caught.value)
            assert "Traceback" not in message and len(message) > 10, name


def test_error_messages_say_what_is_wrong(tricky_images):
    def error_of(name):
        with pytest.raises(inputs.ImageDecodeError) as caught:
            inputs.decode_image(tricky_images[name][0], (32, 32))
        return str(caught.value)

    assert "empty file" in error_of("zero_bytes.jpg")
    assert "truncated" in error_of("truncated.jpg")
    assert "not an image" in error_of("random_bytes.jpg")
    bomb = error_of("bomb.png")
    assert "10,000,000,000 pixels" in bomb and "refused without decoding" in bomb
    with pytest.raises(inputs.ImageDecodeError, match="no image bytes"):
        inputs.decode_image(None)


def test_decompression_bomb_is_refused_before_allocating():
    # 20000 x 20000 RGB would be 1.2 GB; the limit refuses it from the header alone.
    bomb = _bomb(20_000, 20_000)
    with pytest.raises(inputs.ImageDecodeError, match="more than the limit of 1,000,000"):
        inputs.decode_image(bomb, (32, 32), max_pixels=1_000_000)


def _bomb(width, height):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_exif_orientation_is_applied():
    # Stored 60 wide x 40 high, left half red; orientation 6 = rotate 90 degrees clockwise to display:
    # upright it is 40 x 60 and the red half is on top.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (255, 0, 0)
    stored[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = _save(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    decoded = inputs.decode_image(buffer)
    assert (decoded.width, decoded.height) == (40, 60)
    assert decoded.pixels.shape == (60, 40, 3)
    top, bottom = decoded.pixels[:20].mean(axis=(0, 1)), decoded.pixels[-20:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_upright_size_reads_the_header_with_its_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: 60x40 stored, 40x60 upright
    rotated = _save(Image.new("RGB", (60, 40)), "JPEG", exif=exif)
    assert (
        inputs.upright_size(rotated)
        == (40, 60)
        == (inputs.decode_image(rotated).width, inputs.decode_image(rotated).height)
    )
    assert inputs.upright_size(_save(Image.new("RGB", (60, 40)), "PNG")) == (60, 40)
    # Only the header: a truncated file still has a size (decoding it fails later, on its row).
    assert inputs.upright_size(_save(Image.new("RGB", (300, 200), (9, 9, 9)), "PNG")[:60]) == (300, 200)
    for bad in (b"", b"not an image at all", None):
        with pytest.raises(inputs.ImageDecodeError):
            inputs.upright_size(bad)
    with pytest.raises(inputs.ImageDecodeError, match="decompression-bomb"):
        inputs.upright_size(_bomb(100_000, 100_000))


def _save(image, format, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_colour_modes_become_faithful_8bit_rgb():
    # 16-bit grayscale is scaled, not clipped: 65535 -> 255, 32896 -> 128.
    deep = np.array([[0, 32896, 65535]], np.uint16)
    pixels = inputs.decode_image(_save(Image.fromarray(deep), "PNG")).pixels
    assert pixels[0, :, 0].tolist() == [0, 128, 255]
    assert (pixels[..., 0] == pixels[..., 2]).all()
    # Transparency is composited over white.
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert inputs.decode_image(_save(rgba, "PNG")).pixels.reshape(-1, 3).tolist() == [[255, 255, 255]] * 16
    # CMYK converts with PIL's colour conversion (pure cyan -> no red).
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    assert inputs.decode_image(_save(cmyk, "TIFF")).pixels[0, 0].tolist() == [0, 255, 255]
    # Animated GIF: the first frame.
    frames = [Image.new("RGB", (6, 6), color).convert("P") for color in [(250, 0, 0), (0, 0, 250)]]
    gif = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    first = inputs.decode_image(gif).pixels[0, 0]
    assert first[0] > 200 and first[2] < 50


def test_large_jpeg_is_decoded_at_reduced_scale(large_jpeg):
    """An 8000 x 6000 JPEG for a 256-pixel model input never exists at full size (144 MB) in memory."""
    script = textwrap.dedent(f"""
        import json, resource
        from diffcut.job import inputs
        data = open({str(large_jpeg)!r}, "rb").read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        decoded = inputs.decode_image(data, lambda w, h: inputs.model_size(w, h, 256))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size = [decoded.width, decoded.height]
        print(json.dumps(dict(grown_kib=after - before, shape=decoded.pixels.shape, size=size)))
    """)
    result = json.loads(
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120).stdout
    )
    assert result["size"] == [8000, 6000]
    assert result["shape"] == [224, 288, 3]  # bucket of about 256^2 pixels, sides multiples of 32
    assert result["grown_kib"] < 60 * 1024, result  # full decoding alone would add 140+ MB


def test_draft_never_goes_below_the_target_size(large_jpeg):
    data = large_jpeg.read_bytes()
    decoded = inputs.decode_image(data, (4000, 3000))
    assert decoded.pixels.shape == (3000, 4000, 3)
    # The left edge is dark, the right edge bright: the gradient survives the reduced decode.
    assert decoded.pixels[:, :10].mean() < 10 and decoded.pixels[:, -10:].mean() > 245


# ------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("width,height", [(640, 480), (480, 640), (1000, 1000), (1, 1), (5000, 300), (3, 9000)])
def test_buckets_keep_aspect_area_and_stride(width, height):
    for resolution in (256, 512, 1024):
        bucket_w, bucket_h = inputs.bucket_size(width, height, resolution)
        assert bucket_w % 32 == 0 and bucket_h % 32 == 0
        assert bucket_w >= 32 and bucket_h >= 32
        # About resolution^2 pixels, never many more cells than the square size has.
        assert bucket_w * bucket_h <= resolution**2 * 1.15
        if 0.25 <= width / height <= 4:
            assert abs(bucket_w * bucket_h / resolution**2 - 1) < 0.15
            assert abs(np.log((bucket_w / bucket_h) / (width / height))) < 0.15


def test_buckets_are_a_fixed_set_and_square_mode_is_the_paper():
    sizes = {inputs.bucket_size(w, 1000, 1024) for w in range(500, 2001, 7)}
    assert len(sizes) < 40  # many aspect ratios, few buckets: batches can group
    assert inputs.model_size(123, 456, 1024, "square") == (1024, 1024)
    assert inputs.model_size(1000, 1000, 1024, "bucket") == (1024, 1024)
    with pytest.raises(inputs.InputError):
        inputs.model_size(10, 10, 1024, "stretch")
    with pytest.raises(inputs.InputError, match="multiple of the model stride"):
        inputs.check_resolution(1000)


def test_mask_size_specs():
    image, model = (800, 600), (1152, 864)
    assert inputs.MaskSize.parse("original").resolve(image, model) == (800, 600)
    assert inputs.MaskSize.parse("model").resolve(image, model) == (1152, 864)
    assert inputs.MaskSize.parse("128").resolve(image, model) == (128, 96)
    assert inputs.MaskSize.parse("64x32").resolve(image, model) == (64, 32)
    assert str(inputs.MaskSize.parse("64X32")) == "64x32"
    for bad in ("0", "big", "12x", "-5"):
        with pytest.raises(inputs.InputError):
            inputs.MaskSize.parse(bad)


# ------------------------------------------------------------------------------------ locations
def test_uris_with_credentials_are_refused_and_secrets_redacted(monkeypatch):
    with pytest.raises(inputs.InputError, match="must not contain credentials"):
        inputs.check_uri("s3://AKIAXXXX:secretvalue@bucket/prefix")
    assert inputs.check_uri("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert inputs.check_uri("./some/dir/") == "some/dir"
    assert inputs.check_uri("file:///tmp/x/") == "/tmp/x"
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789")
    assert inputs.redact("failed with tok-0123456789 in the header") == "failed with *** in the header"


def test_listing_is_recursive_case_insensitive_and_skips_other_files(tmp_path, tricky_images):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "deep.JPG").write_bytes(tricky_images["gray.jpg"][0])
    (tmp_path / "top.png").write_bytes(tricky_images["rgba.png"][0])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    listing = inputs.list_inputs(str(tmp_path))
    assert listing.format == "images"
    assert listing.files == [f"{tmp_path}/a/b/deep.JPG", f"{tmp_path}/top.png"]
    assert listing.skipped == 2
    (tmp_path / "table.parquet").write_bytes(b"PAR1")
    with pytest.raises(inputs.InputError, match="both image files"):
        inputs.list_inputs(str(tmp_path))
    assert inputs.list_inputs(str(tmp_path), "parquet").files == [f"{tmp_path}/table.parquet"]
    with pytest.raises(inputs.InputError, match="does not exist"):
        inputs.list_inputs(str(tmp_path / "missing"))


def test_files_without_extension_are_sniffed_and_every_skipped_file_is_named(tmp_path, tricky_images):
    """Issue 13 item 5: a content-addressed store (``images/3f/9a...``, no extensions)."""
    store = tmp_path / "images" / "3f"
    store.mkdir(parents=True)
    formats = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}
    for name, kind in [
        ("gray.jpg", "jpg"),
        ("rgba.png", "png"),
        ("image.webp", "webp"),
        ("animated.gif", "gif"),
        ("image.bmp", "bmp"),
        ("image.tiff", "tiff"),
    ]:
        data = tricky_images[name][0]
        assert inputs.sniff_image_format(data[: inputs.MAGIC_BYTES]) == formats[kind]
        (store / f"3f9a{kind}").write_bytes(data)
    (store / "3f9b").write_bytes(b"BMnot a bitmap, only starts like one")
    (store / "3f9c").write_bytes(b"")
    (store / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".DS_Store").write_bytes(b"x")
    listing = inputs.list_inputs(str(tmp_path / "images"))
    assert listing.files == sorted(f"{store}/3f9a{kind}" for kind in formats)
    assert listing.skipped == 4
    named = {entry["path"].rsplit("/", 1)[1]: entry["reason"] for entry in listing.skipped_named}
    assert named == {
        "3f9b": "no file extension, and its first bytes are not those of an image",
        "3f9c": "no file extension, and its first bytes are not those of an image",
        "notes.txt": "not an input kind (.txt file)",
        ".DS_Store": "hidden file",
    }
    for name in range(inputs.SKIPPED_NAMED + 5):  # the named list is bounded, the count is not
        (store / f"extra{name}.json").write_text("{}")
    listing = inputs.list_inputs(str(tmp_path / "images"))
    assert (listing.skipped, len(listing.skipped_named)) == (4 + inputs.SKIPPED_NAMED + 5, inputs.SKIPPED_NAMED)


def test_listing_excludes_an_output_inside_the_input(tmp_path, tricky_images):
    (tmp_path / "img.png").write_bytes(tricky_images["rgba.png"][0])
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "x.png").write_bytes(tricky_images["rgba.png"][0])
    listing = inputs.list_inputs(str(tmp_path), exclude=str(tmp_path / "labels"))
    assert listing.files == [f"{tmp_path}/img.png"]


def test_image_plan_skips_done_and_limits():
    files = [f"s3://b/{i}.jpg" for i in range(5)]
    done = inputs.Done(units={"images-old-000000"}, sources={"s3://b/1.jpg"}, rows=1)
    plan = inputs.plan_image_files(files, done=done, limit=3, unit_files=2, run_id="new")
    assert (plan.listed, plan.already_done, plan.planned) == (5, 1, 3)
    assert plan.units.column("path").to_pylist() == ["s3://b/0.jpg", "s3://b/2.jpg", "s3://b/3.jpg"]
    assert plan.units.column("unit").to_pylist() == ["images-new-000000"] * 2 + ["images-new-000001"]
    assert plan.expected == {"images-new-000000": 2, "images-new-000001": 1} and not plan.partial
    records = list(
        inputs.read_units(
            [
                {
                    "kind": "file",
                    "path": "/no/such/file.jpg",
                    "unit": "u",
                    "row_group": None,
                    "rows": [0],
                    "image_ids": ["x"],
                    "sources": ["/no/such/file.jpg"],
                    "errors": [None],
                }
            ]
        )
    )
    assert records[0].data is None and "cannot read the file" in records[0].error and records[0].unit == "u"


def _write_parquet(path, images, *, struct_column=False, ids=None, row_group_size=3):
    if struct_column:
        column = pa.array(
            [None if b is None else {"bytes": b, "path": f"img{i}.jpg"} for i, b in enumerate(images)],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        column = pa.array(images, pa.binary())
    data = {"image": column}
    if ids is not None:
        data["key"] = pa.array(ids)
    pq.write_table(pa.table(data), path, row_group_size=row_group_size)


@pytest.mark.parametrize("struct_column", [False, True])
def test_parquet_plan_and_read(tmp_path, tricky_images, struct_column):
    good = tricky_images["png_named.jpg"][0]
    images = [good, None, b"", good, good, good, good]
    ids = ["a", "b", "c", "a", None, "f", "g"]
    path = tmp_path / "part-0.parquet"
    _write_parquet(path, images, struct_column=struct_column, ids=ids)
    uri = str(path)
    plan = inputs.plan_parquet([uri], root=str(tmp_path), image_column="image", id_column="key")
    assert (plan.listed, plan.already_done, plan.planned) == (7, 0, 7)
    assert plan.units.num_rows == 3  # row groups [0..2], [3..5] and [6], all of the file's unit
    assert set(plan.units.column("unit").to_pylist()) == {"part-0.parquet"}
    assert (plan.expected, plan.partial, plan.inputs) == ({"part-0.parquet": 7}, set(), {"part-0.parquet": uri})
    records = list(inputs.read_units(plan.units.to_pylist(), image_column="image"))
    assert [r.source for r in records] == [f"{uri}#row={i}" for i in range(7)]
    assert [r.image_id for r in records] == ["a", "b", "c", "a", f"{uri}#row=4", "f", "g"]
    assert {r.unit for r in records} == {"part-0.parquet"}
    assert records[0].data == good and records[0].error is None
    assert "null" in records[1].error
    assert records[2].data == b"" and records[2].error is None  # empty bytes fail at decoding
    assert "duplicate image_id 'a'" in records[3].error and f"{uri}#row=0" in records[3].error
    assert "id column 'key' is null" in records[4].error
    assert records[6].data == good and records[6].error is None
    # A file recorded as done is not planned (nor opened) again; its rows count as done.
    done = inputs.Done(units={"part-0.parquet"}, rows=7)
    again = inputs.plan_parquet([uri], root=str(tmp_path), image_column="image", id_column="key", done=done)
    assert (again.units.num_rows, again.listed, again.already_done, again.planned) == (0, 7, 7, 0)
    assert (again.units_listed, again.units_done, again.expected) == (1, 1, {})
    limited = inputs.plan_parquet([uri], image_column="image", limit=2)
    assert limited.planned == 2 and limited.units.column("rows").to_pylist() == [[0, 1]]


def test_parquet_with_a_wrong_column_is_a_clear_input_error(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"pixels": pa.array(["not bytes"])}), path)
    with pytest.raises(inputs.InputError, match="has no column 'image'"):
        inputs.plan_parquet([str(path)], image_column="image")
    with pytest.raises(inputs.InputError, match="expected image bytes"):
        inputs.plan_parquet([str(path)], image_column="pixels")


# ------------------------------------------------------------------------------------ S3
def test_s3_listing_and_reading_through_the_standard_settings(s3_bucket, tricky_images):
    """Listing and reading go through s3fs with nothing but AWS_ENDPOINT_URL and keys in the env."""
    import boto3

    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="images/x/one.png", Body=tricky_images["rgba.png"][0])
    client.put_object(Bucket=s3_bucket, Key="images/two.JPEG", Body=tricky_images["gray.jpg"][0])
    client.put_object(Bucket=s3_bucket, Key="images/readme.md", Body=b"# not an image")
    client.put_object(Bucket=s3_bucket, Key="imagesX/other.png", Body=tricky_images["rgba.png"][0])
    listing = inputs.list_inputs(f"s3://{s3_bucket}/images/")
    assert listing.files == [f"s3://{s3_bucket}/images/two.JPEG", f"s3://{s3_bucket}/images/x/one.png"]
    assert listing.skipped == 1
    plan = inputs.plan_image_files(listing.files)
    records = list(inputs.read_units(plan.units.to_pylist()))
    assert [r.data for r in records] == [tricky_images["gray.jpg"][0], tricky_images["rgba.png"][0]]
    missing = list(
        inputs.read_units(
            [
                {
                    "kind": "file",
                    "path": f"s3://{s3_bucket}/images/gone.png",
                    "unit": "u",
                    "row_group": None,
                    "rows": [0],
                    "image_ids": ["g"],
                    "sources": ["g"],
                    "errors": [None],
                }
            ]
        )
    )
    assert missing[0].data is None and "cannot read the file" in missing[0].error
