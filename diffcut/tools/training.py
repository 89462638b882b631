"""Training on the labels: (image, target) pairs for a supervised segmentation model.

The labels of ``diffcut label`` sit apart from the images they describe; this
module joins them again, by ``source`` (every label row names the input record
it came from: a file, ``file.parquet#row=N``, ``shard.tar#key``). The images
are read from the same ``--input`` the job labeled, with the job's own
readers, so every input kind works (image files, Parquet, WebDataset).

* **Targets.** ``"instances"``: the per-image segments of the label output
  (``mask``: segment ids, which mean nothing across images). ``"semantic"``:
  the dataset-level classes of ``jobs/discover.py`` (its ``classes-*.parquet``
  ``mask``: class ids that mean the same thing in every image), the target a
  semantic segmentation network trains on.
* **The same resize for image and mask.** The image is decoded as the job
  decodes it (EXIF orientation, RGB) and resized bilinearly to ``size``; the
  mask, stored at the image's upright size or an aspect-preserving
  ``--mask-size``, is resized to the same ``size`` with nearest-neighbour
  sampling, so labels stay labels (no blended ids) and stay on their pixels.
* **Skipped, counted.** Error rows (``status == "error"``), input records
  without a label row, and images that cannot be read are left out and
  counted (:attr:`LabeledImages.counts`).

Two ways in: :class:`LabeledImages`, a PyTorch ``IterableDataset`` for one
machine (its ``DataLoader`` workers split the input's read units), and
:func:`ray_dataset`, a Ray Data pipeline (a hash join on ``source``) for
``iter_torch_batches`` on a cluster. Ray is imported only there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from torch.utils.data import IterableDataset

from diffcut.job import inputs, schema

TARGETS = ("semantic", "instances")

#: Columns of a label (or class) row the join needs.
_TARGET_COLUMNS = ["source", "status", "mask"]

#: Read units per read call of :class:`LabeledImages` (image files of a call are fetched together).
_UNITS_PER_READ = 32


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


def read_targets(labels: str | None = None, classes: str | None = None) -> pa.Table:
    """The ``source``, ``status``, ``mask`` of every label row (``target="instances"``: the
    ``diffcut label`` output ``labels``) or class row (``"semantic"``: the ``jobs/discover.py``
    output ``classes``), one row per source."""
    if classes is not None:
        from diffcut.tools.discover import read_classes

        return read_classes(classes, columns=_TARGET_COLUMNS)
    if labels is None:
        raise ValueError("give the labels (instance targets) or the classes (semantic targets)")
    return schema.read_labels(labels, columns=_TARGET_COLUMNS)


def input_units(input: str, format: str = "auto", *, image_column: str = "image") -> pa.Table:
    """The read units of every record of ``input``, planned as the labeling job plans them, so
    their ``source`` values are the ones in the label rows."""
    return inputs.plan_inputs(inputs.list_inputs(input, format), image_column=image_column).units


def _target_kind(target: str | None, classes: str | None) -> str:
    target = target or ("semantic" if classes is not None else "instances")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if target == "semantic" and classes is None:
        raise ValueError("semantic targets need the classes of jobs/discover.py (classes=...)")
    return target


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
    """A PyTorch ``IterableDataset`` of (image, target) pairs: input images joined with their labels.

    Args:
        input: the labeling job's ``--input`` (image files, Parquet, WebDataset shards).
        labels: the job's ``--output`` (instance targets).
        classes: the output of ``jobs/discover.py`` on those labels (semantic targets).
        target: ``"semantic"`` (default when ``classes`` is given) or ``"instances"``.
        size: (width, height) of every pair, or N for N x N.
        format, image_column: as for the labeling job.

    Yields ``(image, target)``: ``image`` a (3, H, W) float32 tensor in [0, 1];
    ``target`` an (H, W) int64 tensor of class ids (semantic), or a dict with
    ``masks`` (K, H, W) bool and ``segment_ids`` (K,) int64 (instances; batch
    them with :func:`collate_instances`).

    The label rows (source, status, PNG mask) are held in memory, the images
    are streamed. With ``DataLoader(num_workers=n)`` each worker reads every
    n-th read unit. :attr:`counts` holds what was yielded and skipped
    (``pairs``, ``error_rows``, ``unlabeled``, ``unreadable``) in the process
    that iterates (with workers: in each worker).
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
        self.target = _target_kind(target, classes)
        self.size = parse_size(size)
        self.image_column = image_column
        self.max_image_pixels = max_image_pixels
        self.units = input_units(input, format, image_column=image_column).to_pylist()
        table = read_targets(labels if self.target == "instances" else None, classes)
        columns = (table.column(name).to_pylist() for name in _TARGET_COLUMNS)
        self.targets: dict[str, tuple[str, bytes | None]] = {
            source: (status, mask) for source, status, mask in zip(*columns)
        }
        self.counts: Counter = Counter()

    def _pair(self, record: inputs.RawRecord):
        found = self.targets.get(record.source)
        if found is None:
            self.counts["unlabeled"] += 1
            return None
        status, mask = found
        if status != schema.STATUS_OK or mask is None:
            self.counts["error_rows"] += 1
            return None
        if record.error is not None:
            self.counts["unreadable"] += 1
            return None
        try:
            pixels, labels = image_and_target(record.data, mask, self.size, max_image_pixels=self.max_image_pixels)
        except (inputs.ImageDecodeError, ValueError):
            self.counts["unreadable"] += 1
            return None
        self.counts["pairs"] += 1
        return _torch_pair(pixels, labels, self.target)

    def __iter__(self) -> Iterator[tuple]:
        from torch.utils.data import get_worker_info

        worker = get_worker_info()
        units = self.units if worker is None else self.units[worker.id :: worker.num_workers]
        for start in range(0, len(units), _UNITS_PER_READ):
            for record in inputs.read_units(units[start : start + _UNITS_PER_READ], image_column=self.image_column):
                pair = self._pair(record)
                if pair is not None:
                    yield pair


