"""Benchmark readers (the six released layouts), the paper preprocessing, and ``diffcut benchmark``.

Every layout is written for real in a temporary folder: a few tiny JPEG/PNG
images with raw label ids as the released datasets store them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffcut.cli import main
from diffcut.evaluation.datasets import (
    BENCHMARKS,
    apply_lookup,
    centre_square_crop_box,
    coco_stuff27_val_ids,
    label_maps,
    open_benchmark,
    paper_preprocess,
    resize_bilinear,
    resize_nearest_exact,
)

HEIGHT, WIDTH = 48, 64


def raw_label_map(values: tuple[int, int, int], seed: int) -> np.ndarray:
    """Left block, right block, bottom strip: three raw label ids."""
    labels = np.empty((HEIGHT, WIDTH), dtype=np.uint8)
    split = WIDTH // 2 + 4 * seed
    labels[:, :split], labels[:, split:] = values[0], values[1]
    labels[-8:, :] = values[2]
    return labels


def image_for(labels: np.ndarray, seed: int) -> np.ndarray:
    """An RGB image whose colours follow the label regions, with some noise."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(256, 3))
    image = palette[labels] + rng.normal(0, 8, size=labels.shape + (3,))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_pair(
    image_path: Path, label_path: Path, values: tuple[int, int, int], seed: int, palette: bool = False
) -> np.ndarray:
    labels = raw_label_map(values, seed)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_for(labels, seed)).save(image_path, quality=95)
    if palette:  # VOC ships palette PNGs: the pixel values are palette indices
        label_image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
        label_image.putpalette([int(v) for v in np.random.default_rng(0).integers(0, 256, 768)])
    else:
        label_image = Image.fromarray(labels)
    label_image.save(label_path)
    return labels


# raw ids per image (three regions), chosen to exercise every mapping
RAW = {
    "voc": [(0, 15, 255), (3, 0, 255), (20, 7, 0)],
    "context": [(0, 59, 12), (5, 0, 33), (1, 2, 0)],
    "context-d2": [(255, 58, 11), (4, 255, 32), (0, 1, 255)],
    "coco": [(0, 91, 255), (12, 120, 0), (181, 56, 255)],
    "cityscapes": [(7, 33, 3), (26, 11, 0), (21, 23, 24)],
    "ade20k": [(0, 1, 150), (3, 0, 17), (12, 150, 0)],
}
# the same regions in evaluation ids (255 = ignored)
EXPECTED = {
    "voc": [(0, 15, 255), (3, 0, 255), (20, 7, 0)],
    "context": [(0, 59, 12), (5, 0, 33), (1, 2, 0)],
    "context-d2": [(0, 59, 12), (5, 0, 33), (1, 2, 0)],
    "coco-stuff": [(9, 17, 255), (8, 14, 9), (24, 2, 255)],
    "coco-object": [(0, 80, 255), (11, 80, 0), (80, 51, 255)],
    "cityscapes": [(0, 26, 255), (19, 4, 255), (14, 16, 17)],
    "ade20k": [(255, 0, 149), (2, 255, 16), (11, 149, 255)],
}


