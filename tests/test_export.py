"""diffcut export: COCO JSON with RLE masks (read back with pycocotools) and folders of label-map PNGs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffcut.cli import main as cli_main
from diffcut.evaluation.protocol import resize_nearest
from diffcut.job import schema
from diffcut.method.assign import segment_stats
from diffcut.method.kmeans import spherical_kmeans
from diffcut.method.segmenter import segment_features
from diffcut.tools.discover import CLASSES_PREFIX, write_centroids
from diffcut.tools.discover_batches import classify_batch
from diffcut.tools.export import UniqueNames, export_coco, export_png, safe_stem

pycocotools = pytest.importorskip("pycocotools", reason="pycocotools (the `export` extra) is not installed")

# pycocotools' decoder trips a numpy 2 deprecation inside the library (not in diffcut code).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

HOSTILE_IDS = [
    "../../etc/passwd",
    "..",
    ".",
    "/",
    "",
    "a/../../b.jpg",
    "..\\..\\windows\\x.png",
    "/abs/path/img.JPG",
    "s3://bucket/key/2007_000032.jpg",
    "x.parquet#row=5",
    ".hidden",
    "a/b c?*<>|:.jpg",
    "nul\x00byte.png",
    "ñandú/ñandú.jpg",
    "very" * 40 + ".png",
    "con",
    "trailing/",
]


# ------------------------------------------------------------------------ names
def test_safe_stem_keeps_names_inside_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for image_id in HOSTILE_IDS:
        stem = safe_stem(image_id)
        assert stem and "/" not in stem and "\\" not in stem and "\x00" not in stem
        assert not stem.startswith(".") and len(stem) <= 60
        target = (out / f"{stem}.png").resolve()
        assert target.parent == out.resolve(), image_id
    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("dir/2007_000032.jpg") == "2007_000032"  # the name VOC pairs with the image
    assert safe_stem("s3://bucket/key/2007_000032.jpg") == "2007_000032"
    assert safe_stem("a\\b\\c.png") == "c"
    assert safe_stem("x.parquet#row=5") == "x.parquet_row_5"  # not an image extension: kept, made safe
    assert safe_stem("ñandú/ñandú.jpg") == "ñandú"
    assert safe_stem("..").startswith("image-") and safe_stem("") != safe_stem("..")


def test_unique_names_never_share_a_file():
    names = UniqueNames()
    first, second, third = names("a/x.jpg"), names("b/x.jpg"), names("c/x.png")
    assert first == "x" and len({first, second, third}) == 3 and second.startswith("x-")
    assert names("b/x.jpg") == second and names.renamed == 2


# ------------------------------------------------------------------------ test outputs
def planted_features(seed, size=12, channels=16):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, channels))
    yy, xx = np.mgrid[0:size, 0:size]
    return (centers[(yy // 6) * 2 + xx // 6] + 0.3 * rng.normal(size=(size, size, channels))).astype(np.float32)


def _row(image_id, result, width, height):
    return schema.ok_row(
        image_id=image_id,
        source=f"src/{image_id}",
        width=width,
        height=height,
        mask=result.mask,
        latent_labels=result.latent_labels,
        descriptors=result.embeddings,
        tree=result.tree.to_dict(),
        params=schema.params_json({"tau": 0.5}),
    )


@pytest.fixture(scope="module")
def labels_dir(tmp_path_factory, write_unit):
    """A labeling output: rows built as the job builds them, with awkward ids, a 16-bit mask, a mask stored at
    another size than its image, and an error row; two units."""
    rows = [
        _row("dir/a/cat.jpg", segment_features(planted_features(0), (48, 64), tau=0.5), 64, 48),
        _row("dir/b/cat.jpg", segment_features(planted_features(1), (30, 40), tau=0.5), 80, 60),  # resized
        _row("../../etc/passwd", segment_features(planted_features(2), (40, 40), tau=0.5), 40, 40),
        # 300 singleton segments: the mask needs 16 bits.
        _row(
            "many.png",
            segment_features(np.random.default_rng(3).normal(size=(15, 20, 16)).astype(np.float32), (15, 20), tau=1e9),
            20,
            15,
        ),
        schema.error_row("broken.jpg", "src/broken.jpg", "not an image (12 bytes)", params="{}"),
    ]
    assert int(schema.decode_mask(rows[3]["mask"]).max()) == 299
    directory = tmp_path_factory.mktemp("labels")
    write_unit(directory, "t-0", schema.rows_to_table(rows[:2]), schema.params_json({"tau": 0.5}))
    write_unit(directory, "t-1", schema.rows_to_table(rows[2:]), schema.params_json({"tau": 0.5}))
    return directory


@pytest.fixture(scope="module")
def classes_dir(labels_dir, tmp_path_factory):
    """A discover output made with the discover job's own functions (fit + pass 2), without Ray."""
    table = schema.read_labels(str(labels_dir))
    descriptors = np.array(
        [s["descriptor"] for segments in table.column("segments").to_pylist() if segments for s in segments]
    )
    fit = spherical_kmeans(descriptors, 3, seed=0)
    directory = tmp_path_factory.mktemp("classes")
    pq.write_table(classify_batch(table, centroids=fit.centroids), directory / f"{CLASSES_PREFIX}t-0.parquet")
    write_centroids(str(directory), fit.centroids, {"seed": 0})
    return directory


