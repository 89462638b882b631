"""Training on the labels (issue 14): every unit's input images paired with that unit's label rows by
source, the same resize for image and mask, error rows skipped and counted; the example trains and its
loss falls. Hand-built outputs of every input kind check the pairing without Ray; a real labeling run
(tiny model, one local Ray for the module) checks the records the job writes, and that the Ray Data
builder gives the pairs of :class:`LabeledImages` with reads and maps only: no join, no shuffle."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_webdataset import TINY

from diffcut.job import inputs, schema, units, webdataset
from diffcut.tools.training import LabeledImages, collate_instances, image_and_target, ray_dataset, resize_labels

REPO = Path(__file__).resolve().parents[1]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _halves(width: int, height: int, split: float) -> np.ndarray:
    """Label map: 0 left of ``split * width``, 1 right of it."""
    labels = np.zeros((height, width), np.int64)
    labels[:, int(round(split * width)) :] = 1
    return labels


def test_image_and_mask_get_the_same_resize():
    # An 80x60 image, red left of x = 20, blue right of it; its mask at half size (40x30), as
    # --mask-size 40 stores it. Both go to 32x32: the mask's boundary must sit on the image's.
    pixels = np.zeros((60, 80, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    mask = _halves(40, 30, 0.25)
    image, labels = image_and_target(_png(pixels), schema.encode_mask(mask), (32, 32))
    assert image.shape == (32, 32, 3) and labels.shape == (32, 32) and labels.dtype == np.int64
    assert set(np.unique(labels)) == {0, 1}  # nearest: no blended ids
    red = image[..., 0] > image[..., 2]
    assert (red == (labels == 0)).mean() > 0.96  # disagreement only on the boundary column
    assert np.array_equal(resize_labels(mask, (40, 30)), mask)


# ------------------------------------------------------------------------ hand-built outputs, no Ray
def _ok_row(source: str, mask: np.ndarray) -> dict:
    k = int(mask.max()) + 1
    return schema.ok_row(
        image_id=source,
        source=source,
        width=mask.shape[1],
        height=mask.shape[0],
        mask=mask,
        latent_labels=np.zeros((2, 2), np.int64),
        descriptors=np.eye(k, 4, dtype=np.float32),
        tree="{}",
        params="{}",
    )


def _write_unit(output: Path, unit: str, rows: list[dict], **record) -> None:
    """One unit of an output as the job lays it out: its label file, then its done record."""
    table = schema.rows_to_table(rows)
    units.put_durably(units.label_file(str(output), unit), units.table_bytes(table))
    ok = sum(row["status"] == schema.STATUS_OK for row in rows)
    units.write_record(
        str(output),
        units.UnitRecord(unit, rows=len(rows), ok=ok, error=len(rows) - ok, bytes=0, params="{}", run_id="t", **record),
    )


def _scene() -> np.ndarray:
    scene = np.zeros((30, 40, 3), np.uint8)
    scene[:, 20:] = 200
    return scene


def test_labeled_images_pair_each_unit_by_source_skip_and_count(tmp_path):
    # Image files: a chunk whose record lists its files (d.png is in no unit: never read).
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (images / name).write_bytes(_png(_scene()))
    (images / "e.png").write_bytes(b"changed since it was labeled")
    root = inputs.canonical_input(str(images))
    a, b, c, e, gone = (f"{root}/{name}" for name in ("a.png", "b.png", "c.png", "e.png", "gone.png"))
    rows = [
        _ok_row(a, _halves(40, 30, 0.5)),
        _ok_row(b, np.zeros((30, 40), np.int64)),
        schema.error_row(c, c, "not an image"),
        _ok_row(e, np.zeros((30, 40), np.int64)),
        _ok_row(gone, np.zeros((30, 40), np.int64)),  # deleted since
    ]
    _write_unit(tmp_path / "image-labels", "images-t-000000", rows, sources=[a, b, c, e, gone])
    dataset = LabeledImages(str(images), str(tmp_path / "image-labels"), size=(20, 16))
    pairs = list(dataset)
    assert dict(dataset.counts) == {"pairs": 2, "error_rows": 1, "unreadable": 2}
    image, target = pairs[0]
    assert image.shape == (3, 16, 20) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert target["masks"].shape == (2, 16, 20) and target["segment_ids"].tolist() == [0, 1]
    assert target["masks"].sum(0).eq(1).all()  # every pixel in exactly one segment
    batch_images, batch_targets = next(
        iter(torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_instances))
    )
    assert batch_images.shape == (2, 3, 16, 20) and [t["masks"].shape[0] for t in batch_targets] == [2, 1]

    # A Parquet file cut by --limit (complete False): its rows are read, the row after them is unlabeled.
    (tmp_path / "parquet").mkdir()
    file = tmp_path / "parquet" / "part.parquet"
    pq.write_table(pa.table({"image": [_png(_scene())] * 3}), file)
    file_uri = f"{inputs.canonical_input(str(tmp_path / 'parquet'))}/part.parquet"
    row0, row1 = inputs.parquet_source(file_uri, 0), inputs.parquet_source(file_uri, 1)
    rows = [_ok_row(row0, _halves(40, 30, 0.5)), schema.error_row(row1, row1, "too small")]
    _write_unit(tmp_path / "parquet-labels", "part.parquet", rows, input=file_uri, complete=False)
    dataset = LabeledImages(str(tmp_path / "parquet"), str(tmp_path / "parquet-labels"), size=(20, 16))
    assert len(list(dataset)) == 1 and dict(dataset.counts) == {"pairs": 1, "error_rows": 1, "unlabeled": 1}

    # A WebDataset shard: records known only by reading it.
    (tmp_path / "wds").mkdir()
    webdataset.write_shard(tmp_path / "wds" / "00000.tar", [("k0.png", _png(_scene())), ("k1.png", _png(_scene()))])
    shard_uri = f"{inputs.canonical_input(str(tmp_path / 'wds'))}/00000.tar"
    rows = [_ok_row(webdataset.shard_source(shard_uri, key), _halves(40, 30, 0.25)) for key in ("k0", "k1")]
    _write_unit(tmp_path / "wds-labels", "00000.tar", rows, input=shard_uri)
    dataset = LabeledImages(str(tmp_path / "wds"), str(tmp_path / "wds-labels"), size=(20, 16))
    assert len(list(dataset)) == 2 and dict(dataset.counts) == {"pairs": 2}

    # The labels name their input: another input, or none, is refused in one line.
    with pytest.raises(inputs.InputError, match="not under"):
        LabeledImages(str(tmp_path / "wds"), str(tmp_path / "image-labels"))
    with pytest.raises(inputs.InputError, match="no input at"):
        LabeledImages(str(tmp_path / "missing"), str(tmp_path / "image-labels"))
    with pytest.raises(ValueError, match="classes"):
        LabeledImages(str(images), str(tmp_path / "image-labels"), target="semantic")


def test_an_input_that_is_the_working_directory(tmp_path, monkeypatch):
    # `--input .`: files are listed relative to it; two files of one name in two folders are two units.
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        pq.write_table(pa.table({"image": [_png(_scene())]}), tmp_path / folder / "x.parquet")
    monkeypatch.chdir(tmp_path)
    plan = inputs.plan_inputs(inputs.list_inputs("."))
    assert sorted(plan.inputs.items()) == [("a%2Fx.parquet", "a/x.parquet"), ("b%2Fx.parquet", "b/x.parquet")]
    for unit, file_uri in plan.inputs.items():
        source = inputs.parquet_source(file_uri, 0)
        _write_unit(tmp_path / "out", unit, [_ok_row(source, _halves(40, 30, 0.5))], input=file_uri)
    dataset = LabeledImages(".", "out", size=(20, 16))
    assert len(list(dataset)) == 2 and dict(dataset.counts) == {"pairs": 2}


def test_example_trains_on_the_bundled_labels_and_its_loss_falls(monkeypatch):
    import importlib.util

    monkeypatch.chdir(REPO)  # the bundled label rows name the sample images relative to the repository
    spec = importlib.util.spec_from_file_location("train_segmenter", REPO / "examples" / "train_segmenter.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.train("samples", "examples/sample-classes", steps=40, size=48, seed=0, log=lambda _: None)
    assert len(losses) == 40 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, (first, last)


# ------------------------------------------------------------------------ a real labeling run, Ray Data
@pytest.fixture(scope="module")
def labeled_parquet(ray_local, tmp_path_factory):
    """Two Parquet files (five rows, one without image bytes) labeled by the real job: (input, output)."""
    from diffcut.job.pipeline import label_dataset
    from diffcut.job.settings import job_arguments

    root = tmp_path_factory.mktemp("training")
    (root / "input").mkdir()
    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(4):
        pixels = np.zeros((32, 48, 3), np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        pixels[16:, :24] = rng.integers(0, 256, 3)
        scenes.append(_png(pixels))
    first = pa.table({"image": pa.array([scenes[0], None, scenes[1]], pa.binary())})  # no bytes: an error row
    pq.write_table(first, root / "input" / "a.parquet")
    pq.write_table(pa.table({"image": scenes[2:]}), root / "input" / "b.parquet")
    summary = label_dataset(str(root / "input"), str(root / "labels"), **job_arguments(dict(TINY)))
    assert (summary["ok"], summary["error"]) == (4, 1)
    return str(root / "input"), str(root / "labels")


def _executed_operators(dataset) -> tuple[list[str], set[str]]:
    """(the operators of the executed dataset's stats, the names of its logical plan's operators)."""
    executed = re.findall(r"^Operator \d+ (.+?): ", dataset.stats(), flags=re.MULTILINE)
    logical, todo = set(), [dataset._logical_plan.dag]
    while todo:
        operator = todo.pop()
        logical.add(operator.name)
        todo.extend(operator.input_dependencies)
    return executed, logical


@pytest.mark.slow
def test_ray_dataset_pairs_each_unit_locally_without_a_shuffle(labeled_parquet, tmp_path):
    from diffcut.method.kmeans import assign_classes
    from diffcut.tools.discover import write_centroids

    input, labels = labeled_parquet
    # The job records each Parquet file by its canonical URI under the input's listing root.
    root = inputs.list_inputs(input).root
    records = units.read_records(labels)
    assert root == str(Path(input).resolve())
    assert [(r.unit, r.input, r.ok, r.error, r.complete) for r in records] == [
        ("a.parquet", f"{root}/a.parquet", 2, 1, True),
        ("b.parquet", f"{root}/b.parquet", 2, 0, True),
    ]

    local = LabeledImages(input, labels, size=(24, 16))
    ordered = list(local)
    pairs = {image.numpy().tobytes(): target for image, target in ordered}
    assert len(pairs) == 4 and dict(local.counts) == {"pairs": 4, "error_rows": 1}
    built = ray_dataset(input, labels, size=(24, 16), cpus_per_task=0.5, pairs_per_batch=1)
    assert (built.units, built.labeled, built.error_rows) == (2, 4, 1)  # from the records
    batches = list(built.dataset.iter_torch_batches(batch_size=3))
    images, targets = torch.cat([b["image"] for b in batches]), torch.cat([b["target"] for b in batches])
    assert images.shape == (4, 3, 16, 24) and targets.shape == (4, 16, 24) and targets.dtype == torch.int64
    for image, target in zip(images, targets):
        wanted = pairs[image.numpy().tobytes()]  # the same image, resized alike, and its masks
        assert torch.equal(wanted["masks"], target[None] == wanted["segment_ids"][:, None, None])

    # What ran: the unit rows and one map over them; no operator that moves rows between tasks.
    executed, logical = _executed_operators(built.dataset)
    assert executed == ["FromItems", "MapBatches(join_units)"] and logical == set(executed), (executed, logical)
    moving = re.compile(r"\bJoin|HashShuffle|Shuffle|Aggregate|Repartition|Sort|GroupBy|Zip|Union")
    assert not moving.search(built.dataset.stats()) and not any(moving.search(name) for name in logical)

    # Semantic targets from discover's centroids, per unit: every segment id replaced by its class.
    dim = len(schema.read_labels(labels, columns=["segments"]).column("segments")[0].as_py()[0]["descriptor"])
    centroids = np.random.default_rng(1).normal(size=(3, dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    write_centroids(str(tmp_path / "classes"), centroids, {"labels": labels})
    semantic = list(LabeledImages(input, classes=str(tmp_path / "classes"), size=(24, 16)))
    # Units in order, rows in input order: the order of the ok label rows (sorted by source in each unit).
    rows = [row for row in schema.read_labels(labels, columns=["status", "segments"]).to_pylist() if row["segments"]]
    assert len(semantic) == len(rows) == 4
    for (image, target), (instance_image, instance), row in zip(semantic, ordered, rows):
        assert torch.equal(image, instance_image)
        class_ids = torch.from_numpy(assign_classes(np.array([s["descriptor"] for s in row["segments"]]), centroids)[0])
        segments = (instance["masks"] * instance["segment_ids"][:, None, None]).sum(0)
        assert torch.equal(target, class_ids.to(torch.int64)[segments])
    classes = {image.numpy().tobytes(): target for image, target in semantic}
    built = ray_dataset(input, classes=str(tmp_path / "classes"), size=(24, 16), cpus_per_task=0.5)
    batches = list(built.dataset.iter_torch_batches(batch_size=4))
    images, targets = torch.cat([b["image"] for b in batches]), torch.cat([b["target"] for b in batches])
    assert len(images) == 4 and all(torch.equal(classes[i.numpy().tobytes()], t) for i, t in zip(images, targets))
