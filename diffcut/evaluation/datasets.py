"""Readers for the six zero-shot segmentation benchmarks of the DiffCut paper.

DiffCut (Couairon et al., NeurIPS 2024, arXiv:2406.02842, Table 1) reports
mIoU on Pascal VOC 2012, Pascal Context (59 classes + background),
COCO-Object (80 things + background), COCO-Stuff-27, Cityscapes (27 classes)
and ADE20K (150 classes). Each reader here takes a dataset in its standard
released layout and yields, per validation image,
``Sample(image_id, image (H, W, 3) uint8 RGB, labels (H, W) uint8)`` with the
labels already mapped to evaluation ids (``[0, N)``; 255 = ignored), plus the
dataset's :class:`BenchmarkSpec` (number of classes, background class).

The label mappings (COCO-Stuff fine -> 27, COCO fine -> 80 objects,
Cityscapes label ids -> 27) and the 2,175-image COCO-Stuff validation list
are package data (``diffcut/data``), extracted from the published evaluation.

:func:`paper_preprocess` (in :mod:`diffcut.evaluation.preprocess`, re-exported here) is the paper's
input pipeline (centre square crop, bilinear resize of the image to 1024; labels resized with nearest-exact); the
evaluator then compares at 128 x 128 (:mod:`diffcut.evaluation.protocol`).

This module needs numpy and Pillow only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from diffcut.evaluation.preprocess import (  # noqa: F401 - re-exported beside the readers
    centre_square_crop_box,
    paper_preprocess,
    resize_bilinear,
    resize_nearest_exact,
)

IGNORE = 255


@dataclass(frozen=True)
class BenchmarkSpec:
    """What a benchmark is scored with, and what the paper reached on it (Table 1, SSD-1B, mIoU %)."""

    name: str
    title: str
    num_classes: int
    background_class: int | None
    paper_miou: float  # without refinement
    paper_miou_pamr: float  # with PAMR
    ignore_index: int = IGNORE


# docs/method.md §2.6. Background ids are those of *our* label maps (below).
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("voc", "Pascal VOC 2012 val", 21, 0, 62.0, 65.2),
        BenchmarkSpec("context", "Pascal Context-59 val", 60, 0, 54.1, 56.5),
        BenchmarkSpec("coco-object", "COCO-Object val (2,175)", 81, 80, 32.0, 34.1),
        BenchmarkSpec("coco-stuff", "COCO-Stuff-27 val (2,175)", 27, None, 46.1, 49.1),
        BenchmarkSpec("cityscapes", "Cityscapes-27 val", 27, None, 28.4, 30.6),
        BenchmarkSpec("ade20k", "ADE20K-150 val", 150, None, 42.4, 44.3),
    )
}


@dataclass(frozen=True)
class Sample:
    image_id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray  # (H, W) uint8 evaluation ids, 255 ignored


# --------------------------------------------------------------------------- package data
@cache
def label_maps() -> dict:
    """The benchmark label mappings (``diffcut/data/benchmark_label_maps.json``)."""
    text = resources.files("diffcut").joinpath("data/benchmark_label_maps.json").read_text()
    return json.loads(text)


@cache
def coco_stuff27_val_ids() -> tuple[str, ...]:
    """The 2,175 COCO val2017 image ids of the COCO-Stuff-27 (and COCO-Object) protocol."""
    text = resources.files("diffcut").joinpath("data/coco_stuff27_val_2175.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """uint8 table ``source id -> evaluation id``; unmapped ids and -1 targets become 255."""
    table = np.full(size, IGNORE, dtype=np.uint8)
    for source, target in mapping.items():
        if 0 <= source < size and 0 <= target < IGNORE:
            table[source] = target
    return table


def apply_lookup(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map raw label ids through ``table``; ids beyond the table are ignored (255)."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, IGNORE, dtype=np.uint8)
    inside = (labels >= 0) & (labels < table.size)
    out[inside] = table[labels[inside]]
    return out


def _identity_table(num_classes: int) -> np.ndarray:
    return lookup_table({i: i for i in range(num_classes)})


def _shifted_table(num_classes: int, background_source: int | None) -> np.ndarray:
    """Source ``v`` -> ``v + 1`` for v < num_classes - 1; ``background_source`` -> 0."""
    mapping = {v: v + 1 for v in range(num_classes - 1)}
    if background_source is not None:
        mapping[background_source] = 0
    return lookup_table(mapping)


def voc_table() -> np.ndarray:
    """VOC SegmentationClass: 0 background, 1..20 classes, 255 object boundaries (ignored)."""
    return _identity_table(21)


def context_mmseg_table() -> np.ndarray:
    """mmsegmentation's SegmentationClassContext: 0 background, 1..59 classes."""
    return _identity_table(60)


