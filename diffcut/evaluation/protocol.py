"""Scoring unsupervised segmentations: the DiffSeg / DiffCut benchmark protocol (docs/method.md §3).

Zero-shot segmenters such as DiffCut (Couairon et al., NeurIPS 2024,
arXiv:2406.02842) output segments without class names, so a score first has
to match segments to ground-truth classes. The paper follows DiffSeg (Tian
et al., CVPR 2024) and matches *per image*:

1. Prediction and ground truth are compared at 128 x 128; both are resized
   with nearest-neighbour sampling (``torch.nn.functional.interpolate``'s
   default "nearest": source index ``floor(i * in / out)``).
2. ``hist[g, c]`` counts the pixels of class ``g`` predicted as segment ``c``
   over the pixels whose label lies in ``[0, N)``; its width is
   ``max(N, max prediction + 1)``.
3. A one-to-one Hungarian assignment maximises the matched pixels
   (``scipy.optimize.linear_sum_assignment(hist, maximize=True)``). With
   ``c(g)`` the column given to class ``g``: ``TP[g] += hist[g, c(g)]``,
   ``FN[g] += row sum - TP``, ``FP[g] += column sum of c(g) - TP``,
   ``ALL += hist.sum()``.
4. Over the dataset ``IoU = TP / (TP + FP + FN)``, ``mIoU = nanmean(IoU)``
   (classes never seen nor predicted drop out), accuracy ``= sum TP / ALL``.

Datasets with a background class (Pascal VOC, Pascal Context, COCO-Object)
use a many-to-one variant, because "background" is many things: first match
with the N - 1 other classes (background and ignored pixels excluded); every
predicted segment not matched to a class present in the image is merged into
one new segment; ignored ground truth becomes background; the merged map may
be refined (PAMR in the paper); then the N-class matching above scores it.

:class:`SegmentationEvaluator` accumulates this image by image, so a
streaming benchmark never holds more than one image. ``matching="dataset"``
instead accumulates one histogram over the whole dataset and solves a single
Hungarian assignment at the end, for predictions whose ids are dataset-level
clusters (the same id means the same thing in every image).

Everything here is numpy and scipy; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

IGNORE_INDEX = 255
#: The paper compares predictions and labels at this size.
COMPARE_SIZE = (128, 128)
MATCHING_MODES = ("per-image", "dataset", "names")

#: A refinement hook: label map in, label map of the same shape out (PAMR in the paper).
Refine = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- arrays
def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map, as ``F.interpolate(mode="nearest")``.

    The published evaluation resizes labels with PyTorch's default "nearest",
    whose source index is ``floor(dst * in / out)`` (not the half-pixel
    "nearest-exact"); this reproduces it without torch.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a label map must be 2-D; got shape {labels.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = labels.shape
    if (in_h, in_w) == (out_h, out_w):
        return labels
    rows = np.minimum((np.arange(out_h) * in_h) // out_h, in_h - 1)
    cols = np.minimum((np.arange(out_w) * in_w) // out_w, in_w - 1)
    return labels[rows[:, None], cols[None, :]]


def _as_prediction(prediction: np.ndarray) -> np.ndarray:
    prediction = np.asarray(prediction)
    if prediction.dtype == bool:
        prediction = prediction.astype(np.int64)
    if not np.issubdtype(prediction.dtype, np.integer):
        if not np.all(np.mod(prediction, 1) == 0):
            raise ValueError("predicted segment ids must be integers")
    prediction = prediction.astype(np.int64)
    if prediction.size and prediction.min() < 0:
        raise ValueError("predicted segment ids must be >= 0")
    return prediction


def confusion_histogram(labels: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """``hist[g, c]``: pixels of class g predicted as segment c, plus a last row for ignored pixels.

    Rows ``0..N-1`` are the classes; row ``N`` counts the pixels whose label is
    outside ``[0, N)`` (the background variant of the protocol turns those into
    background, so they are kept rather than dropped). The width is
    ``max prediction + 1`` over *all* pixels, ignored ones included, because
    that is what sets the published histogram's width.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False).ravel()
    prediction = np.asarray(prediction).ravel()
    if labels.shape != prediction.shape:
        raise ValueError(f"labels and prediction differ in size: {labels.size} vs {prediction.size}")
    width = int(prediction.max()) + 1 if prediction.size else 1
    rows = np.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    counts = np.bincount(rows * width + prediction, minlength=(num_classes + 1) * width)
    return counts.reshape(num_classes + 1, width)


