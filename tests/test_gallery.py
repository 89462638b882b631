"""diffcut gallery: static HTML pages of labeled images; checked in headless Chromium where it is installed."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_webdataset import TINY

from diffcut.cli import main as cli_main
from diffcut.job import schema
from diffcut.method.segmenter import segment_features
from diffcut.tools.gallery import SourceReader, build_gallery, thumbnail_size

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def render_in_chromium(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after its scripts ran, from headless Chromium (no network, no GPU, no sandbox)."""
    browser = find_browser()
    if browser is None:
        pytest.skip("headless browser test skipped: no chromium on PATH (Debian: apt-get install chromium)")
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def image_sources(page_html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page_html)


def body_attribute(dom: str, name: str) -> str | None:
    match = re.search(r"<body[^>]*\s" + name + r'="([^"]*)"', dom)
    return match.group(1) if match else None


# ------------------------------------------------------------------------ rows without the model
def _row(image_id: str, source: str, mask_size=(30, 40), seed=0) -> dict:
    features = np.random.default_rng(seed).normal(size=(4, 5, 8)).astype(np.float32)
    result = segment_features(features, mask_size, tau=0.5)
    return schema.ok_row(
        image_id=image_id,
        source=source,
        width=mask_size[1],
        height=mask_size[0],
        mask=result.mask,
        latent_labels=result.latent_labels,
        descriptors=result.embeddings,
        tree=result.tree.to_dict(),
        params=schema.params_json({"model": "tiny-random", "tau": 0.5, "alpha": 10.0}),
    )


def test_sources_local_relative_and_parquet_rows(tmp_path, write_unit):
    """Relative paths resolve against --images; `file.parquet#row=N` reads row N's image bytes."""
    pictures = [np.full((30, 40, 3), value, np.uint8) for value in (20, 120, 240)]
    (tmp_path / "root" / "pics").mkdir(parents=True)
    Image.fromarray(pictures[0]).save(tmp_path / "root" / "pics" / "a.png")
    encoded = []
    for picture in pictures[1:]:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    parquet = tmp_path / "root" / "data.parquet"
    pq.write_table(pa.table({"img": [{"bytes": b, "path": None} for b in encoded]}), parquet, row_group_size=1)

    reader = SourceReader(str(tmp_path / "root"), image_column="img")
    assert reader.read("pics/a.png") == (tmp_path / "root" / "pics" / "a.png").read_bytes()
    assert reader.read("data.parquet#row=1") == encoded[1] and reader.read("data.parquet#row=0") == encoded[0]
    with pytest.raises(FileNotFoundError):
        reader.read("data.parquet#row=5")

    labels = tmp_path / "labels"
    rows = [
        _row("pics/a.png", "pics/a.png", seed=1),
        _row("second", "data.parquet#row=1", seed=2),
        _row("gone.png", "pics/gone.png", seed=3),
        schema.error_row("evil<script>.jpg", "pics/evil.jpg", "<script>alert(1)</script> & not an image"),
    ]
    write_unit(labels, "t-0", schema.rows_to_table(rows))
    out = tmp_path / "gallery"
    summary = build_gallery(str(labels), str(out), per_page=2, images_root=str(tmp_path / "root"), image_column="img")
    assert (summary.images, summary.with_picture, summary.without_picture, summary.error_rows, summary.pages) == (
        3,
        2,
        1,
        1,
        2,
    )
    thumbs = out / "thumbs"
    # The thumbnails are the images themselves (JPEG: within compression error of the flat colour).
    assert abs(int(np.asarray(Image.open(thumbs / "a.jpg")).mean()) - 20) <= 2
    assert abs(int(np.asarray(Image.open(thumbs / "second.jpg")).mean()) - 240) <= 2
    assert not (thumbs / "gone.jpg").exists() and (thumbs / "gone.mask.png").exists()
    first, second = (out / "index.html").read_text(), (out / "page-2.html").read_text()
    assert 'href="page-2.html"' in first and 'href="index.html"' in second
    assert "image unavailable (file not found" in second
    errors = (out / "errors.html").read_text()
    assert "<script>alert(1)</script>" not in errors
    assert html.escape("<script>alert(1)</script> & not an image") in errors
    assert html.escape("evil<script>.jpg") in errors
    # Every picture a page names exists, inside the gallery folder.
    for page in (first, second):
        for source in image_sources(page):
            assert (out / source).resolve().is_relative_to(out.resolve()) and (out / source).is_file()
    # Overlay and mask thumbnails: the same size as the image thumbnail.
    with Image.open(thumbs / "a.overlay.png") as overlay_picture:
        assert overlay_picture.size == (40, 30) and overlay_picture.mode == "RGB"


def test_thumbnail_size():
    assert thumbnail_size(1000, 500, 256) == (256, 128)
    assert thumbnail_size(100, 50, 256) == (100, 50)  # never enlarged
    assert thumbnail_size(5000, 1, 256) == (256, 1)


# ------------------------------------------------------------------------ a real labeling output, in a browser
@pytest.fixture(scope="module")
def labeled_on_s3(ray_local, s3_server, sample_dir, tmp_path_factory):
    """The sample images and a broken file on the loopback S3 server, labeled by the real job; then one image is
    deleted, as happens when a dataset moves after labeling. Returns (labels dir, bucket)."""
    import boto3

    from diffcut.job.pipeline import label_dataset
    from diffcut.job.settings import job_arguments

    bucket = f"gallery-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    names = sorted(p.name for p in sample_dir.iterdir() if p.suffix in (".jpg", ".png"))
    for name in names:
        client.upload_file(str(sample_dir / name), bucket, f"images/{name}")
    client.put_object(Bucket=bucket, Key="images/broken.jpg", Body=b"\xff\xd8 truncated")
    labels = tmp_path_factory.mktemp("gallery") / "labels"
    summary = label_dataset(
        f"s3://{bucket}/images",
        str(labels),
        **job_arguments(dict(TINY, resolution=128, mask_size="160", batch_size=4, ncut_pool_max=2)),
    )
    assert (summary["ok"], summary["error"]) == (len(names), 1)
    client.delete_object(Bucket=bucket, Key=f"images/{names[0]}")
    return labels, bucket, names


@pytest.mark.slow
def test_gallery_of_a_real_output_renders_in_chromium(labeled_on_s3, tmp_path, capsys):
    labels, bucket, names = labeled_on_s3
    out = tmp_path / "gallery"
    assert cli_main(["gallery", "--input", str(labels), "--out", str(out), "--per-page", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == len(names) and summary["error_rows"] == 1
    assert summary["without_picture"] == 1 and summary["pages"] == 2
    pages = [out / "index.html", out / "page-2.html"]
    texts = [p.read_text() for p in pages]
    joined = "".join(texts)
    assert joined.count('class="card"') == len(names)
    assert "tau 0.5 · alpha 10.0 · model tiny-random" in joined and "segments · image" in joined
    assert "image unavailable" in joined  # the deleted image: its segments alone, with the reason
    assert f"s3://{bucket}/images/broken.jpg" in (out / "errors.html").read_text()

    # Chromium opens the pages from disk; the page's script counts the pictures that decoded.
    for page, text in zip(pages, texts):
        expected = len(image_sources(text))
        assert expected >= 4
        dom = render_in_chromium(page, tmp_path / f"profile-{page.stem}")
        assert body_attribute(dom, "data-images-broken") == "0", dom[:2000]
        assert body_attribute(dom, "data-images-loaded") == str(expected)
    dom = render_in_chromium(out / "errors.html", tmp_path / "profile-errors")
    assert "broken.jpg" in dom
