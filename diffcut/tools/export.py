"""Exports of the labeling job's output: COCO JSON with RLE masks, and folders of label-map PNGs.

* **COCO** (:func:`export_coco`): one JSON file in the COCO instance format
  (Lin et al., "Microsoft COCO", ECCV 2014; the format of ``pycocotools``):
  ``images`` (``id``, ``file_name`` = the image id, ``width``, ``height``),
  ``categories`` (one ``"segment"`` category, or one per discovered class when
  a ``jobs/discover.py`` output is given), and one annotation per segment with
  its mask as compressed RLE, ``area``, ``bbox = [x, y, w, h]`` and
  ``iscrowd = 0``. Annotations are in the image's own coordinates: a mask
  stored at another size (``--mask-size``) is resized with nearest neighbour
  first. Segments with no pixel are left out (COCO has no empty masks).
* **PNG** (:func:`export_png`): one single-channel label map per image (8-bit
  when every id is < 256, else 16-bit), the layout of VOC
  ``SegmentationClass`` / mmsegmentation ``ann_dir`` folders, plus
  ``index.csv`` mapping files to image ids. With classes, the map holds class
  ids instead of per-image segment ids.

File names come from image ids, which are untrusted (any string a Parquet id
column holds): :func:`safe_stem` turns an id into a name that cannot leave the
output folder, and :class:`UniqueNames` keeps two ids from sharing a file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffcut.job import schema

__all__ = [
    "safe_stem",
    "UniqueNames",
    "iter_label_rows",
    "read_class_ids",
    "coco_annotations",
    "coco_file_name",
    "export_coco",
    "export_png",
    "ExportSummary",
    "EXPORT_FORMATS",
]

EXPORT_FORMATS = ("coco", "png")

#: The file of a PNG export that maps label maps to image ids.
INDEX_NAME = "index.csv"

#: Longest file stem written (bytes of UTF-8 are at most 4x this: under the usual 255-byte limit).
MAX_STEM_LENGTH = 60

_UNSAFE = re.compile(r"[^\w.-]+")


# --------------------------------------------------------------------------- names
def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def safe_stem(image_id: str) -> str:
    """A file stem for ``image_id`` that stays inside the folder it is written to.

    The last path component of the id (``/`` and ``\\`` both separate), without
    an image extension (``a/2007_000032.jpg`` -> ``2007_000032``, the name VOC
    and mmsegmentation pair with the image), every run of characters other
    than letters, digits, ``_``, ``.`` and ``-`` replaced by ``_``, leading dots
    removed (no ``.``, ``..`` or hidden files). Never empty, never contains a
    separator; longer than :data:`MAX_STEM_LENGTH` characters it is cut and
    suffixed with a hash of the id.
    """
    from diffcut.job.inputs import IMAGE_EXTENSIONS, extension

    text = str(image_id)
    base = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if extension(base) in IMAGE_EXTENSIONS:
        base = base[: -len(extension(base))]
    stem = _UNSAFE.sub("_", base).lstrip(".")
    if not stem.strip("_"):
        return f"image-{_short_hash(text)}"
    if len(stem) > MAX_STEM_LENGTH:
        stem = f"{stem[: MAX_STEM_LENGTH - 9]}-{_short_hash(text)}"
    return stem


class UniqueNames:
    """Stems for a stream of image ids, one distinct stem per distinct id.

    The first id to claim a stem gets :func:`safe_stem`'s; a later, different
    id with the same stem gets it suffixed with a hash of the id (and, in the
    unlikely case that is taken too, a counter). Deterministic for a given
    order of ids.
    """

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}  # stem -> image id
        self._given: dict[str, str] = {}  # image id -> stem
        self.renamed = 0

    def __call__(self, image_id: str) -> str:
        if image_id in self._given:
            return self._given[image_id]
        stem = safe_stem(image_id)
        if stem in self._owner:
            self.renamed += 1
            candidate, counter = f"{stem}-{_short_hash(image_id)}", 1
            while candidate in self._owner:
                counter += 1
                candidate = f"{stem}-{_short_hash(image_id)}-{counter}"
            stem = candidate
        self._owner[stem] = image_id
        self._given[image_id] = stem
        return stem


# --------------------------------------------------------------------------- reading
def iter_label_rows(labels: str, columns: Iterable[str] | None = None, *, batch_rows: int = 64) -> Iterator[dict]:
    """The rows of a labeling job's output, one dict at a time, never the whole dataset at once.

    Reads the label file of every recorded unit (:func:`diffcut.job.units.label_files`) in order of unit,
    ``batch_rows`` rows at a time: every input record has at most one row there, and a unit a killed run
    left unrecorded is never read. Raises :class:`diffcut.job.storage.InputError` for an output that holds
    no labels, or one in the layout of an earlier diffcut.
    """
    from diffcut.job import units
    from diffcut.job.inputs import InputError, open_filesystem

    wanted = list(schema.COLUMNS if columns is None else columns)
    files = units.label_files(labels)
    if not files:
        raise InputError(f"no labels under {labels}: not the output of `diffcut label` (or it recorded no unit yet)")
    for uri in files:
        fs, path = open_filesystem(uri)
        with fs.open(path, "rb") as handle:
            for batch in schema.iter_shard_batches(handle, batch_rows, wanted):
                yield from batch.to_pylist()


def read_class_ids(classes: str) -> dict[str, list[int]]:
    """``source`` -> class id per segment, from a ``jobs/discover.py`` output (its ``class_ids`` column)."""
    from diffcut.tools.discover import read_classes

    table = read_classes(classes, columns=["source", "status", "class_ids"])
    return {
        source: ids
        for source, status, ids in zip(
            table.column("source").to_pylist(),
            table.column("status").to_pylist(),
            table.column("class_ids").to_pylist(),
        )
        if status == schema.STATUS_OK
    }


def _mask_at_image_size(row: Mapping[str, Any]) -> np.ndarray:
    """The row's mask at the image's own size (nearest neighbour when it was stored at another size)."""
    from diffcut.evaluation.protocol import resize_nearest

    mask = schema.decode_mask(row["mask"])
    width, height = row.get("width"), row.get("height")
    if width and height and (height, width) != mask.shape:
        mask = resize_nearest(mask, (height, width))
    return mask


# --------------------------------------------------------------------------- COCO
def coco_annotations(mask: np.ndarray, category_of_segment: np.ndarray | None = None) -> list[dict]:
    """COCO annotations (without ``id`` and ``image_id``) of every segment of a label map that has pixels.

    Args:
        mask: (H, W) labels 0..K-1.
        category_of_segment: (K,) category id per segment; default 1 for all.

    Returns:
        One dict per present segment, in id order: ``segmentation`` (compressed
        RLE with ``counts`` as text), ``area``, ``bbox`` ``[x, y, w, h]``,
        ``iscrowd`` 0, ``category_id``, ``diffcut_segment_id``.
    """
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    present = np.flatnonzero(np.bincount(mask.reshape(-1)))
    annotations = []
    for segment in present.tolist():
        rle = mask_utils.encode(np.asfortranarray(mask == segment, dtype=np.uint8))
        annotations.append(
            {
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
                "category_id": 1 if category_of_segment is None else int(category_of_segment[segment]),
                "diffcut_segment_id": int(segment),
            }
        )
    return annotations


@dataclass
class ExportSummary:
    """What an export wrote."""

    format: str
    output: str
    images: int = 0
    annotations: int = 0
    files: int = 0
    error_rows: int = 0
    renamed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _categories(num_classes: int | None) -> list[dict]:
    if num_classes is None:
        return [{"id": 1, "name": "segment", "supercategory": "segment"}]
    return [{"id": k + 1, "name": f"class_{k}", "supercategory": "class"} for k in range(num_classes)]


def coco_file_name(image_id: str, relative_to: str | None = None) -> str:
    """The ``file_name`` of an image: its id, relative to ``relative_to`` when the id lies under it.

    COCO loaders join ``file_name`` to an image folder; ``relative_to`` (the
    labeling job's ``--input``, say) turns ids such as ``/data/coco/val/1.jpg``
    or ``s3://bucket/val/1.jpg`` into ``val/1.jpg``.
    """
    if relative_to:
        prefix = relative_to.rstrip("/") + "/"
        if image_id.startswith(prefix):
            return image_id[len(prefix) :]
    return image_id


def export_coco(
    labels: str, output: str, *, classes: str | None = None, relative_to: str | None = None
) -> ExportSummary:
    """Write the labels under ``labels`` as one COCO JSON file ``output`` (local or ``s3://``).

    Image ``id`` s are 1..N in reading order, annotation ids 1..M;
    ``file_name`` is :func:`coco_file_name` of the image id and
    ``diffcut_source`` the row's source. With
    ``classes`` (a ``jobs/discover.py`` output) the categories are its classes:
    class k is category ``k + 1`` named ``class_k``; without it every segment is
    category 1, ``"segment"``. Error rows are left out and counted. The JSON is
    streamed: annotations go to a temporary file while rows are read, so memory
    holds one image's masks at a time.
    """
    import tempfile

    from diffcut.job.inputs import check_uri, open_filesystem

    output = check_uri(output)
    class_ids = read_class_ids(classes) if classes is not None else None
    num_classes = None
    if classes is not None:
        from diffcut.tools.discover import read_centroids_info

        num_classes = int(read_centroids_info(classes)["num_classes"])
    summary = ExportSummary(format="coco", output=output)
    images: list[dict] = []
    columns = ["image_id", "source", "status", "width", "height", "mask"]
    with tempfile.TemporaryFile("w+", encoding="utf-8") as annotations_file:
        for row in iter_label_rows(labels, columns):
            if row["status"] != schema.STATUS_OK:
                summary.error_rows += 1
                continue
            mask = _mask_at_image_size(row)
            categories = None
            if class_ids is not None:
                if row["source"] not in class_ids:
                    raise ValueError(
                        f"{classes} has no classes for {row['source']!r}: was it discovered from these labels?"
                    )
                categories = np.asarray(class_ids[row["source"]], dtype=np.int64) + 1
            image_index = len(images) + 1
            images.append(
                {
                    "id": image_index,
                    "file_name": coco_file_name(row["image_id"], relative_to),
                    "width": int(mask.shape[1]),
                    "height": int(mask.shape[0]),
                    "diffcut_source": row["source"],
                }
            )
            for annotation in coco_annotations(mask, categories):
                summary.annotations += 1
                annotation = {"id": summary.annotations, "image_id": image_index, **annotation}
                annotations_file.write(json.dumps(annotation, separators=(",", ":")) + "\n")
        summary.images = len(images)
        annotations_file.seek(0)
        head = {
            "info": {"description": f"diffcut pseudo-labels from {labels}", "version": "1.0"},
            "licenses": [],
            "images": images,
            "categories": _categories(num_classes),
        }
        fs, path = open_filesystem(output)
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "w", encoding="utf-8") as sink:
            sink.write(json.dumps(head, separators=(",", ":"))[:-1] + ',"annotations":[')
            for index, line in enumerate(annotations_file):
                sink.write(("," if index else "") + line.rstrip("\n"))
            sink.write("]}\n")
    summary.files = 1
    return summary


# --------------------------------------------------------------------------- PNG
def _palette_png(labels: np.ndarray) -> bytes:
    """An 8-bit palette PNG (VOC style): labels as indices, colours from :func:`diffcut.tools.visualize.palette`."""
    from PIL import Image

    from diffcut.tools.visualize import palette

    if int(labels.max()) > 255:
        raise ValueError("a palette PNG holds at most 256 labels; this map has more (drop --palette)")
    picture = Image.fromarray(labels.astype(np.uint8), mode="P")
    picture.putpalette(palette(256).reshape(-1).tolist())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def export_png(labels: str, output: str, *, classes: str | None = None, palette: bool = False) -> ExportSummary:
    """Write one label-map PNG per labeled image into the folder ``output`` (local or ``s3://``).

    The file is ``<safe_stem(image_id)>.png`` (:class:`UniqueNames` settles
    clashes). Without ``palette`` it is the stored mask as is: grayscale,
    8-bit when every id is < 256, else 16-bit; ``np.asarray(PIL.Image.open(f))``
    gives the ids back. With ``classes`` the values are class ids
    (``class_ids[segment]``). With ``palette`` an 8-bit palette PNG, as VOC's
    ``SegmentationClass`` (indices read back the same way). ``index.csv``
    lists ``file, image_id, source, status, num_segments, error`` for every row.
    """
    from diffcut.job.inputs import check_uri, join_uri, open_filesystem

    output = check_uri(output)
    class_ids = read_class_ids(classes) if classes is not None else None
    fs, root = open_filesystem(output)
    fs.makedirs(root, exist_ok=True)
    names = UniqueNames()
    summary = ExportSummary(format="png", output=output)
    columns = ["image_id", "source", "status", "error", "mask", "num_segments"]
    # index.csv is written while rows stream by (on S3 as a multipart upload): never held whole.
    with fs.open(open_filesystem(join_uri(output, INDEX_NAME))[1], "w", encoding="utf-8", newline="") as index:
        table = csv.writer(index)
        table.writerow(["file", "image_id", "source", "status", "num_segments", "error"])
        for row in iter_label_rows(labels, columns):
            if row["status"] != schema.STATUS_OK:
                summary.error_rows += 1
                table.writerow(["", row["image_id"], row["source"], row["status"], "", row["error"]])
                continue
            file_name = names(row["image_id"]) + ".png"
            png = row["mask"]
            if class_ids is not None or palette:
                mask = schema.decode_mask(png)
                if class_ids is not None:
                    if row["source"] not in class_ids:
                        raise ValueError(f"{classes} has no classes for {row['source']!r}")
                    mask = np.asarray(class_ids[row["source"]], dtype=np.int32)[mask]
                png = _palette_png(mask) if palette else schema.encode_mask(mask)
            fs.pipe_file(open_filesystem(join_uri(output, file_name))[1], png)
            table.writerow([file_name, row["image_id"], row["source"], row["status"], row["num_segments"], ""])
            summary.images += 1
            summary.files += 1
    summary.renamed = names.renamed
    return summary
