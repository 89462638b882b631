import os

# Ray must bind and connect on loopback only (see README, "Network").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch

# Two cores here: keep torch from oversubscribing them when Ray workers run beside the test.
torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Labeling job fixtures (tests/test_io.py, test_schema.py, test_pipeline.py): an S3 server on
# loopback, a local Ray, and generated image files covering the inputs a real dataset contains.
import io  # noqa: E402
import struct  # noqa: E402
import uuid  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

#: Fixtures that start a service: a test using one (directly or through another fixture) gets the marker,
#: so that ``make test-fast`` (``-m "not ray and not s3 and not slow"``) leaves it out. A test that starts
#: Ray or a server by other means (its own cluster, a job in a subprocess) is marked ``slow``.
SERVICE_MARKERS = {"ray_local": "ray", "s3_server": "s3"}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marker in SERVICE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


#: A value that must never appear in any output, log or summary (see test_pipeline).
S3_TEST_SECRET = "dummy-secret-7f3a9c2e1b"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (server mode, as s3fs's own suite uses), reached through the
    standard AWS settings: AWS_ENDPOINT_URL and dummy keys in the environment, no profile files.

    Set for the whole session so Ray workers started later inherit it. Yields the endpoint URL.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": S3_TEST_SECRET,
        "AWS_SESSION_TOKEN": S3_TEST_SECRET + "-token",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    saved = {name: os.environ.get(name) for name in [*settings, "AWS_PROFILE"]}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(settings)
    _forget_s3_clients()
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _forget_s3_clients()
        server.stop()


def _forget_s3_clients() -> None:
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the loopback S3 server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One local Ray for a test module, on 127.0.0.1, started after the S3 settings are in the
    environment so its workers see them. 4 CPU slots on 2 cores: the tests use fractional pools."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=512 * 2**20,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _encode(image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _scene(width: int, height: int, seed: int = 0):
    """An RGB image with a few flat regions and mild texture."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.zeros((height, width, 3), np.float64)
    pixels[...] = (40, 90, 200)
    pixels[yy > height * 0.6] = (60, 150, 70)
    disc = (xx - width * 0.3) ** 2 + (yy - height * 0.35) ** 2 < (min(width, height) * 0.2) ** 2
    pixels[disc] = (230, 200, 60)
    pixels += rng.normal(0, 4, size=(height, width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels (30 GB for the default)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def tricky_images() -> dict[str, tuple[bytes, str, tuple[int, int] | None]]:
    """File name -> (bytes, expected status, expected upright (width, height) or None).

    The inputs of issue 6 item 1 that fit in memory: broken files that must become error rows
    with a readable message, and unusual but valid ones that must be labeled.
    """
    from PIL import Image

    scene = _scene(64, 48, seed=1)
    jpeg = _encode(scene, "JPEG", quality=90)
    rng = np.random.default_rng(7)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    frames = [_scene(40, 30, seed=s).convert("P", palette=Image.Palette.ADAPTIVE) for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    palette = _scene(50, 40, seed=2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    deep = (np.linspace(0, 65535, 80 * 60).reshape(60, 80)).astype(np.uint16)
    return {
        "zero_bytes.jpg": (b"", "error", None),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "error", None),
        "random_bytes.jpg": (rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), "error", None),
        "bomb.png": (decompression_bomb_png(), "error", None),
        "png_named.jpg": (_encode(scene, "PNG"), "ok", (64, 48)),
        "cmyk.jpg": (_encode(scene.convert("CMYK"), "JPEG"), "ok", (64, 48)),
        "deep16.png": (_encode(Image.fromarray(deep), "PNG"), "ok", (80, 60)),
        "gray.jpg": (_encode(scene.convert("L"), "JPEG"), "ok", (64, 48)),
        "rgba.png": (_encode(scene.convert("RGBA"), "PNG"), "ok", (64, 48)),
        "palette.png": (_encode(palette, "PNG", transparency=0), "ok", (50, 40)),
        "animated.gif": (gif.getvalue(), "ok", (40, 30)),
        "exif_rotated.jpg": (_encode(_scene(60, 40, seed=3), "JPEG", exif=exif), "ok", (40, 60)),
        "one_pixel.png": (_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok", (1, 1)),
        "image.webp": (_encode(scene, "WEBP"), "ok", (64, 48)),
        "image.bmp": (_encode(scene, "BMP"), "ok", (64, 48)),
        "image.tiff": (_encode(scene, "TIFF"), "ok", (64, 48)),
    }


@pytest.fixture(scope="session")
def large_jpeg(tmp_path_factory):
    """Path of a valid 8000 x 6000 JPEG (48 megapixels; 144 MB once decoded at full size)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("large") / "large_8000x6000.jpg"
    ramp = np.linspace(0, 255, 8000, dtype=np.float32)
    rows = np.broadcast_to(ramp[None, :, None], (6000, 8000, 3)).astype(np.uint8)
    Image.fromarray(rows, "RGB").save(path, quality=70)
    return path


@pytest.fixture(scope="session")
def sample_dir():
    """The bundled sample images (samples/, written by samples/make_samples.py)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "samples"


# ----------------------------------------------------------------------------------------------
# Labeling outputs built by hand, in the job's layout (diffcut.job.units): tests of the tools that read them.
def _write_unit(output, unit: str, table, params: str = "{}", **record):
    """Write ``table`` (label rows) as ``unit`` of the output ``output`` the way the job does: the label file
    (rows in order of source), then its done record. ``record`` sets other UnitRecord fields. Returns the record."""
    import pyarrow.compute as pc

    from diffcut.job import schema, units

    output = str(output)
    if "source" in table.column_names:
        table = table.take(pc.sort_indices(table, [("source", "ascending")]))
    data = units.table_bytes(table)
    units.put_durably(units.label_file(output, unit), data)
    ok = sum(status == schema.STATUS_OK for status in table.column("status").to_pylist())
    done = units.UnitRecord(
        unit=unit, rows=table.num_rows, ok=ok, error=table.num_rows - ok, bytes=len(data), params=params, run_id="test"
    )
    for name, value in record.items():
        setattr(done, name, value)
    units.write_record(output, done)
    return done


@pytest.fixture(scope="session")
def write_unit():
    """The function that writes one unit of a labeling output by hand (:func:`_write_unit`)."""
    return _write_unit
