"""Security of the labeling job and its exports (issue 6, item 5), with real parts: the tiny model,
a local Ray, the moto S3 server on loopback, and ``python jobs/label.py`` with its embedded Ray.

* Weights only from safetensors: a pickle checkpoint makes the job fail once, clearly (exit 2, one
  line saying why), before any row is written.
* No credentials in logs, outputs or summaries: the job runs against S3 with secret values in the
  environment; its stdout/stderr, every object it wrote and every file of its Ray session are
  searched for them. A broken credential makes a clear error that does not echo it.
* Ids that become file names (PNG export, gallery thumbnails) cannot leave the output folder.
* The Ray the job starts listens on loopback addresses only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffcut.cli import main as cli_main
from diffcut.job import schema, units

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    model="tiny-random", device="cpu", resolution=64, batch_size=2, decode_cpus=0.5, extractor_cpus=0.5, ncut_cpus=0.5
)
TINY_FLAGS = [
    "--device",
    "cpu",
    "--resolution",
    "64",
    "--batch-size",
    "2",
    "--decode-cpus",
    "0.5",
    "--extractor-cpus",
    "0.5",
    "--ncut-cpus",
    "0.5",
]
SAMPLES = ["landscape.jpg", "tiles.png", "logo_rgba.png"]


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """``diffcut label`` configures logging on a handler bound to the (captured) stderr of the
    test; remove it afterwards so later log records do not go to a closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _png(seed: int) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    pixels = np.empty((40, 56, 3), np.uint8)
    pixels[...] = rng.integers(0, 256, 3, dtype=np.uint8)
    pixels[:20, 28:] = rng.integers(0, 256, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ weights
def test_a_pickle_checkpoint_fails_the_job_once_and_clearly(ray_local, tmp_path, sample_dir, capsys):
    """A model whose UNet weights are a pickle file (.bin) is refused: the job exits 2 with one line
    that says so, and writes no rows (a model that cannot load is not N per-image errors)."""
    import torch
    from safetensors.torch import load_file

    from diffcut.method.tiny import tiny_random_path

    model = tmp_path / "pickled-model"
    shutil.copytree(tiny_random_path(), model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    images = tmp_path / "images"
    images.mkdir()
    for name in SAMPLES:
        shutil.copy(sample_dir / name, images / name)
    output = tmp_path / "labels"

    code = cli_main(["label", "--input", str(images), "--output", str(output), "--model", str(model), *TINY_FLAGS])
    assert code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"diffcut label: the feature actors could not load --model '{model}'"), last_line
    assert "pickle checkpoints" in last_line and "unet/diffusion_pytorch_model.bin" in last_line
    assert not units.recorded_units(str(output))
    assert not (output / schema.SUMMARY_NAME).exists()


# ------------------------------------------------------------------------------------ network + secrets
def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket of ``root`` and its descendants."""
    found = set()
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            name = process.cmdline()[0].rsplit("/", 1)[-1] if process.cmdline() else process.name()
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.add((name, connection.laddr.ip, connection.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, IndexError):
            continue
    return found


def _files_containing(root: Path, secrets: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {secret[:6]}..." for secret in secrets if secret.encode() in data]
    return hits


def test_s3_job_leaks_no_secret_and_its_ray_listens_on_loopback_only(s3_bucket, sample_dir, tricky_images, tmp_path):
    """``python jobs/label.py`` from S3 to S3 with an embedded Ray, secrets in its environment
    (AWS keys from the s3_server fixture, plus a Hugging Face token). While it runs, every listening
    socket of the driver and of the processes it started is on a loopback address. Afterwards no
    secret is in its stdout/stderr, in any object it wrote (shards, _summary.json) or in any file of
    its Ray session directory (logs included)."""
    import boto3

    client = boto3.client("s3")
    for name in SAMPLES:
        client.put_object(Bucket=s3_bucket, Key=f"raw/{name}", Body=(sample_dir / name).read_bytes())
    client.put_object(Bucket=s3_bucket, Key="raw/broken.jpg", Body=tricky_images["truncated.jpg"][0])
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the job itself must keep Ray on loopback
    env["HF_TOKEN"] = "hf_" + "Zq8".join(["secretlooking"] * 3)
    secrets = [env["AWS_SECRET_ACCESS_KEY"], env["AWS_SESSION_TOKEN"], env["HF_TOKEN"]]
    ray_tmp = Path(tempfile.mkdtemp(prefix="dcsec", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env["RAY_TMPDIR"] = str(ray_tmp)
    output = f"s3://{s3_bucket}/labels"
    stdout, stderr = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    driver = None
    try:
        driver = subprocess.Popen(
            [
                sys.executable,
                "jobs/label.py",
                "--input",
                f"s3://{s3_bucket}/raw",
                "--output",
                output,
                "--json",
                "--model",
                "tiny-random",
                *TINY_FLAGS,
            ],
            cwd=REPO,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        sockets: set[tuple[str, str, int]] = set()
        deadline = time.time() + 300
        while driver.poll() is None and time.time() < deadline:
            sockets |= _listening(psutil.Process(driver.pid))
            time.sleep(0.3)
        assert driver.wait(timeout=max(1, deadline - time.time())) == 0, (tmp_path / "stderr").read_text()[-3000:]
        printed = (tmp_path / "stdout").read_text()
        summary = json.loads(printed[printed.index("{") :])
        assert (summary["ok"], summary["error"]) == (len(SAMPLES), 1)

        # Loopback only, and the sampling really saw the Ray processes.
        names = {name for name, _, _ in sockets}
        assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::MapWorker") for n in names), names
        exposed = sorted((name, ip, port) for name, ip, port in sockets if not _is_loopback(ip))
        assert not exposed, exposed

        # No secret anywhere.
        logs = printed + (tmp_path / "stderr").read_text()
        assert "Started a local Ray instance" in logs
        assert not [s for s in secrets if s in logs]
        keys = [item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket, Prefix="labels/")["Contents"]]
        assert "labels/_summary.json" in keys and any(k.startswith("labels/labels/") for k in keys)
        for key in keys:
            body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            assert not [s for s in secrets if s.encode() in body], key
        session_files = [p for p in ray_tmp.rglob("*") if p.is_file()]
        assert any(p.suffix in (".log", ".out", ".err") for p in session_files)
        assert not _files_containing(ray_tmp, secrets)
    finally:
        stdout.close()
        stderr.close()
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_broken_credential_is_a_clear_error_that_does_not_echo_it(
    s3_bucket, sample_dir, tmp_path, monkeypatch, capsys
):
    """A session token with a stray newline (a copy-paste mistake) makes every S3 request fail. The
    job stops before starting anything with one line naming the location, exit 2, and neither the
    token nor the secret key appears in what it prints."""
    import boto3
    import s3fs

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="raw/tiles.png", Body=(sample_dir / "tiles.png").read_bytes())
    token = os.environ["AWS_SESSION_TOKEN"] + "-broken\n"
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        code = cli_main(
            [
                "label",
                "--input",
                f"s3://{s3_bucket}/raw",
                "--output",
                str(tmp_path / "labels"),
                "--model",
                "tiny-random",
                *TINY_FLAGS,
            ]
        )
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    printed = capsys.readouterr()
    assert code == 2
    assert (
        printed.err.strip()
        .splitlines()[-1]
        .startswith(
            f"diffcut label: --input s3://{s3_bucket}/raw: the environment variable AWS_SESSION_TOKEN holds a control"
        )
    )
    assert "Traceback" not in printed.err
    for secret in (token.strip(), os.environ["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in printed.out + printed.err
    assert not (tmp_path / "labels").exists()


# ------------------------------------------------------------------------------------ file names
HOSTILE_IDS = [
    "../../escape",
    "/tmp/absolute-escape",
    "nul\x00byte.jpg",
    "..",
    ".",
    "dir/sub/name.png",
    "C:\\windows\\system32\\evil.jpg",
    "<script>alert(1)</script>",
    "x" * 300,
    "plain",
]


def test_ids_used_as_file_names_stay_inside_the_output(ray_local, tmp_path):
    """Parquet input whose id column holds path traversals, absolute paths, a NUL byte, HTML and a
    300-character id. The job keeps the ids as they are; ``diffcut export --format png`` and
    ``diffcut gallery`` write every file inside their output folder, one distinct file per id."""
    from diffcut.job.pipeline import label_dataset
    from diffcut.job.settings import job_arguments

    work = tmp_path / "work"
    dataset = work / "dataset"
    dataset.mkdir(parents=True)
    images = [_png(seed) for seed in range(len(HOSTILE_IDS))]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "key": HOSTILE_IDS}), dataset / "part-0.parquet")
    labels = work / "labels"
    summary = label_dataset(str(dataset), str(labels), **job_arguments(dict(id_column="key", **TINY)))
    assert (summary["ok"], summary["error"]) == (len(HOSTILE_IDS), 0)
    rows = schema.read_labels(str(labels), columns=["image_id", "status"]).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(HOSTILE_IDS)  # stored unchanged

    before = {p for p in tmp_path.rglob("*")}
    png_dir, gallery_dir = work / "out" / "png", work / "out" / "gallery"
    assert cli_main(["export", "--input", str(labels), "--format", "png", "--output", str(png_dir)]) == 0
    assert cli_main(["gallery", "--input", str(labels), "--out", str(gallery_dir)]) == 0
    created = {p for p in tmp_path.rglob("*")} - before
    allowed = (png_dir.resolve(), gallery_dir.resolve())
    outside = [
        p
        for p in created
        if not any(p.resolve().is_relative_to(folder) for folder in allowed)
        and not any(folder.is_relative_to(p.resolve()) for folder in allowed)
    ]  # ancestors: work/out
    assert not outside, outside
    assert not Path("/tmp/absolute-escape.png").exists()
    assert not any(p.is_symlink() for p in created)

    pngs = sorted(png_dir.glob("*.png"))
    assert len(pngs) == len(HOSTILE_IDS)  # one distinct file per id, none lost to a clash
    for path in pngs:
        assert path.parent == png_dir and not path.name.startswith(".") and "\x00" not in path.name
        assert len(path.name.encode()) <= 255
    import csv

    with open(png_dir / "index.csv", newline="", encoding="utf-8") as handle:
        index = {row["image_id"]: row["file"] for row in csv.DictReader(handle)}
    assert set(index) == set(HOSTILE_IDS) and len(set(index.values())) == len(HOSTILE_IDS)
    assert all((png_dir / name).is_file() for name in index.values())

    thumbs = [p for p in created if p.is_file() and p.parent.name == "thumbs"]
    assert len(thumbs) >= len(HOSTILE_IDS)
    pages = "".join(p.read_text(encoding="utf-8") for p in gallery_dir.glob("*.html"))
    assert "<script>alert(1)</script>" not in pages and "&lt;script&gt;alert(1)&lt;/script&gt;" in pages