def context_d2_table() -> np.ndarray:
    """The published code's ``annotations_ctx59``: 0..58 classes, 255 background -> our 1..59, 0."""
    return _shifted_table(60, background_source=255)


def ade20k_table() -> np.ndarray:
    """ADEChallengeData2016 annotations: 0 "other" (ignored), 1..150 classes -> 0..149."""
    return lookup_table({v: v - 1 for v in range(1, 151)})


def coco_stuff27_table() -> np.ndarray:
    """stuffthingmaps (COCO id - 1, 255 unlabeled) -> the 27 coarse classes."""
    mapping = label_maps()["coco_stuff_27"]["fine_index_to_coarse_index"]
    return lookup_table({int(k): int(v) for k, v in mapping.items()})


def coco_object_table() -> np.ndarray:
    """stuffthingmaps -> 80 thing classes 0..79; stuff ids (>= 91) -> background 80; 255 ignored.

    The published code maps stuff and unlabeled pixels alike to background;
    we keep unlabeled as ignored, which the background variant of the
    protocol turns into background anyway, so the scores are the same.
    """
    mapping = label_maps()["coco_object_81"]["fine_index_to_class"]
    background = BENCHMARKS["coco-object"].background_class
    table = {}
    for key, value in mapping.items():
        key, value = int(key), int(value)
        if key >= 91 and key != IGNORE:
            table[key] = background
        elif key < 91:
            table[key] = value
    return lookup_table(table)


def cityscapes27_table() -> np.ndarray:
    """gtFine ``labelIds`` (0..33) -> 27 classes; ids 0..6 (void) ignored."""
    mapping = label_maps()["cityscapes_27"]["label_id_to_class"]
    return lookup_table({int(k): int(v) for k, v in mapping.items()})


# --------------------------------------------------------------------------- vocabularies
#: The built-in vocabulary (``diffcut/data/vocabularies``, :mod:`diffcut.method.naming`) of each benchmark that has one.
BENCHMARK_VOCABULARIES = {"voc": "voc", "context": "context", "coco-object": "coco-object"}


def vocabulary_eval_ids(name: str, vocabulary_size: int) -> np.ndarray:
    """(V,) int64: the evaluation id (our label maps) of every vocabulary index, for benchmark ``name``.

    The published open-vocabulary extension puts "background" at vocabulary
    index 0 for every dataset (its labels are shifted by +1, background
    -1 -> 0). Our label maps agree for VOC (0 background, 1..20 in VOC order)
    and Context (0 background, 1..59 in Context-59 order, both layouts), so
    the map is the identity there. COCO-Object's maps put the 80 things at
    0..79 and background at 80 (:func:`coco_object_table`), so vocabulary
    index 0 -> 80 and k -> k - 1. A vocabulary for a benchmark without a
    built-in one lists its classes in evaluation-id order (identity).

    Raises:
        ValueError: the vocabulary does not have the benchmark's class count.
    """
    spec = BENCHMARKS[name]
    if vocabulary_size != spec.num_classes:
        fits = BENCHMARK_VOCABULARIES.get(name)
        hint = f"; the built-in vocabulary {fits!r} fits it" if fits else ""
        raise ValueError(
            f"the vocabulary has {vocabulary_size} classes but benchmark {name!r} ({spec.title}) "
            f"scores {spec.num_classes}{hint}"
        )
    if name == "coco-object":  # [80, 0, 1, ..., 79]
        return np.concatenate([[spec.background_class], np.arange(spec.num_classes - 1)]).astype(np.int64)
    return np.arange(vocabulary_size, dtype=np.int64)