def make_voc(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    ids = ["2007_000033", "2007_000042", "2007_000061"]
    for seed, (image_id, values) in enumerate(zip(ids, RAW["voc"])):
        write_pair(
            base / "JPEGImages" / f"{image_id}.jpg",
            base / "SegmentationClass" / f"{image_id}.png",
            values,
            seed,
            palette=True,
        )
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def make_context(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2010"
    ids = ["2008_000002", "2008_000003", "2008_000007"]
    for seed, (image_id, values) in enumerate(zip(ids, RAW["context"])):
        write_pair(
            base / "JPEGImages" / f"{image_id}.jpg", base / "SegmentationClassContext" / f"{image_id}.png", values, seed
        )
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def make_context_d2(root: Path) -> Path:
    base = root / "pascal_ctx_d2"
    ids = ["2008_000002", "2008_000003", "2008_000007"]
    for seed, (image_id, values) in enumerate(zip(ids, RAW["context-d2"])):
        write_pair(
            base / "images" / "validation" / f"{image_id}.jpg",
            base / "annotations_ctx59" / "validation" / f"{image_id}.png",
            values,
            seed,
        )
    return root


def make_coco(root: Path, images: str = "images/val2017", labels: str = "annotations/val2017") -> Path:
    base = root / "coco"
    for seed, (image_id, values) in enumerate(zip(coco_stuff27_val_ids()[:3], RAW["coco"])):
        write_pair(base / images / f"{image_id}.jpg", base / labels / f"{image_id}.png", values, seed)
    return root


def make_cityscapes(root: Path) -> Path:
    base = root / "cityscapes"
    names = [
        ("frankfurt", "frankfurt_000000_000294"),
        ("frankfurt", "frankfurt_000000_000576"),
        ("lindau", "lindau_000000_000019"),
    ]
    for seed, ((city, prefix), values) in enumerate(zip(names, RAW["cityscapes"])):
        write_pair(
            base / "leftImg8bit" / "val" / city / f"{prefix}_leftImg8bit.png",
            base / "gtFine" / "val" / city / f"{prefix}_gtFine_labelIds.png",
            values,
            seed,
        )
    return root


def make_ade20k(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    for seed, values in enumerate(RAW["ade20k"]):
        name = f"ADE_val_{seed + 1:08d}"
        write_pair(
            base / "images" / "validation" / f"{name}.jpg",
            base / "annotations" / "validation" / f"{name}.png",
            values,
            seed,
        )
    return root


MAKERS = {
    "voc": (make_voc, "voc"),
    "context": (make_context, "context"),
    "context-d2": (make_context_d2, "context"),
    "coco-stuff": (make_coco, "coco-stuff"),
    "coco-object": (make_coco, "coco-object"),
    "cityscapes": (make_cityscapes, "cityscapes"),
    "ade20k": (make_ade20k, "ade20k"),
}


# --------------------------------------------------------------------------- readers
@pytest.mark.parametrize("layout", sorted(MAKERS))
def test_each_layout_yields_images_and_mapped_labels(tmp_path, layout):
    make, name = MAKERS[layout]
    limit = 3 if name.startswith("coco") else None  # only 3 of the 2,175 listed images exist here
    dataset = open_benchmark(name, make(tmp_path), limit=limit)
    samples = list(dataset)
    assert len(dataset) == len(samples) == 3
    assert dataset.num_classes == BENCHMARKS[name].num_classes
    assert dataset.background_class == BENCHMARKS[name].background_class
    for seed, (sample, expected) in enumerate(zip(samples, EXPECTED[layout])):
        assert sample.image.shape == (HEIGHT, WIDTH, 3) and sample.image.dtype == np.uint8
        assert sample.labels.dtype == np.uint8
        np.testing.assert_array_equal(sample.labels, raw_label_map(expected, seed))
        valid = sample.labels[sample.labels != 255]
        assert valid.size == 0 or valid.max() < dataset.num_classes


def test_ids_follow_the_official_lists(tmp_path):
    assert [s.image_id for s in open_benchmark("voc", make_voc(tmp_path / "a"))] == [
        "2007_000033",
        "2007_000042",
        "2007_000061",
    ]
    assert [s.image_id for s in open_benchmark("cityscapes", make_cityscapes(tmp_path / "b"))] == [
        "frankfurt_000000_000294",
        "frankfurt_000000_000576",
        "lindau_000000_000019",
    ]
    coco = open_benchmark("coco-stuff", make_coco(tmp_path / "c"), limit=2)
    assert [s.image_id for s in coco] == list(coco_stuff27_val_ids()[:2])


def test_root_may_be_the_dataset_folder_itself(tmp_path):
    make_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        assert len(open_benchmark("voc", root)) == 3
    make_ade20k(tmp_path)
    assert len(open_benchmark("ade20k", tmp_path / "ADEChallengeData2016", limit=2)) == 2


def test_coco_stuffthingmaps_unzipped_beside_val2017(tmp_path):
    make_coco(tmp_path, images="val2017", labels="stuffthingmaps_trainval2017/val2017")
    dataset = open_benchmark("coco-stuff", tmp_path, limit=3)
    assert [s.labels[0, 0] for s in dataset] == [9, 8, 24]


def test_missing_layout_names_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="SegmentationClassContext"):
        open_benchmark("context", tmp_path)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/val"):
        open_benchmark("cityscapes", tmp_path)


def test_missing_listed_files_are_reported(tmp_path):
    make_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"4 file\(s\) of the evaluation list are missing"):
        open_benchmark("coco-stuff", tmp_path, limit=5)
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000042.png").unlink()
    with pytest.raises(FileNotFoundError, match="2007_000042.png"):
        open_benchmark("voc", tmp_path)


def test_package_data_is_the_protocol_data():
    ids = coco_stuff27_val_ids()
    assert len(ids) == len(set(ids)) == 2175
    maps = label_maps()
    assert len(maps["coco_stuff_27"]["fine_index_to_coarse_index"]) == 182
    assert sorted(set(maps["coco_stuff_27"]["fine_index_to_coarse_index"].values())) == list(range(27))
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_stuff27_val_2175.txt"
    if shared.exists():  # the packaged copy must not drift from the project's data
        assert shared.read_text().split() == list(ids)


def test_lookup_ignores_ids_beyond_the_table():
    table = np.full(256, 255, dtype=np.uint8)
    table[1] = 0
    np.testing.assert_array_equal(apply_lookup(np.array([[1, 300, 0]]), table), [[0, 255, 255]])


# --------------------------------------------------------------------------- preprocessing
def test_centre_crop_box_as_published():
    # side min(H, W) - 1; offsets round((H - side) / 2) with round-half-to-even
    assert centre_square_crop_box(48, 64) == (0, 8, 47)  # (64 - 47) / 2 = 8.5 -> 8
    assert centre_square_crop_box(375, 500) == (0, 63, 374)  # VOC's common size
    assert centre_square_crop_box(1024, 2048) == (0, 512, 1023)  # (2048 - 1023) / 2 = 512.5 -> 512
    assert centre_square_crop_box(480, 640) == (0, 80, 479)  # 80.5 -> 80


@pytest.mark.parametrize(
    "shape, size", [((47, 47), (64, 64)), ((374, 374), (1024, 1024)), ((479, 479), (128, 128)), ((13, 7), (5, 9))]
)
def test_resizes_match_torch(shape, size):
    rng = np.random.default_rng(0)
    image = rng.random(shape + (3,), dtype=np.float32)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
    expected = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=False)
    np.testing.assert_allclose(resize_bilinear(image, size), expected[0].permute(1, 2, 0).numpy(), atol=1e-5)
    labels = rng.integers(0, 255, size=shape).astype(np.uint8)
    nearest = F.interpolate(torch.from_numpy(labels)[None, None].float(), size=size, mode="nearest-exact")
    np.testing.assert_array_equal(resize_nearest_exact(labels, size), nearest[0, 0].numpy().astype(np.uint8))


