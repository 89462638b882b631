"""Training on the labels: (image, target) pairs for a supervised segmentation model.

The labels of ``diffcut label`` sit apart from the images they describe, one
label file per *input unit* (a WebDataset shard, a Parquet file, a chunk of
image files; :mod:`diffcut.job.units`). This module pairs them again unit by
unit, a local join: for every recorded unit it reads the unit's label file
(``source``, ``status``, ``mask``), reads that unit's input records with the
job's own planners and readers (the one shard or Parquet file its record names
in ``input``, or the image files it lists in ``sources``), and pairs them by
``source`` in memory. A unit's images meet its labels in the one task that
reads them: no image crosses the network twice, nothing is shuffled.

* **Targets.** ``"instances"``: the per-image segments of the label output
  (``mask``: segment ids, which mean nothing across images). ``"semantic"``:
  the dataset-level classes of ``jobs/discover.py``: its centroids
  (``centroids.npy``) give every segment of a unit's label rows its class,
  as discover's own second pass does
  (:func:`diffcut.tools.discover_batches.classify_batch`), and the mask then
  holds class ids that mean the same thing in every image, the target a
  semantic segmentation network trains on. Its ``classes-*.parquet`` files are
  not read.
* **The same resize for image and mask.** The image is decoded as the job
  decodes it (EXIF orientation, RGB) and resized bilinearly to ``size``; the
  mask, stored at the image's upright size or an aspect-preserving
  ``--mask-size``, is resized to the same ``size`` with nearest-neighbour
  sampling, so labels stay labels (no blended ids) and stay on their pixels.
* **Which units.** Every unit with a done record, incomplete ones (cut by
  ``--limit``) included: their rows are valid. Input files no unit names
  (added since the run) are not read. ``input`` must be the job's
  ``--input``: the records name their files as the job listed them
  (:func:`diffcut.job.inputs.canonical_input`), which is checked.
* **Skipped, counted.** Error rows (``status == "error"``), input records
  without a label row (a unit cut by ``--limit``) and images that cannot be
  read (or are gone) are left out and counted (:attr:`LabeledImages.counts`).

Two ways in: :class:`LabeledImages`, a PyTorch ``IterableDataset`` for one
machine (its ``DataLoader`` workers split the units), and :func:`ray_dataset`,
a Ray Data pipeline for ``iter_torch_batches`` on a cluster: one row per unit
(``from_items``) and one ``map_batches`` that runs the same local join, so its
plan holds a read and a map, no join, shuffle or repartition; its counts come
from the unit records. Ray is imported only there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from torch.utils.data import IterableDataset

from diffcut.job import boundary, inputs, schema, units, webdataset

TARGETS = ("semantic", "instances")

#: Columns of a label row the pairing needs (instance targets; semantic ones need what classify_batch reads).
_TARGET_COLUMNS = ["source", "status", "mask"]

#: Read units per read call (image files of a call are fetched together, s3fs concurrently).
_UNITS_PER_READ = 32

#: Label rows per batch read from a unit's label file (semantic: the segments' descriptors of a batch).
_LABEL_BATCH_ROWS = 256


# =========================================================================== plain functions
def parse_size(size: int | Sequence[int]) -> tuple[int, int]:
    """(width, height) from ``N`` (N x N) or ``(width, height)``."""
    if isinstance(size, (int, np.integer)):
        width = height = int(size)
    else:
        width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive, got {width}x{height}")
    return width, height


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) label map resized to ``size`` = (width, height) with nearest-neighbour sampling
    (PIL's NEAREST: output pixel centres mapped onto the input grid), as int64."""
    from PIL import Image

    labels = np.asarray(labels)
    if labels.shape[::-1] == tuple(size):
        return labels.astype(np.int64)
    resized = Image.fromarray(labels.astype(np.int32), "I").resize(tuple(size), Image.Resampling.NEAREST)
    return np.asarray(resized).astype(np.int64)