# =========================================================================== Ray Data
@dataclass
class RayTrainingData:
    """What :func:`ray_dataset` builds: ``dataset`` (columns ``image`` (3, H, W) float32 and
    ``target`` (H, W) int64, for ``iter_torch_batches``) and the counts of label rows used
    (``labeled``) and skipped (``error_rows``). Input records without a label row drop out of
    the join without being counted."""

    dataset: object
    labeled: int
    error_rows: int


def _read_sources(units: pa.Table, *, image_column: str) -> pa.Table:
    """Ray Data UDF: read units -> (source, data) of every readable record."""
    sources, data = [], []
    for record in inputs.read_units(units.to_pylist(), image_column=image_column):
        if record.error is None and record.data is not None:
            sources.append(record.source)
            data.append(record.data)
    return pa.table({"source": pa.array(sources, pa.string()), "data": pa.array(data, pa.binary())})


def _ok_targets(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("status"), schema.STATUS_OK)).select(["source", "mask"])


def _pairs(batch: pa.Table, *, size: tuple[int, int], max_image_pixels: int) -> dict:
    """Ray Data UDF: joined (source, data, mask) rows -> numpy ``image`` / ``target`` batches."""
    images, targets = [], []
    for data, mask in zip(batch.column("data").to_pylist(), batch.column("mask").to_pylist()):
        try:
            pixels, labels = image_and_target(data, mask, size, max_image_pixels=max_image_pixels)
        except (inputs.ImageDecodeError, ValueError):
            continue  # the labeling job made an error row for it as well, or the file changed since
        images.append(pixels.transpose(2, 0, 1).astype(np.float32) / 255.0)
        targets.append(labels)
    width, height = size
    if not images:
        return {"image": np.zeros((0, 3, height, width), np.float32), "target": np.zeros((0, height, width), np.int64)}
    return {"image": np.stack(images), "target": np.stack(targets)}


def _target_files(labels: str | None, classes: str | None) -> list[str]:
    if classes is not None:
        from diffcut.tools.discover import _class_shards

        return _class_shards(classes)
    return schema.list_shards(labels)[0]


def ray_dataset(
    input: str,
    labels: str | None = None,
    *,
    classes: str | None = None,
    target: str | None = None,
    size: int | Sequence[int] = 256,
    format: str = "auto",
    image_column: str = "image",
    num_partitions: int | None = None,
    units_per_task: int = 64,
    max_image_pixels: int = inputs.DEFAULT_MAX_IMAGE_PIXELS,
) -> RayTrainingData:
    """(image, target) pairs as a Ray Data pipeline, for training at scale.

    The same join as :class:`LabeledImages`, distributed: read tasks turn the
    input's read units into (source, bytes), the label (or class) shards are
    read with ``read_parquet`` and their error rows filtered out, a hash join
    on ``source`` (``num_partitions`` partitions: default one per 64 read
    units) pairs them, and a map decodes and resizes both. Targets are label
    maps: class ids (semantic) or segment ids (instances; a variable number of
    masks per image does not fit a tensor column).

    Use: ``ray_dataset(...).dataset.iter_torch_batches(batch_size=32)`` gives
    dicts with ``image`` (B, 3, H, W) and ``target`` (B, H, W) tensors.
    """
    import ray

    target = _target_kind(target, classes)
    size = parse_size(size)
    target_labels = labels if target == "instances" else None
    statuses = read_targets(target_labels, classes if target == "semantic" else None).column("status").to_pylist()
    labeled = sum(status == schema.STATUS_OK for status in statuses)

    units = input_units(input, format, image_column=image_column)
    blocks = [units.slice(start, units_per_task) for start in range(0, units.num_rows, units_per_task)]
    images = ray.data.from_arrow(blocks).map_batches(
        _read_sources, batch_size=units_per_task, batch_format="pyarrow", fn_kwargs=dict(image_column=image_column)
    )
    files = _target_files(target_labels, classes if target == "semantic" else None)
    if not files:
        raise inputs.InputError(f"no label shards under {classes if target == 'semantic' else labels}")
    filesystem, _ = inputs.arrow_filesystem(files[0]) if files else (None, None)
    paths = [inputs.arrow_filesystem(uri)[1] for uri in files]
    # One file per read task; keep the join's key and what the pairs need.
    targets = ray.data.read_parquet(paths, filesystem=filesystem, columns=_TARGET_COLUMNS).map_batches(
        _ok_targets, batch_format="pyarrow"
    )
    partitions = num_partitions or max(1, len(blocks))
    joined = images.join(targets, join_type="inner", num_partitions=partitions, on=("source",))
    dataset = joined.map_batches(
        _pairs, batch_format="pyarrow", fn_kwargs=dict(size=size, max_image_pixels=max_image_pixels)
    )
    return RayTrainingData(dataset=dataset, labeled=labeled, error_rows=len(statuses) - labeled)
