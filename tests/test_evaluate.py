"""The benchmark metric (docs/method.md §3) and ``diffcut evaluate``.

Hand-computed cases pin each rule of the protocol; a literal step-by-step
re-statement of the published procedure (ignored and background labels as
-1, background last) is compared with the streaming evaluator on random maps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

from diffcut.cli import main
from diffcut.evaluation.protocol import (
    SegmentationEvaluator,
    confusion_histogram,
    evaluate_pairs,
    hungarian_counts,
    merge_background_histogram,
    resize_nearest,
)
from diffcut.job.schema import encode_mask


def score(pairs, num_classes, **options):
    options.setdefault("size", None)
    return evaluate_pairs(pairs, num_classes, **options)


# --------------------------------------------------------------------------- hand-computed cases
def test_ignored_pixels_do_not_count():
    labels = np.array([[0, 0, 1], [1, 255, 1]])
    pred = np.array([[5, 5, 5], [3, 3, 3]])
    # class 0 -> segment 5 (2 px), class 1 -> segment 3 (2 px); the ignored pixel (segment 3) counts nowhere.
    result = score([(pred, labels)], 2)
    np.testing.assert_array_equal(result.true_positives, [2, 2])
    np.testing.assert_array_equal(result.false_negatives, [0, 1])
    np.testing.assert_array_equal(result.false_positives, [1, 0])
    assert result.total_pixels == 5
    np.testing.assert_allclose(result.per_class_iou, [2 / 3, 2 / 3])
    assert result.miou == pytest.approx(2 / 3)
    assert result.pixel_accuracy == pytest.approx(4 / 5)


def test_labels_outside_the_class_range_are_ignored_like_255():
    labels = np.array([[0, 7], [1, 255]])
    pred = np.array([[0, 0], [1, 1]])
    result = score([(pred, labels)], 2)
    assert result.total_pixels == 2
    assert result.miou == 1.0


def test_more_segments_than_classes_unmatched_segments_are_misses():
    labels = np.array([[0, 0, 0, 0], [1, 1, 1, 1]])
    pred = np.array([[0, 0, 1, 1], [2, 2, 2, 3]])
    # class 0 gets segment 0 or 1 (2 px each), class 1 gets segment 2 (3 px).
    result = score([(pred, labels)], 2)
    np.testing.assert_array_equal(result.true_positives, [2, 3])
    np.testing.assert_array_equal(result.false_negatives, [2, 1])
    np.testing.assert_array_equal(result.false_positives, [0, 0])
    np.testing.assert_allclose(result.per_class_iou, [0.5, 0.75])
    assert result.pixel_accuracy == pytest.approx(5 / 8)


def test_absent_classes_take_leftover_segments_as_false_positives():
    labels = np.array([[0, 0, 0, 0], [1, 1, 1, 1]])
    pred = np.array([[0, 0, 1, 1], [2, 2, 2, 3]])
    # N = 4: classes 2 and 3 are absent; the one-to-one matching hands them the
    # two leftover segments (2 px and 1 px), all false positives.
    result = score([(pred, labels)], 4)
    np.testing.assert_allclose(result.per_class_iou, [0.5, 0.75, 0.0, 0.0])
    assert sorted(result.false_positives[2:]) == [1, 2]
    assert result.miou == pytest.approx((0.5 + 0.75) / 4)


def test_absent_classes_without_leftover_segments_are_nan_and_skipped():
    labels = np.array([[0, 0], [1, 1]])
    pred = np.array([[4, 4], [9, 9]])  # ids need not be contiguous
    result = score([(pred, labels)], 4)
    assert result.per_class_iou[:2].tolist() == [1.0, 1.0]
    assert np.isnan(result.per_class_iou[2:]).all()
    assert result.miou == 1.0
    assert result.to_dict()["per_class_iou"] == [1.0, 1.0, None, None]


def test_counts_accumulate_over_images():
    first = (np.array([[0, 0], [1, 1]]), np.array([[0, 0], [1, 1]]))  # perfect
    second = (np.array([[0, 0], [0, 0]]), np.array([[1, 1], [1, 2]]))  # one segment over classes 1 and 2
    # image 2: class 1 -> segment 0 (3 px, FN 0, FP 1); class 2 -> an empty column (FN 1).
    result = score([first, second], 3)
    np.testing.assert_array_equal(result.true_positives, [2, 5, 0])
    np.testing.assert_array_equal(result.false_negatives, [0, 0, 1])
    np.testing.assert_array_equal(result.false_positives, [0, 1, 0])
    np.testing.assert_allclose(result.per_class_iou, [1.0, 5 / 6, 0.0])
    assert result.pixel_accuracy == pytest.approx(7 / 8)
    assert result.num_images == 2


BG_LABELS = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
BG_PRED = np.array([[0, 3, 1, 1], [2, 2, 3, 4]])


def test_background_merge_collects_unmatched_segments():
    # First matching (classes 1, 2 only): 1 -> segment 1, 2 -> segment 2. Segments 0, 3, 4
    # become one segment 5; the ignored pixel becomes background: a perfect score.
    result = score([(BG_PRED, BG_LABELS)], 3, background_class=0)
    np.testing.assert_array_equal(result.true_positives, [4, 2, 2])
    np.testing.assert_array_equal(result.false_positives + result.false_negatives, [0, 0, 0])
    assert result.miou == 1.0 and result.pixel_accuracy == 1.0
    # One-to-one without the merge: background matches a single 1-px segment, the ignored pixel is out.
    plain = score([(BG_PRED, BG_LABELS)], 3)
    assert plain.per_class_iou[0] == pytest.approx(1 / 3)
    assert plain.total_pixels == 7


def test_background_merge_also_takes_segments_matched_to_absent_classes():
    labels = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 1, 2, 3]])
    # N = 3, class 2 absent: whichever segment the first matching gives it is merged too.
    result = score([(pred, labels)], 3, background_class=0)
    np.testing.assert_array_equal(result.true_positives, [2, 2, 0])
    assert np.isnan(result.per_class_iou[2])
    assert result.miou == 1.0
    # The merge works for a background class that is not 0 as well.
    shifted = score([(pred, np.where(labels == 0, 2, labels))], 3, background_class=2)
    assert shifted.miou == 1.0


def test_refine_hook_runs_after_the_merge_and_before_the_final_matching():
    seen = []

    def record(labels):
        seen.append(labels.copy())
        return labels

    same = score([(BG_PRED, BG_LABELS)], 3, background_class=0)
    refined = SegmentationEvaluator(3, background_class=0, size=None)
    refined.update(BG_PRED, BG_LABELS, refine=record)
    np.testing.assert_array_equal(seen[0], [[5, 5, 1, 1], [2, 2, 5, 5]])
    np.testing.assert_array_equal(refined.compute().true_positives, same.true_positives)

    flattened = SegmentationEvaluator(3, background_class=0, size=None)
    flattened.update(BG_PRED, BG_LABELS, refine=lambda labels: np.zeros_like(labels))
    result = flattened.compute()
    # one segment: background (4 px) matches it, FP = the 4 other pixels; classes 1, 2 are all misses.
    np.testing.assert_allclose(result.per_class_iou, [0.5, 0.0, 0.0])
    assert result.pixel_accuracy == pytest.approx(0.5)


def test_dataset_level_matching_uses_one_assignment_for_all_images():
    first = (np.array([[7, 7, 7], [8, 8, 8]]), np.array([[0, 0, 0], [1, 1, 1]]))
    second = (np.array([[8, 7], [7, 7]]), np.array([[0, 1], [1, 1]]))
    # global hist: class 0 = {7: 3, 8: 1}, class 1 = {7: 3, 8: 3} -> 0 -> 7, 1 -> 8
    result = score([first, second], 2, matching="dataset")
    assert result.assignment.tolist() == [7, 8]
    np.testing.assert_array_equal(result.true_positives, [3, 3])
    np.testing.assert_array_equal(result.false_negatives, [1, 3])
    np.testing.assert_array_equal(result.false_positives, [3, 1])
    np.testing.assert_allclose(result.per_class_iou, [3 / 7, 3 / 7])
    assert result.pixel_accuracy == pytest.approx(0.6)
    # per image, each image is matched on its own and both are perfect
    assert score([first, second], 2).miou == 1.0


def test_dataset_level_background_merge_equals_per_image_on_one_image():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels, pred = random_pair(rng, num_classes=5, size=12)
        for background in (0, 4):
            per_image = score([(pred, labels)], 5, background_class=background)
            dataset = score([(pred, labels)], 5, background_class=background, matching="dataset")
            for name in ("true_positives", "false_positives", "false_negatives"):
                np.testing.assert_array_equal(getattr(per_image, name), getattr(dataset, name))


def test_merge_background_histogram_by_hand():
    hist = confusion_histogram(BG_LABELS, BG_PRED, 3)
    merged = merge_background_histogram(hist, 0)
    expected = np.zeros((3, 6), dtype=np.int64)
    expected[0, 5], expected[1, 1], expected[2, 2] = 4, 2, 2
    np.testing.assert_array_equal(merged, expected)


def test_hungarian_pads_to_one_column_per_class():
    counts = hungarian_counts(np.array([[3], [2], [0]]))
    assert sorted(counts.assignment.tolist()) == [0, 1, 2]
    assert counts.true_positives.tolist() == [3, 0, 0]
    assert counts.false_negatives.tolist() == [0, 2, 0]


def test_empty_evaluator_gives_nan_not_warnings():
    with np.errstate(all="raise"):
        result = SegmentationEvaluator(3).compute()
    assert math.isnan(result.miou) and math.isnan(result.pixel_accuracy)
    assert result.to_dict()["miou"] is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ignore_index": 1}, "ignore_index"),
        ({"background_class": 3}, "background_class"),
        ({"matching": "global"}, "matching"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SegmentationEvaluator(3, **options)


def test_negative_or_fractional_predictions_are_refused():
    evaluator = SegmentationEvaluator(2, size=None)
    with pytest.raises(ValueError, match=">= 0"):
        evaluator.update(np.array([[-1, 0]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="integers"):
        evaluator.update(np.array([[0.5, 0]]), np.array([[0, 1]]))


# --------------------------------------------------------------------------- resizing
@pytest.mark.parametrize(
    "shape, size", [((1024, 1024), (128, 128)), ((375, 500), (128, 128)), ((64, 64), (128, 128)), ((7, 13), (5, 4))]
)
def test_resize_nearest_matches_torch_default_nearest(shape, size):
    labels = np.random.default_rng(0).integers(0, 200, size=shape)
    expected = F.interpolate(torch.from_numpy(labels)[None, None].double(), size=size)[0, 0].long().numpy()
    np.testing.assert_array_equal(resize_nearest(labels, size), expected)


def test_both_maps_are_compared_at_the_evaluator_size():
    labels = np.kron(np.array([[0, 1], [1, 0]]), np.ones((256, 256), dtype=np.int64))  # 512 x 512
    pred = np.kron(np.array([[3, 4], [4, 3]]), np.ones((32, 32), dtype=np.int64))  # 64 x 64
    evaluator = SegmentationEvaluator(2)  # 128 x 128
    evaluator.update(pred, labels)
    result = evaluator.compute()
    assert result.total_pixels == 128 * 128
    assert result.miou == 1.0


# --------------------------------------------------------------------------- against a literal re-statement
def reference_scores(pairs, n_class, background):
    """docs/method.md §3 step by step, in the published convention: ignored = -1, background = -1 then N-1."""

    def hist_of(label, pred, n):
        width = max(n, pred.max() + 1)
        keep = (label >= 0) & (label < n)
        return np.bincount(width * label[keep] + pred[keep], minlength=n * width).reshape(n, width)

    tp, fp, fn, total = np.zeros(n_class), np.zeros(n_class), np.zeros(n_class), 0
    for pred, label in pairs:
        pred, label = pred.ravel().copy(), label.ravel().copy()
        if background:
            first = hist_of(label, pred, n_class - 1)
            _, columns = linear_sum_assignment(first, maximize=True)
            label[label == -1] = n_class - 1
            assigned = {columns[g] for g in np.where(first.max(axis=1) > 0)[0]}
            new_id = pred.max() + 1
            for segment in set(np.unique(pred).tolist()) - assigned:
                pred[pred == segment] = new_id
        hist = hist_of(label, pred, n_class)
        rows, columns = linear_sum_assignment(hist, maximize=True)
        tp += hist[rows, columns]
        fn += hist.sum(axis=1) - hist[rows, columns]
        reordered = hist[:, columns]
        fp += reordered.sum(axis=0) - np.diag(reordered)
        total += hist.sum()
    return tp, fp, fn, total


def random_pair(rng, num_classes, size):
    """Blocky labels with some ignored pixels, and a blocky prediction with gaps in its ids."""
    blocks = rng.integers(0, num_classes, size=(3, 3))
    labels = np.kron(blocks, np.ones((size // 3 + 1, size // 3 + 1), dtype=np.int64))[:size, :size]
    labels[rng.random((size, size)) < 0.1] = 255
    ids = rng.choice(12, size=rng.integers(1, 7), replace=False)
    pred = ids[rng.integers(0, len(ids), size=(4, 4))]
    pred = np.kron(pred, np.ones((size // 4 + 1, size // 4 + 1), dtype=np.int64))[:size, :size]
    noise = rng.random((size, size)) < 0.15
    pred[noise] = rng.choice(ids, size=int(noise.sum()))
    return labels, pred


@pytest.mark.parametrize("background", [False, True])
def test_matches_a_literal_restatement_of_the_published_procedure(background):
    rng = np.random.default_rng(11)
    n_class = 6
    pairs = [random_pair(rng, n_class, 16)[::-1] for _ in range(60)]  # (prediction, labels)
    # ours: background is class N-1 (as COCO-Object), ignored is 255
    ours = score(pairs, n_class, background_class=n_class - 1 if background else None)
    ignored_in_reference = [
        (pred, np.where((labels == 255) | ((labels == n_class - 1) & background), -1, labels)) for pred, labels in pairs
    ]
    tp, fp, fn, total = reference_scores(ignored_in_reference, n_class, background)
    np.testing.assert_array_equal(ours.true_positives, tp)
    np.testing.assert_array_equal(ours.false_positives, fp)
    np.testing.assert_array_equal(ours.false_negatives, fn)
    assert ours.total_pixels == total
    with np.errstate(invalid="ignore"):
        assert ours.miou == pytest.approx(np.nanmean(tp / (tp + fp + fn)))


# --------------------------------------------------------------------------- the CLI
def write_png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(labels, dtype=np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_png(gt / "a" / "img1.png", np.kron([[0, 1], [1, 0]], np.ones((20, 20))))
    write_png(gt / "b" / "img2.png", np.kron([[0, 0], [2, 255]], np.ones((20, 30))))
    write_png(pred / "img1.png", np.kron([[5, 6], [6, 5]], np.ones((10, 10))))
    write_png(pred / "nested" / "img2.png", np.kron([[1, 1], [1, 1]], np.ones((20, 30))))
    return gt, pred


def test_cli_on_png_folders_prints_scores(folders, capsys):
    gt, pred = folders
    assert main(["evaluate", "-p", str(pred), "-g", str(gt), "-n", "3"]) == 0
    out = capsys.readouterr().out
    # img2: one segment over classes 0 (2/3 of valid px) and 2 -> class 2 misses everything.
    assert "mIoU" in out and "pixel accuracy" in out
    assert main(["evaluate", "-p", str(pred), "-g", str(gt), "-n", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"miou", "pixel_accuracy", "per_class_iou"}
    # at 128 x 128: img1 perfect (128^2 px); img2 valid px = 3/4 of 128^2, class 0 is 2/3 of them.
    img1 = 128 * 128
    img2_class0, img2_class2 = 128 * 64, 64 * 64
    assert data["per_class_iou"][0] == pytest.approx((img1 / 2 + img2_class0) / (img1 / 2 + img2_class0 + img2_class2))
    assert data["per_class_iou"][1] == 1.0
    assert data["per_class_iou"][2] == 0.0
    assert data["pixel_accuracy"] == pytest.approx((img1 + img2_class0) / (img1 + img2_class0 + img2_class2))


def test_cli_background_class_and_native_size(folders, capsys):
    gt, pred = folders
    assert (
        main(
            ["evaluate", "-p", str(pred), "-g", str(gt), "-n", "3", "--background-class", "0", "--size", "0", "--json"]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    # img1 (40 x 40): perfect. img2 (40 x 60): the one segment survives the first matching (class 2
    # took it); the ignored quarter becomes background, so background (1,800 px) now wins the segment.
    assert data["per_class_iou"][0] == pytest.approx((800 + 1800) / (800 + 1800 + 600))
    assert data["per_class_iou"][1] == 1.0
    assert data["per_class_iou"][2] == 0.0


def test_cli_reports_missing_stems(folders, capsys):
    gt, pred = folders
    write_png(gt / "img3.png", np.zeros((8, 8)))
    write_png(gt / "zz_other.png", np.zeros((8, 8)))
    assert main(["evaluate", "-p", str(pred), "-g", str(gt), "-n", "3"]) == 1
    err = capsys.readouterr().err
    assert "2 of 4 ground-truth images have no prediction" in err
    assert "img3, zz_other" in err


def test_cli_on_labeling_parquet_output(folders, tmp_path, capsys, write_unit):
    gt, pred = folders
    assert main(["evaluate", "-p", str(pred), "-g", str(gt), "-n", "3", "--json"]) == 0
    png_json = json.loads(capsys.readouterr().out)

    masks = {p.stem: np.asarray(Image.open(p)) for p in pred.rglob("*.png")}
    table = pa.table(
        {
            "image_id": ["s3://bucket/images/img1.jpg", "img2.jpeg", "broken.jpg", "unlabeled_extra.jpg"],
            "source": ["s3://bucket/images/img1.jpg", "/data/img2.jpeg", "/data/broken.jpg", "/data/x.jpg"],
            "status": ["ok", "ok", "error", "ok"],
            "mask": [encode_mask(masks["img1"]), encode_mask(masks["img2"]), None, encode_mask(np.zeros((4, 4), int))],
        }
    )
    out = tmp_path / "labels"
    write_unit(out, "u0", table.slice(0, 2))
    write_unit(out, "u1", table.slice(2))
    (out / "_parts").mkdir()  # rows a killed run staged: never read
    pq.write_table(table.slice(0, 1), out / "_parts" / "stray.parquet")
    pq.write_table(table.slice(0, 1), out / "labels" / "unrecorded.parquet")
    assert main(["evaluate", "-p", str(out), "-g", str(gt), "-n", "3", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == png_json
    assert "skipped 1 prediction row(s)" in captured.err and "repeated row" not in captured.err

    # one file works too; a ground-truth image whose row failed is reported as such
    write_png(gt / "broken.png", np.zeros((8, 8)))
    assert main(["evaluate", "-p", str(out / "labels" / "u1.parquet"), "-g", str(gt), "-n", "3"]) == 1
    err = capsys.readouterr().err
    assert "3 of 3 ground-truth images have no prediction" in err
    assert "1 of them failed in the labeling job: broken" in err


def test_cli_dataset_matching(folders, capsys):
    gt, pred = folders
    assert main(["evaluate", "-p", str(pred), "-g", str(gt), "-n", "3", "--matching", "dataset", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["assignment"]) == 3 and data["miou"] is not None