@dataclass(frozen=True)
class MatchCounts:
    """The outcome of one Hungarian matching of a (classes x segments) histogram."""

    true_positives: np.ndarray  # (rows,)
    false_positives: np.ndarray  # (rows,)
    false_negatives: np.ndarray  # (rows,)
    total: int  # hist.sum()
    assignment: np.ndarray  # (rows,) column (segment id) matched to each class


def hungarian_counts(hist: np.ndarray) -> MatchCounts:
    """One-to-one matching of classes (rows) to segments (columns) maximising matched pixels.

    Columns are padded with zeros to at least the number of rows (the
    protocol's width ``max(N, max pred + 1)``), so every class gets a column,
    possibly an empty one. Counts follow docs/method.md §3 / the published
    ``hungarian_matching``: TP = matched pixels, FN = row sum - TP,
    FP = column sum of the matched column - TP.
    """
    hist = np.asarray(hist, dtype=np.int64)
    rows, cols = hist.shape
    if cols < rows:
        hist = np.pad(hist, ((0, 0), (0, rows - cols)))
    row_ind, col_ind = linear_sum_assignment(hist, maximize=True)
    # rows <= cols, so every row is assigned and row_ind == arange(rows).
    matched = hist[row_ind, col_ind]
    return MatchCounts(
        true_positives=matched.astype(np.float64),
        false_positives=(hist[:, col_ind].sum(axis=0) - matched).astype(np.float64),
        false_negatives=(hist.sum(axis=1) - matched).astype(np.float64),
        total=int(hist.sum()),
        assignment=col_ind.astype(np.int64),
    )


def background_kept_segments(hist: np.ndarray, background_class: int) -> np.ndarray:
    """Segments that survive the background merge: those matched to a class present in the image.

    ``hist`` is a :func:`confusion_histogram` (N class rows + the ignored row).
    The first matching uses the N - 1 non-background classes only, background
    and ignored pixels excluded, with the width ``max(N - 1, max pred + 1)`` as
    in the published code. A class is present when it has at least one pixel.
    Every other segment, matched to an absent class or to nothing, is merged
    into background by the caller.
    """
    num_classes = hist.shape[0] - 1
    class_rows = [g for g in range(num_classes) if g != background_class]
    first = hist[class_rows]
    matching = hungarian_counts(first)
    present = first.max(axis=1) > 0
    return np.unique(matching.assignment[present])


def merge_background_segments(prediction: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Relabel every segment not in ``kept`` to one new id, ``prediction.max() + 1``.

    When every segment is kept the map is returned unchanged (no new id), as
    in the published code, so the next histogram's width does not grow.
    """
    merged = ~np.isin(prediction, kept)
    if not merged.any():
        return prediction
    out = prediction.copy()
    out[merged] = int(prediction.max()) + 1
    return out


def merge_background_histogram(hist: np.ndarray, background_class: int) -> np.ndarray:
    """The background variant applied to a histogram instead of pixels.

    Same steps as the per-image protocol without refinement: segments not
    matched to a present class are summed into one new column placed at
    ``max id + 1``, and the ignored row is added to the background row.
    Returns the (N, width) histogram to score. Used for dataset-level
    matching, where only the accumulated histogram exists.
    """
    num_classes = hist.shape[0] - 1
    kept = background_kept_segments(hist, background_class)
    used = np.flatnonzero(hist.sum(axis=0) > 0)  # ids that occur at all (ignored pixels included)
    merged_ids = np.setdiff1d(used, kept)
    if merged_ids.size:
        max_id = int(used.max())
        out = np.zeros((hist.shape[0], max(hist.shape[1], max_id + 2)), dtype=np.int64)
        out[:, : hist.shape[1]] = hist
        out[:, max_id + 1] = hist[:, merged_ids].sum(axis=1)
        out[:, merged_ids] = 0
        hist = out[:, : max_id + 2]
    scored = hist[:num_classes].copy()
    scored[background_class] += hist[num_classes]
    return scored


# --------------------------------------------------------------------------- results
def _nan_to_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True)
class EvaluationResult:
    """Scores over a dataset. IoU and accuracy are fractions in [0, 1]; NaN where undefined."""

    miou: float
    pixel_accuracy: float
    per_class_iou: np.ndarray  # (N,) NaN for a class neither present nor predicted
    true_positives: np.ndarray
    false_positives: np.ndarray
    false_negatives: np.ndarray
    total_pixels: int
    num_images: int
    matching: str
    #: dataset matching only: the predicted cluster id matched to each class.
    assignment: np.ndarray | None = None
    #: names matching only: the mean over images of each image's mIoU (the published open-vocabulary script).
    per_image_miou: float | None = None

    @property
    def num_classes(self) -> int:
        return int(self.per_class_iou.shape[0])

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN -> None)."""
        out = {
            "miou": _nan_to_none(self.miou),
            "pixel_accuracy": _nan_to_none(self.pixel_accuracy),
            "per_class_iou": [_nan_to_none(v) for v in self.per_class_iou.tolist()],
            "num_images": self.num_images,
            "matching": self.matching,
        }
        if self.assignment is not None:
            out["assignment"] = [int(c) for c in self.assignment]
        if self.per_image_miou is not None:
            out["per_image_miou"] = _nan_to_none(self.per_image_miou)
        return out


def scores_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, total: int) -> tuple[float, float, np.ndarray]:
    """(mIoU, pixel accuracy, per-class IoU) from accumulated counts."""
    denominator = tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(denominator > 0, tp / np.where(denominator > 0, denominator, 1), np.nan)
    valid = ~np.isnan(iou)
    miou = float(iou[valid].mean()) if valid.any() else float("nan")
    accuracy = float(tp.sum() / total) if total > 0 else float("nan")
    return miou, accuracy, iou


