"""Training on the labels (issue 14): input images joined with their label rows by source, the same
resize for image and mask, error rows skipped and counted; the example trains and its loss falls.
The per-batch steps of the Ray Data builder (``diffcut.tools.training.ray_dataset``) are checked here without
Ray, the builder itself in tests/test_webdataset.py (Ray Data's join on the labels of S3 shards)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcut.job import schema
from diffcut.tools.training import LabeledImages, collate_instances, image_and_target, resize_labels

REPO = Path(__file__).resolve().parents[1]


def _png(pixels: np.ndarray) -> bytes:
    import io

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


def test_labeled_images_join_by_source_skip_and_count(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    scene = np.zeros((30, 40, 3), np.uint8)
    scene[:, 20:] = 200
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (images / name).write_bytes(_png(scene))
    (images / "e.png").write_bytes(b"changed since it was labeled")
    labels = tmp_path / "labels"
    labels.mkdir()
    rows = [
        _ok_row(str(images / "a.png"), _halves(40, 30, 0.5)),
        _ok_row(str(images / "b.png"), np.zeros((30, 40), np.int64)),
        schema.error_row(str(images / "c.png"), str(images / "c.png"), "not an image"),
        _ok_row(str(images / "e.png"), np.zeros((30, 40), np.int64)),
    ]  # d.png: no label row
    import pyarrow.parquet as pq

    pq.write_table(schema.rows_to_table(rows), labels / "labels-test-0.parquet")

    dataset = LabeledImages(str(images), str(labels), size=(20, 16))
    pairs = list(dataset)
    assert dict(dataset.counts) == {"pairs": 2, "error_rows": 1, "unlabeled": 1, "unreadable": 1}
    image, target = pairs[0]
    assert image.shape == (3, 16, 20) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert target["masks"].shape == (2, 16, 20) and target["segment_ids"].tolist() == [0, 1]
    assert target["masks"].sum(0).eq(1).all()  # every pixel in exactly one segment
    batch_images, batch_targets = next(
        iter(torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_instances))
    )
    assert batch_images.shape == (2, 3, 16, 20) and [t["masks"].shape[0] for t in batch_targets] == [2, 1]
    with pytest.raises(ValueError, match="classes"):
        LabeledImages(str(images), str(labels), target="semantic")


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


def test_ray_dataset_steps_give_the_pairs_of_labeled_images(monkeypatch):
    """The per-batch steps of ``ray_dataset`` (read units -> (source, bytes); label rows -> ok rows;
    joined rows -> image / target arrays), chained here with a plain join on source, give what
    LabeledImages gives. (The Ray Data wiring itself, read_parquet + Dataset.join + map_batches,
    took 15 to 32 s of Ray Data start-up per run on this 2-core machine, measured; the README's
    example runs it, CI does not.)"""
    import pyarrow as pa

    from diffcut.tools.training import _ok_targets, _pairs, _read_sources, input_units, read_targets

    monkeypatch.chdir(REPO)
    images = _read_sources(input_units("samples"), image_column="image")
    targets = _ok_targets(read_targets(classes="examples/sample-classes"))
    joined = images.join(targets, keys="source", join_type="inner")
    assert joined.num_rows == 6
    arrays = _pairs(joined, size=(32, 24), max_image_pixels=10**9)
    assert arrays["image"].shape == (6, 3, 24, 32) and arrays["image"].dtype == np.float32
    assert arrays["target"].shape == (6, 24, 32) and arrays["target"].dtype == np.int64
    local = {
        image.numpy().tobytes(): target
        for image, target in LabeledImages("samples", classes="examples/sample-classes", size=(32, 24))
    }
    for image, target in zip(arrays["image"], arrays["target"]):
        assert np.array_equal(local[image.tobytes()].numpy(), target)
    assert _pairs(
        pa.table({"data": pa.array([b"junk"]), "mask": pa.array([b"x"])}), size=(8, 8), max_image_pixels=10**9
    )["image"].shape == (0, 3, 8, 8)