def test_paper_preprocess_crops_then_resizes():
    labels = raw_label_map((1, 2, 3), 0)
    image = image_for(labels, 0)
    pixels, resized = paper_preprocess(image, labels, resolution=94)
    assert pixels.shape == (94, 94, 3) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    crop = labels[0:47, 8:55]  # 47 x 47 centre crop, then x2 nearest
    np.testing.assert_array_equal(resized, np.kron(crop, np.ones((2, 2), dtype=np.uint8)))
    np.testing.assert_allclose(pixels, resize_bilinear(image[0:47, 8:55] / 255.0, (94, 94)), atol=1e-6)


# --------------------------------------------------------------------------- diffcut benchmark
ROW = re.compile(r"^(without|with) PAMR\s+(\S+)\s+(\S+)\s+(\S+)$", re.MULTILINE)


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(MAKERS))
def test_benchmark_command_prints_ours_beside_the_paper(tmp_path, layout, capsys):
    make, name = MAKERS[layout]
    root = make(tmp_path)
    argv = [
        "benchmark",
        "--dataset",
        name,
        "--root",
        str(root),
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--resolution",
        "64",
        "--batch-size",
        "2",
        "--quiet",
    ]
    if name.startswith("coco"):
        argv += ["--limit", "3"]
    if layout in ("voc", "cityscapes"):  # PAMR inside the protocol, with and without a background class
        argv.append("--refine")
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {match[0]: match[1:] for match in ROW.findall(out)}
    assert set(rows) == ({"without", "with"} if "--refine" in argv else {"without"})
    spec = BENCHMARKS[name]
    ours, paper, accuracy = rows["without"]
    assert math.isfinite(float(ours)) and 0.0 <= float(ours) <= 100.0
    assert 0.0 <= float(accuracy) <= 100.0
    assert float(paper) == spec.paper_miou
    if "--refine" in argv:
        assert float(rows["with"][1]) == spec.paper_miou_pamr
        assert math.isfinite(float(rows["with"][0]))
    assert "3 images" in out


@pytest.mark.slow
def test_benchmark_json_scores_match_the_evaluator(tmp_path, capsys):
    """The JSON output equals scoring the same segmentations through the library path by hand."""
    from diffcut.evaluation.protocol import COMPARE_SIZE, SegmentationEvaluator
    from diffcut.method.features import FeatureExtractor
    from diffcut.method.segmenter import DiffCutSegmenter

    root = make_voc(tmp_path)
    assert (
        main(
            [
                "benchmark",
                "--dataset",
                "voc",
                "--root",
                str(root),
                "--model",
                "tiny-random",
                "--device",
                "cpu",
                "--resolution",
                "64",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["results"]["none"]["paper_miou"] == pytest.approx(0.62)

    segmenter = DiffCutSegmenter(FeatureExtractor.from_pretrained("tiny-random", device="cpu"))
    evaluator = SegmentationEvaluator(21, background_class=0, size=COMPARE_SIZE)
    for sample in open_benchmark("voc", root):
        image, labels = paper_preprocess(sample.image, sample.labels, 64)
        pixels = torch.from_numpy(image.transpose(2, 0, 1))[None]
        evaluator.update(segmenter.segment(pixels, mask_sizes=[COMPARE_SIZE])[0].mask, labels)
    assert report["results"]["none"]["miou"] == pytest.approx(evaluator.compute().miou)


def test_benchmark_reports_a_bad_root(tmp_path, capsys):
    assert main(["benchmark", "--dataset", "ade20k", "--root", str(tmp_path), "--model", "tiny-random"]) == 1
    assert "ADEChallengeData2016" in capsys.readouterr().err