# --------------------------------------------------------------------------- accumulator
@dataclass
class SegmentationEvaluator:
    """Streaming scorer: ``update(prediction, labels)`` per image, ``compute()`` at the end.

    Args:
        num_classes: N; labels in ``[0, N)`` are classes, everything else is ignored.
        background_class: the background class id (VOC 0, Context 0,
            COCO-Object 80 with our label maps) for the many-to-one variant;
            None for datasets without one.
        ignore_index: the conventional ignore label; must lie outside ``[0, N)``
            (every label outside that range is ignored anyway).
        matching: ``"per-image"`` (the paper) or ``"dataset"`` (one Hungarian
            matching over the accumulated histogram; ids must be dataset-level),
            or ``"names"``: the prediction is already a class id per pixel (a
            vocabulary index, e.g. ``diffcut.method.naming``'s semantic mask), scored
            without any matching; ids outside ``[0, N)`` are wrong classes.
            With a ``background_class``, ignored pixels count as background
            (the published script scores them so), else they are left out.
            ``miou`` is then the dataset-level mIoU and ``per_image_miou`` the
            mean over images of each image's mIoU (classes absent from both
            maps of an image left out), the averaging of the published
            ``eval_diffcut_openvoc.py`` (torchmetrics ``JaccardIndex`` per
            image, summed and divided by the number of images).
        size: (H, W) both maps are resized to with nearest sampling before
            scoring (paper: 128 x 128); None compares at the labels' size.
    """

    num_classes: int
    background_class: int | None = None
    ignore_index: int = IGNORE_INDEX
    matching: str = "per-image"
    size: tuple[int, int] | None = COMPARE_SIZE
    num_images: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if self.matching not in MATCHING_MODES:
            raise ValueError(f"matching must be one of {MATCHING_MODES}; got {self.matching!r}")
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(f"ignore_index {self.ignore_index} is a class id (num_classes {self.num_classes})")
        if self.background_class is not None:
            if not 0 <= self.background_class < self.num_classes:
                raise ValueError(f"background_class {self.background_class} is not in [0, {self.num_classes})")
            if self.num_classes < 2:
                raise ValueError("a background class needs at least one other class")
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        n = self.num_classes
        self._tp = np.zeros(n)
        self._fp = np.zeros(n)
        self._fn = np.zeros(n)
        self._total = 0
        self._hist = np.zeros((n + 1, 1), dtype=np.int64)  # dataset matching only
        self._image_mious: list[float] = []  # names matching only

    def _prepare(self, prediction: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray(labels)
        prediction = _as_prediction(prediction)
        if labels.ndim != 2 or prediction.ndim != 2:
            raise ValueError(f"label maps must be 2-D; got {labels.shape} and {prediction.shape}")
        size = self.size if self.size is not None else labels.shape
        labels = resize_nearest(labels, size).astype(np.int64, copy=False)
        prediction = resize_nearest(prediction, size)
        return prediction, labels

    def update(self, prediction: np.ndarray, labels: np.ndarray, refine: Refine | None = None) -> None:
        """Add one image.

        Args:
            prediction: (h, w) non-negative segment ids (any size; resized).
            labels: (H, W) ground-truth class ids (any size; resized).
            refine: optional hook applied to the prediction at the compare
                size just before the final matching -- after the background
                merge when there is a background class, as the paper applies
                PAMR. It gets and returns an (H, W) int label map.
        """
        prediction, labels = self._prepare(prediction, labels)
        n = self.num_classes
        if self.matching == "names":
            self._add_named(prediction, labels)
        elif self.matching == "dataset":
            if refine is not None:
                prediction = _as_prediction(refine(prediction))
            self._accumulate_histogram(confusion_histogram(labels, prediction, n))
        else:
            if self.background_class is not None:
                kept = background_kept_segments(confusion_histogram(labels, prediction, n), self.background_class)
                prediction = merge_background_segments(prediction, kept)
                labels = np.where((labels >= 0) & (labels < n), labels, self.background_class)
            if refine is not None:
                prediction = _as_prediction(refine(prediction))
            counts = hungarian_counts(confusion_histogram(labels, prediction, n)[:n])
            self._tp += counts.true_positives
            self._fp += counts.false_positives
            self._fn += counts.false_negatives
            self._total += counts.total
        self.num_images += 1

    def _add_named(self, prediction: np.ndarray, labels: np.ndarray) -> None:
        """Counts of a class-id prediction against the labels (no matching)."""
        n = self.num_classes
        if self.background_class is not None:
            # As the published open-vocabulary script: every pixel that is not one of the classes
            # (VOC boundaries, COCO unlabeled) is background there, and scored.
            labels = np.where((labels >= 0) & (labels < n), labels, self.background_class)
        scored = (labels >= 0) & (labels < n)
        truth, guess = labels[scored], prediction[scored].astype(np.int64)
        guess = np.where(guess < n, guess, n)  # any out-of-vocabulary id is one wrong class
        hist = np.bincount(truth * (n + 1) + guess, minlength=n * (n + 1)).reshape(n, n + 1)
        tp = np.diag(hist[:, :n]).astype(float)
        fp = hist[:, :n].sum(0) - tp
        fn = hist.sum(1) - tp
        self._tp += tp
        self._fp += fp
        self._fn += fn
        self._total += int(scored.sum())
        self._image_mious.append(scores_from_counts(tp, fp, fn, int(scored.sum()))[0])

    def _accumulate_histogram(self, hist: np.ndarray) -> None:
        if hist.shape[1] > self._hist.shape[1]:
            self._hist = np.pad(self._hist, ((0, 0), (0, hist.shape[1] - self._hist.shape[1])))
        self._hist[:, : hist.shape[1]] += hist

    def compute(self) -> EvaluationResult:
        """Scores of everything added so far."""
        assignment = None
        if self.matching == "dataset":
            hist = self._hist
            if self.background_class is not None:
                scored = merge_background_histogram(hist, self.background_class)
            else:
                scored = hist[: self.num_classes]
            counts = hungarian_counts(scored)
            tp, fp, fn, total = counts.true_positives, counts.false_positives, counts.false_negatives, counts.total
            assignment = counts.assignment
        else:
            tp, fp, fn, total = self._tp, self._fp, self._fn, self._total
        miou, accuracy, iou = scores_from_counts(tp, fp, fn, total)
        per_image = None
        if self.matching == "names":
            valid = [v for v in self._image_mious if not math.isnan(v)]
            per_image = float(np.mean(valid)) if valid else float("nan")
        return EvaluationResult(
            miou=miou,
            pixel_accuracy=accuracy,
            per_class_iou=iou,
            true_positives=tp.copy(),
            false_positives=fp.copy(),
            false_negatives=fn.copy(),
            total_pixels=int(total),
            num_images=self.num_images,
            matching=self.matching,
            assignment=assignment,
            per_image_miou=per_image,
        )


def evaluate_pairs(pairs, num_classes: int, **options) -> EvaluationResult:
    """Score an iterable of ``(prediction, labels)`` pairs; options as :class:`SegmentationEvaluator`."""
    evaluator = SegmentationEvaluator(num_classes, **options)
    for prediction, labels in pairs:
        evaluator.update(prediction, labels)
    return evaluator.compute()