def image_and_target(
    image_bytes: bytes,
    mask_png: bytes,
    size: tuple[int, int],
    *,
    max_image_pixels: int = inputs.DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """((H, W, 3) uint8 RGB image, (H, W) int64 label map), both at ``size`` = (width, height).

    The image is decoded like the labeling job decodes it (:func:`diffcut.job.inputs.decode_image`,
    bilinear resize), the mask (:func:`diffcut.job.schema.decode_mask`) resized with
    :func:`resize_labels`.

    Raises:
        diffcut.job.inputs.ImageDecodeError: the image cannot be used.
    """
    pixels = inputs.decode_image(image_bytes, size, max_pixels=max_image_pixels).pixels
    return pixels, resize_labels(schema.decode_mask(mask_png), size)


def instance_masks(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((K, H, W) bool masks, (K,) segment ids) of the segments present in a label map."""
    ids = np.unique(labels)
    return labels[None, :, :] == ids[:, None, None], ids.astype(np.int64)


def _target_kind(target: str | None, classes: str | None) -> str:
    target = target or ("semantic" if classes is not None else "instances")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if target == "semantic" and classes is None:
        raise ValueError("semantic targets need the classes of jobs/discover.py (classes=...)")
    return target


def _labels_and_centroids(
    labels: str | None, classes: str | None, target: str | None
) -> tuple[str, str, np.ndarray | None]:
    """(target kind, the label output, the centroids for semantic targets): ``labels`` defaults to
    the label output the discover run ``classes`` was fitted on (its ``centroids.json``)."""
    from diffcut.tools.discover import read_centroids, read_centroids_info

    target = _target_kind(target, classes)
    if labels is None and classes is not None:
        labels = read_centroids_info(classes).get("labels")
    if labels is None:
        raise ValueError("give the labels (the output of diffcut label) or the classes of jobs/discover.py")
    return target, labels, read_centroids(classes) if target == "semantic" else None


# =========================================================================== the per-unit join
def _under(uri: str, root: str) -> bool:
    if root == ".":  # the working directory: its files are listed relative to it
        return not uri.startswith("/") and "://" not in uri
    return boundary.inside(uri, root.rstrip("/"))


def training_units(input: str, labels: str, *, format: str = "auto") -> tuple[list[dict], list[units.UnitRecord]]:
    """(one spec per recorded unit of ``labels``, the records): ``unit``, ``labels`` (its label file),
    ``kind`` (``images``, ``parquet`` or ``webdataset``), ``root`` (the input's canonical spelling),
    ``input`` and ``sources`` (as in the record). Raises InputError when there is no recorded
    unit, no ``input``, or a unit's files do not lie under it."""
    records = units.read_records(labels)
    if not records:
        raise inputs.InputError(f"no labeled units under {labels} (no _units/*.json): not a diffcut label output")
    root = inputs.canonical_input(input)
    fs, path = inputs.open_filesystem(root)
    if not fs.exists(path):  # a relative --input from another directory: every read would fail
        raise inputs.InputError(f"no input at {input!r}; pass the labeling job's --input, from the directory it ran in")
    specs = []
    for record in records:
        if record.input is None:
            kind = "images"
        elif format in ("parquet", "webdataset"):
            kind = format
        else:
            kind = "webdataset" if webdataset.is_shard(record.input) else "parquet"
        first = record.input if record.input is not None else next(iter(record.sources or []), None)
        if first is not None and not _under(first, root):
            raise inputs.InputError(
                f"unit {record.unit} of {labels} was labeled from {first}, which is not under {root}: "
                "pass the labeling job's --input, spelled as it was (a relative path from the same directory)"
            )
        specs.append(
            dict(
                unit=record.unit,
                labels=units.label_file(labels, record.unit),
                kind=kind,
                root=root,
                input=record.input,
                sources=record.sources,
            )
        )
    return specs, records


def unit_reads(spec: dict, *, image_column: str = "image") -> list[dict]:
    """The read units of one unit's input records, planned as the job plans them (its Parquet
    file or shard, or the image files of its chunk), so their ``source`` values are the label rows'."""
    if spec["kind"] == "images":
        files = list(spec["sources"] or [])
        plan = inputs.plan_image_files(files, unit_files=max(1, len(files)))
    elif spec["kind"] == "webdataset":
        plan = webdataset.plan_shards([spec["input"]], root=spec["root"])
    else:
        plan = inputs.plan_parquet([spec["input"]], root=spec["root"], image_column=image_column)
    return [dict(row, unit=spec["unit"]) for row in plan.units.to_pylist()]


def unit_targets(spec: dict, centroids: np.ndarray | None = None) -> dict[str, tuple[str, bytes | None]]:
    """source -> (status, mask PNG) of one unit's label rows; with ``centroids`` the mask holds class
    ids (:func:`diffcut.tools.discover_batches.classify_batch` of the rows, batch by batch)."""
    from diffcut.tools.discover_batches import _CLASSIFY_COLUMNS, classify_batch

    columns = _TARGET_COLUMNS if centroids is None else _CLASSIFY_COLUMNS
    fs, path = inputs.open_filesystem(spec["labels"])
    found: dict[str, tuple[str, bytes | None]] = {}
    with fs.open(path, "rb") as handle:
        for batch in schema.iter_shard_batches(handle, _LABEL_BATCH_ROWS, columns):
            table = pa.Table.from_batches([batch])
            if centroids is not None:
                table = classify_batch(table, centroids=centroids)
            values = (table.column(name).to_pylist() for name in _TARGET_COLUMNS)
            found.update((source, (status, mask)) for source, status, mask in zip(*values))
    return found


def _usable(found: tuple[str, bytes | None]) -> bool:
    return found[0] == schema.STATUS_OK and found[1] is not None


def unit_pairs(
    spec: dict, *, counts: Counter, image_column: str = "image", centroids: np.ndarray | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """(image bytes, mask PNG) of every ok label row of one unit whose input record reads, in input
    order: the unit's label rows in memory, its input records streamed. What is skipped is added to
    ``counts`` (``error_rows``, ``unlabeled``, ``unreadable``)."""
    targets = unit_targets(spec, centroids)
    try:
        reads = unit_reads(spec, image_column=image_column)
    except inputs.InputError:
        reads = []  # its Parquet file is gone or broken: the unit's rows are counted below
    for start in range(0, len(reads), _UNITS_PER_READ):
        for record in inputs.read_units(reads[start : start + _UNITS_PER_READ], image_column=image_column):
            found = targets.pop(record.source, None)
            if found is None:
                counts["unlabeled"] += 1
            elif not _usable(found):
                counts["error_rows"] += 1
            elif record.error is not None or record.data is None:
                counts["unreadable"] += 1
            else:
                yield record.data, found[1]
    for found in targets.values():  # label rows whose input record is no longer there
        counts["unreadable" if _usable(found) else "error_rows"] += 1


# =========================================================================== PyTorch
def _torch_pair(pixels: np.ndarray, labels: np.ndarray, target: str):
    import torch

    image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).to(torch.float32).div_(255.0)
    if target == "semantic":
        return image, torch.from_numpy(labels)
    masks, ids = instance_masks(labels)
    return image, {"masks": torch.from_numpy(masks), "segment_ids": torch.from_numpy(ids)}


def collate_instances(batch: Sequence[tuple]):
    """``DataLoader`` collate for instance targets: (B, 3, H, W) images, a list of B target dicts
    (each image has its own number of segments)."""
    import torch

    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


class LabeledImages(IterableDataset):
    """A PyTorch ``IterableDataset`` of (image, target) pairs: input images paired with their labels.

    Args:
        input: the labeling job's ``--input`` (image files, Parquet, WebDataset shards).
        labels: the job's ``--output`` (default with ``classes``: the labels the classes were fitted on).
        classes: the output of ``jobs/discover.py`` on those labels (semantic targets).
        target: ``"semantic"`` (default when ``classes`` is given) or ``"instances"``.
        size: (width, height) of every pair, or N for N x N.
        format, image_column: as for the labeling job.

    Yields ``(image, target)``: ``image`` a (3, H, W) float32 tensor in [0, 1];
    ``target`` an (H, W) int64 tensor of class ids (semantic), or a dict with
    ``masks`` (K, H, W) bool and ``segment_ids`` (K,) int64 (instances; batch
    them with :func:`collate_instances`).

    The unit records are read when it is built; then unit after unit, the
    unit's label rows are held in memory and its images streamed. With
    ``DataLoader(num_workers=n)`` each worker takes every n-th unit.
    :attr:`counts` holds what was yielded and skipped (``pairs``,
    ``error_rows``, ``unlabeled``, ``unreadable``) in the process that iterates
    (with workers: in each worker).
    """

    def __init__(
        self,
        input: str,
        labels: str | None = None,
        *,
        classes: str | None = None,
        target: str | None = None,
        size: int | Sequence[int] = 256,
        format: str = "auto",
        image_column: str = "image",
        max_image_pixels: int = inputs.DEFAULT_MAX_IMAGE_PIXELS,
    ):
        super().__init__()
        self.target, labels, self.centroids = _labels_and_centroids(labels, classes, target)
        self.size = parse_size(size)
        self.image_column = image_column
        self.max_image_pixels = max_image_pixels
        self.units, self.records = training_units(input, labels, format=format)
        self.counts: Counter = Counter()

    def __iter__(self) -> Iterator[tuple]:
        from torch.utils.data import get_worker_info

        worker = get_worker_info()
        specs = self.units if worker is None else self.units[worker.id :: worker.num_workers]
        for spec in specs:
            pairs = unit_pairs(spec, counts=self.counts, image_column=self.image_column, centroids=self.centroids)
            for data, mask in pairs:
                try:
                    pixels, labels = image_and_target(data, mask, self.size, max_image_pixels=self.max_image_pixels)
                except (inputs.ImageDecodeError, ValueError):
                    self.counts["unreadable"] += 1
                    continue
                self.counts["pairs"] += 1
                yield _torch_pair(pixels, labels, self.target)


# =========================================================================== Ray Data
@dataclass
class RayTrainingData:
    """What :func:`ray_dataset` builds: ``dataset`` (columns ``image`` (3, H, W) float32 and
    ``target`` (H, W) int64, for ``iter_torch_batches``), and from the unit records the number of
    ``units`` and of their ok (``labeled``) and error (``error_rows``) label rows."""

    dataset: object
    labeled: int
    error_rows: int
    units: int = 0


def _arrays(images: list[np.ndarray], targets: list[np.ndarray]) -> dict:
    return {"image": np.stack(images), "target": np.stack(targets)}


def join_units(
    batch: pa.Table,
    *,
    size: tuple[int, int],
    image_column: str,
    centroids: np.ndarray | None,
    max_image_pixels: int,
    pairs_per_batch: int,
) -> Iterator[dict]:
    """Ray Data UDF: unit specs (:func:`training_units`) -> numpy ``image`` / ``target`` batches of up to
    ``pairs_per_batch`` pairs, each unit joined locally (:func:`unit_pairs`)."""
    images, targets = [], []
    for spec in batch.to_pylist():
        for data, mask in unit_pairs(spec, counts=Counter(), image_column=image_column, centroids=centroids):
            try:
                pixels, labels = image_and_target(data, mask, size, max_image_pixels=max_image_pixels)
            except (inputs.ImageDecodeError, ValueError):
                continue  # the labeling job made an error row for it as well, or the file changed since
            images.append(pixels.transpose(2, 0, 1).astype(np.float32) / 255.0)
            targets.append(labels)
            if len(images) == pairs_per_batch:
                yield _arrays(images, targets)
                images, targets = [], []
    if images:
        yield _arrays(images, targets)


def ray_dataset(
    input: str,
    labels: str | None = None,
    *,
    classes: str | None = None,
    target: str | None = None,
    size: int | Sequence[int] = 256,
    format: str = "auto",
    image_column: str = "image",
    cpus_per_task: float = 1.0,
    pairs_per_batch: int = 32,
    max_image_pixels: int = inputs.DEFAULT_MAX_IMAGE_PIXELS,
) -> RayTrainingData:
    """(image, target) pairs as a Ray Data pipeline, for training at scale.

    The same per-unit join as :class:`LabeledImages`, distributed:
    ``from_items`` makes one row per recorded unit (its name, label file and
    input), and one ``map_batches`` task per unit reads the unit's label rows
    and its input records, pairs them by source, decodes and resizes both
    (:func:`join_units`, ``cpus_per_task`` CPUs each). No join, no shuffle:
    image bytes go from storage to the task that decodes them. Targets are
    label maps: class ids (semantic) or segment ids (instances; a variable
    number of masks per image does not fit a tensor column).

    Use: ``ray_dataset(...).dataset.iter_torch_batches(batch_size=32)`` gives
    dicts with ``image`` (B, 3, H, W) and ``target`` (B, H, W) tensors.
    """
    import ray

    target, labels, centroids = _labels_and_centroids(labels, classes, target)
    specs, records = training_units(input, labels, format=format)
    arguments = dict(
        size=parse_size(size),
        image_column=image_column,
        centroids=centroids,
        max_image_pixels=max_image_pixels,
        pairs_per_batch=max(1, int(pairs_per_batch)),
    )
    # One unit per call: a unit is the unit of work, its label rows and read units are planned in the task.
    dataset = ray.data.from_items(specs).map_batches(
        join_units, batch_size=1, batch_format="pyarrow", fn_kwargs=arguments, num_cpus=cpus_per_task
    )
    return RayTrainingData(
        dataset=dataset,
        labeled=sum(record.ok for record in records),
        error_rows=sum(record.error for record in records),
        units=len(records),
    )