# --------------------------------------------------------------------------- reading
def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (grayscale and CMYK JPEGs converted)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_label_png(path: str | Path) -> np.ndarray:
    """A single-channel label PNG as an integer array (palette PNGs give their indices)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            raise ValueError(f"{path}: a label map must be a single-channel PNG, got mode {image.mode}")
        return np.asarray(image)


class BenchmarkDataset:
    """One benchmark's validation images in order, read lazily.

    Iterating yields :class:`Sample`; ``len()`` is the number of images
    (after ``limit``).
    """

    def __init__(
        self, spec: BenchmarkSpec, root: Path, items: Sequence[tuple[str, Path, Path]], table: np.ndarray, layout: str
    ):
        self.spec = spec
        self.root = root
        self.items = list(items)
        self.table = table
        self.layout = layout

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def background_class(self) -> int | None:
        return self.spec.background_class

    @property
    def ignore_index(self) -> int:
        return self.spec.ignore_index

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Sample]:
        for image_id, image_path, label_path in self.items:
            yield self.read(image_id, image_path, label_path)

    def read(self, image_id: str, image_path: Path, label_path: Path) -> Sample:
        image = read_rgb(image_path)
        labels = apply_lookup(read_label_png(label_path), self.table)
        if labels.shape != image.shape[:2]:
            raise ValueError(f"{image_id}: image is {image.shape[:2]} but its labels are {labels.shape}")
        return Sample(image_id, image, labels)

    def __repr__(self) -> str:
        return (
            f"BenchmarkDataset({self.spec.name!r}, root={str(self.root)!r}, layout={self.layout!r}, images={len(self)})"
        )


class LayoutNotFound(FileNotFoundError):
    pass


def _first_existing(candidates: Sequence[Path], required: Sequence[str]) -> Path | None:
    for base in candidates:
        if all((base / part).exists() for part in required):
            return base
    return None


def _read_id_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _check_exist(items: Sequence[tuple[str, Path, Path]], name: str) -> None:
    missing = [str(p) for _, image, label in items for p in (image, label) if not p.is_file()]
    if missing:
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(f"{name}: {len(missing)} file(s) of the evaluation list are missing:\n  {shown}{more}")


def _voc_items(root: Path) -> tuple[Path, list, np.ndarray, str]:
    base = _first_existing(
        [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"],
        ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt"],
    )
    if base is None:
        raise LayoutNotFound(
            f"no Pascal VOC 2012 under {root}: expected VOCdevkit/VOC2012/{{JPEGImages, SegmentationClass, "
            "ImageSets/Segmentation/val.txt}} (or --root pointing at VOCdevkit or VOC2012)"
        )
    ids = _read_id_list(base / "ImageSets/Segmentation/val.txt")
    items = [(i, base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png") for i in ids]
    return base, items, voc_table(), "VOCdevkit/VOC2012"


def _context_items(root: Path) -> tuple[Path, list, np.ndarray, str]:
    mmseg = _first_existing(
        [root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"],
        ["JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt"],
    )
    if mmseg is not None:
        ids = _read_id_list(mmseg / "ImageSets/SegmentationContext/val.txt")
        items = [(i, mmseg / "JPEGImages" / f"{i}.jpg", mmseg / "SegmentationClassContext" / f"{i}.png") for i in ids]
        return mmseg, items, context_mmseg_table(), "mmseg VOC2010/SegmentationClassContext"
    d2 = _first_existing([root, root / "pascal_ctx_d2"], ["images/validation", "annotations_ctx59/validation"])
    if d2 is not None:
        labels = sorted((d2 / "annotations_ctx59/validation").glob("*.png"))
        items = [(p.stem, d2 / "images/validation" / f"{p.stem}.jpg", p) for p in labels]
        return d2, items, context_d2_table(), "pascal_ctx_d2/annotations_ctx59"
    raise LayoutNotFound(
        f"no Pascal Context under {root}: expected either mmsegmentation's layout VOCdevkit/VOC2010/"
        "{JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/val.txt} or the layout of the "
        "published DiffCut code, pascal_ctx_d2/{images/validation, annotations_ctx59/validation}"
    )


def _coco_items(root: Path, table: np.ndarray, limit: int | None) -> tuple[Path, list, np.ndarray, str]:
    ids = list(coco_stuff27_val_ids())
    if limit is not None:
        ids = ids[:limit]
    probe = ids[0] if ids else coco_stuff27_val_ids()[0]
    bases = [root, root / "coco"]
    image_dirs = [b / sub for b in bases for sub in ("images/val2017", "val2017", "images")]
    label_dirs = [
        b / sub
        for b in bases
        for sub in (
            "annotations/val2017",
            "stuffthingmaps_trainval2017/val2017",
            "stuffthingmaps/val2017",
            "annotations",
            "val2017",
        )
    ]
    image_dir = next((d for d in image_dirs if (d / f"{probe}.jpg").is_file()), None)
    label_dir = next((d for d in label_dirs if (d / f"{probe}.png").is_file()), None)
    if image_dir is None or label_dir is None:
        raise LayoutNotFound(
            f"no COCO-Stuff val2017 under {root} (looked for {probe}.jpg and {probe}.png): expected "
            "coco/images/val2017/*.jpg (or coco/val2017) and the stuffthingmaps PNGs in coco/annotations/val2017 "
            "(or coco/stuffthingmaps_trainval2017/val2017)"
        )
    items = [(i, image_dir / f"{i}.jpg", label_dir / f"{i}.png") for i in ids]
    return image_dir.parent, items, table, f"{image_dir.relative_to(root)} + {label_dir.relative_to(root)}"


def _cityscapes_items(root: Path) -> tuple[Path, list, np.ndarray, str]:
    base = _first_existing([root, root / "cityscapes"], ["leftImg8bit/val", "gtFine/val"])
    if base is None:
        raise LayoutNotFound(f"no Cityscapes under {root}: expected cityscapes/{{leftImg8bit/val, gtFine/val}}")
    items = []
    for image in sorted((base / "leftImg8bit/val").glob("*/*_leftImg8bit.png")):
        prefix = image.name[: -len("_leftImg8bit.png")]
        items.append((prefix, image, base / "gtFine/val" / image.parent.name / f"{prefix}_gtFine_labelIds.png"))
    return base, items, cityscapes27_table(), "cityscapes gtFine/val labelIds"


def _ade20k_items(root: Path) -> tuple[Path, list, np.ndarray, str]:
    base = _first_existing([root, root / "ADEChallengeData2016"], ["images/validation", "annotations/validation"])
    if base is None:
        raise LayoutNotFound(
            f"no ADE20K under {root}: expected ADEChallengeData2016/{{images/validation, annotations/validation}}"
        )
    items = [
        (p.stem, p, base / "annotations/validation" / f"{p.stem}.png")
        for p in sorted((base / "images/validation").glob("*.jpg"))
    ]
    return base, items, ade20k_table(), "ADEChallengeData2016"


_READERS: dict[str, Callable[[Path, int | None], tuple[Path, list, np.ndarray, str]]] = {
    "voc": lambda root, limit: _voc_items(root),
    "context": lambda root, limit: _context_items(root),
    "coco-object": lambda root, limit: _coco_items(root, coco_object_table(), limit),
    "coco-stuff": lambda root, limit: _coco_items(root, coco_stuff27_table(), limit),
    "cityscapes": lambda root, limit: _cityscapes_items(root),
    "ade20k": lambda root, limit: _ade20k_items(root),
}


def open_benchmark(name: str, root: str | Path, limit: int | None = None) -> BenchmarkDataset:
    """The validation split of benchmark ``name`` found under ``root``.

    ``root`` may be the dataset's own folder (``VOCdevkit``, ``coco``,
    ``cityscapes``, ``ADEChallengeData2016``...) or the folder holding it.
    ``limit`` keeps the first N images of the evaluation order (the official
    list where there is one, else sorted file names). Raises
    ``FileNotFoundError`` naming the expected layout, or the missing files.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise ValueError("limit must be >= 1")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    base, items, table, layout = _READERS[name](root, limit)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise FileNotFoundError(f"{name}: no validation images found under {base} ({layout})")
    _check_exist(items, name)
    return BenchmarkDataset(BENCHMARKS[name], base, items, table, layout)