def ok_rows(labels_dir):
    return [r for r in schema.read_labels(str(labels_dir)).to_pylist() if r["status"] == "ok"]


# ------------------------------------------------------------------------ COCO
def test_coco_json_loads_and_every_rle_equals_its_segment(labels_dir, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out = tmp_path / "coco" / "labels.json"
    summary = export_coco(str(labels_dir), str(out))
    coco = COCO(str(out))
    rows = ok_rows(labels_dir)
    assert (summary.images, summary.error_rows) == (len(rows), 1)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["segment"]
    by_name = {image["file_name"]: image for image in coco.loadImgs(coco.getImgIds())}
    assert set(by_name) == {r["image_id"] for r in rows}
    total = 0
    for row in rows:
        image = by_name[row["image_id"]]
        assert (image["width"], image["height"]) == (row["width"], row["height"])
        mask = resize_nearest(schema.decode_mask(row["mask"]), (row["height"], row["width"]))
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        stats = segment_stats(mask, num_segments=row["num_segments"])
        present = np.flatnonzero(stats.area)
        assert [a["diffcut_segment_id"] for a in annotations] == present.tolist()  # no empty segments
        for annotation in annotations:
            segment = annotation["diffcut_segment_id"]
            np.testing.assert_array_equal(coco.annToMask(annotation), (mask == segment).astype(np.uint8))
            decoded = mask_utils.decode(annotation["segmentation"])
            np.testing.assert_array_equal(decoded, mask == segment)
            assert annotation["area"] == stats.area[segment]
            x0, y0, x1, y1 = stats.bbox[segment]
            assert annotation["bbox"] == [x0, y0, x1 - x0, y1 - y0]  # COCO [x, y, w, h]
            assert annotation["iscrowd"] == 0 and annotation["category_id"] == 1
        if (row["mask_width"], row["mask_height"]) == (row["width"], row["height"]):
            # Stored at the image size: the stored areas and boxes are the COCO ones.
            assert [a["area"] for a in annotations] == [row["segments"][k]["area"] for k in present]
        total += len(annotations)
    assert total == summary.annotations == len(coco.getAnnIds())
    assert total > 300


def test_coco_categories_from_discovered_classes(labels_dir, classes_dir, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "classes.json"
    assert (
        cli_main(
            [
                "export",
                "-i",
                str(labels_dir),
                "-f",
                "coco",
                "-o",
                str(out),
                "--classes",
                str(classes_dir),
                "--relative-to",
                "dir/",
            ]
        )
        == 0
    )
    coco = COCO(str(out))
    file_names = sorted(image["file_name"] for image in coco.loadImgs(coco.getImgIds()))
    assert file_names == ["../../etc/passwd", "a/cat.jpg", "b/cat.jpg", "many.png"]
    assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [1, 2, 3]
    classes = {r["source"]: r["class_ids"] for r in pq.read_table(next(classes_dir.glob("*.parquet"))).to_pylist()}
    sources = {image["id"]: image["diffcut_source"] for image in coco.loadImgs(coco.getImgIds())}
    for annotation in coco.loadAnns(coco.getAnnIds()):
        class_ids = classes[sources[annotation["image_id"]]]
        assert annotation["category_id"] == class_ids[annotation["diffcut_segment_id"]] + 1


# ------------------------------------------------------------------------ PNG
def test_png_folders_decode_to_the_masks(labels_dir, tmp_path):
    out = tmp_path / "nested" / "png"
    before = set(tmp_path.rglob("*"))
    summary = export_png(str(labels_dir), str(out))
    written = set(tmp_path.rglob("*")) - before
    assert all(out in p.parents or p == out or p in out.parents for p in written)  # nothing outside OUT
    rows = ok_rows(labels_dir)
    assert (summary.images, summary.error_rows, summary.renamed) == (len(rows), 1, 1)
    with open(out / "index.csv", newline="", encoding="utf-8") as handle:
        index = list(csv.DictReader(handle))
    assert len(index) == len(rows) + 1
    files = {entry["image_id"]: entry["file"] for entry in index}
    assert files["../../etc/passwd"] == "passwd.png" and files["dir/a/cat.jpg"] == "cat.png"
    assert files["dir/b/cat.jpg"].startswith("cat-") and files["broken.jpg"] == ""
    assert sorted(p.name for p in out.iterdir()) == sorted([*filter(None, files.values()), "index.csv"])
    for row in rows:
        with Image.open(out / files[row["image_id"]]) as picture:
            mode = picture.mode
            values = np.asarray(picture)
        np.testing.assert_array_equal(values, schema.decode_mask(row["mask"]))
        assert mode == ("L" if row["num_segments"] <= 256 else "I;16")


def test_png_with_classes_and_palette(labels_dir, classes_dir, tmp_path):
    out = tmp_path / "semantic"
    assert (
        cli_main(
            ["export", "-i", str(labels_dir), "-f", "png", "-o", str(out), "--classes", str(classes_dir), "--palette"]
        )
        == 0
    )
    classes = {r["source"]: r["class_ids"] for r in pq.read_table(next(classes_dir.glob("*.parquet"))).to_pylist()}
    files = {e["image_id"]: e["file"] for e in csv.DictReader(open(out / "index.csv", newline="", encoding="utf-8"))}
    for row in ok_rows(labels_dir):
        with Image.open(out / files[row["image_id"]]) as picture:
            assert picture.mode == "P"
            values = np.asarray(picture)
        expected = np.asarray(classes[row["source"]])[schema.decode_mask(row["mask"])]
        np.testing.assert_array_equal(values, expected)


def test_export_reads_and_writes_s3(labels_dir, s3_bucket, tmp_path, capsys):
    import boto3

    client = boto3.client("s3")
    for path in labels_dir.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"labels/{path.relative_to(labels_dir).as_posix()}")
    assert (
        cli_main(["export", "-i", f"s3://{s3_bucket}/labels", "-f", "png", "-o", f"s3://{s3_bucket}/png", "--json"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 4
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="png/")["Contents"]}
    assert "png/passwd.png" in keys and "png/index.csv" in keys and len(keys) == 5
    body = client.get_object(Bucket=s3_bucket, Key="png/many.png")["Body"].read()
    many = next(r for r in ok_rows(labels_dir) if r["image_id"] == "many.png")
    np.testing.assert_array_equal(schema.decode_mask(body), schema.decode_mask(many["mask"]))
    assert (
        cli_main(["export", "-i", f"s3://{s3_bucket}/labels", "-f", "coco", "-o", f"s3://{s3_bucket}/coco/labels.json"])
        == 0
    )
    document = json.loads(client.get_object(Bucket=s3_bucket, Key="coco/labels.json")["Body"].read())
    assert len(document["images"]) == 4 and document["annotations"]


def test_command_line_errors(labels_dir, tmp_path, capsys):
    assert cli_main(["export", "-i", str(labels_dir), "-f", "coco", "-o", str(tmp_path / "a.json"), "--palette"]) == 2
    assert "--palette" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "export",
                "-i",
                str(labels_dir),
                "-f",
                "png",
                "-o",
                str(tmp_path / "p"),
                "--classes",
                str(tmp_path / "missing"),
            ]
        )
        == 2
    )
    assert "discover output" in capsys.readouterr().err
