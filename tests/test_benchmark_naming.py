"""``diffcut benchmark --vocabulary``: named segments scored as class ids, with the tiny random CLIP.

The benchmark layouts are the real released ones, written small by test_benchmark_datasets' makers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_benchmark_datasets import make_coco, make_voc

from diffcut.cli import main
from diffcut.evaluation.datasets import (
    BENCHMARKS,
    coco_object_table,
    context_d2_table,
    open_benchmark,
    paper_preprocess,
    vocabulary_eval_ids,
)
from diffcut.evaluation.protocol import COMPARE_SIZE, resize_nearest
from diffcut.method import naming

RESOLUTION = 64


def test_vocabulary_indices_map_to_our_evaluation_ids():
    """Checked by class name against the label maps: COCO-Object's background moves from vocabulary 0 to our 80."""
    coco = naming.load_vocabulary("coco-object")
    ids = vocabulary_eval_ids("coco-object", len(coco))
    assert ids.tolist() == [80] + list(range(80))
    by_eval_id = {int(e): coco.class_names[v] for v, e in enumerate(ids)}
    table = coco_object_table()
    # COCO fine ids (stuffthingmaps: category id - 1): 0 person, 12 stop sign, 89 toothbrush, 100 a stuff class.
    assert [by_eval_id[int(table[fine])] for fine in (0, 12, 89, 100)] == [
        "person",
        "stop sign",
        "toothbrush",
        "background",
    ]
    voc, context = naming.load_vocabulary("voc"), naming.load_vocabulary("context")
    assert vocabulary_eval_ids("voc", 21).tolist() == list(range(21))
    assert [voc.class_names[i] for i in (0, 15, 20)] == ["background", "person", "tvmonitor"]
    assert vocabulary_eval_ids("context", 60).tolist() == list(range(60))
    # Context d2 layout: raw 0 (aeroplane), 58 (wood), 255 (background) -> ours 1, 59, 0 = vocabulary order.
    assert [context.class_names[int(context_d2_table()[raw])] for raw in (0, 58, 255)] == [
        "aeroplane",
        "wood piece",
        "background",
    ]
    with pytest.raises(ValueError, match=r"21 classes but benchmark 'context'.*'context' fits"):
        vocabulary_eval_ids("context", 21)


def test_names_matching_with_a_background_scores_ignored_pixels_as_background():
    from diffcut.evaluation.protocol import SegmentationEvaluator

    labels = np.array([[0, 1], [255, 255]])
    with_bg = SegmentationEvaluator(2, background_class=0, matching="names", size=None)
    with_bg.update(np.array([[0, 1], [0, 1]]), labels)
    # Ignored -> background: class 0 TP 2 FN 1 (an ignored pixel predicted 1), class 1 TP 1 FP 1 (that pixel).
    np.testing.assert_allclose(with_bg.compute().per_class_iou, [2 / 3, 1 / 2])
    without = SegmentationEvaluator(2, matching="names", size=None)
    without.update(np.array([[0, 1], [0, 1]]), labels)
    np.testing.assert_allclose(without.compute().per_class_iou, [1.0, 1.0])


def test_a_vocabulary_that_does_not_fit_is_refused_before_any_model_loads(tmp_path, capsys):
    root = make_voc(tmp_path)
    argv = ["benchmark", "--dataset", "voc", "--root", str(root), "--model", "no-such-model", "--quiet"]
    assert main(argv + ["--vocabulary", "context"]) == 1
    assert "60 classes but benchmark 'voc'" in capsys.readouterr().err
    (tmp_path / "five.txt").write_text("a\nb\nc\nd\ne\n")
    assert main(argv + ["--vocabulary", str(tmp_path / "five.txt")]) == 1
    assert "5 classes" in capsys.readouterr().err
    coco = make_coco(tmp_path / "coco-root")  # COCO-Stuff-27 has no built-in vocabulary
    assert (
        main(
            [
                "benchmark",
                "--dataset",
                "coco-stuff",
                "--root",
                str(coco),
                "--limit",
                "3",
                "--model",
                "no-such-model",
                "--vocabulary",
            ]
        )
        == 1
    )
    assert "'coco-stuff' has no built-in vocabulary" in capsys.readouterr().err


def planted_namer(vocabulary: str, target: int):
    """The tiny CLIP arranged so that every segment, whatever its pixels, is named ``target``.

    fc1's bias is raised so the hidden layer is positive, fc2 maps it onto one direction v (a positive multiple
    of v for any input), and the text classifier is +v for the target's synonyms and -v for every other's.
    """
    torch.set_num_threads(1)
    namer = naming.SegmentNamer("tiny-random", vocabulary, device="cpu", resolution=RESOLUTION)
    mlp = namer.clip.visual.head.mlp
    v = torch.nn.functional.normalize(torch.arange(1.0, mlp.fc2.out_features + 1), dim=0)
    with torch.no_grad():
        mlp.fc1.bias += 50.0
        mlp.fc2.weight.copy_(v[:, None].expand_as(mlp.fc2.weight))
    sign = torch.where(namer.synonym_class == target, 1.0, -1.0)
    namer.text = sign[:, None] * v[None]
    return namer


def expected_scores(dataset, predicted_eval_id: int) -> tuple[float, float]:
    """(dataset mIoU, per-image mIoU) of predicting one class everywhere, counted here from the labels alone."""
    spec = dataset.spec
    n = spec.num_classes
    tp, fp, fn = np.zeros(n), np.zeros(n), np.zeros(n)
    per_image = []
    for sample in dataset:
        _, labels = paper_preprocess(sample.image, sample.labels, RESOLUTION)
        labels = resize_nearest(labels, COMPARE_SIZE).astype(np.int64)
        labels = np.where(labels < n, labels, spec.background_class)  # ignored -> background, as published
        counts = np.bincount(labels.ravel(), minlength=n)
        image_tp, image_fp, image_fn = np.zeros(n), np.zeros(n), counts.astype(float)
        image_tp[predicted_eval_id] = counts[predicted_eval_id]
        image_fp[predicted_eval_id] = labels.size - counts[predicted_eval_id]
        image_fn[predicted_eval_id] = 0
        union = image_tp + image_fp + image_fn
        per_image.append(np.mean(image_tp[union > 0] / union[union > 0]))
        tp, fp, fn = tp + image_tp, fp + image_fp, fn + image_fn
    union = tp + fp + fn
    return float(np.mean(tp[union > 0] / union[union > 0])), float(np.mean(per_image))


@pytest.fixture(scope="module")
def segmenter():
    from diffcut.method.features import FeatureExtractor
    from diffcut.method.segmenter import DiffCutSegmenter

    torch.set_num_threads(1)
    return DiffCutSegmenter(FeatureExtractor.from_pretrained("tiny-random", device="cpu"), refine=False)


@pytest.mark.parametrize("vocabulary_index, eval_id", [(0, 80), (1, 0)])  # background, person
def test_planted_names_give_the_scores_counted_from_the_labels(tmp_path, segmenter, vocabulary_index, eval_id):
    """COCO-Object: a CLIP built to call everything vocabulary index k scores as our class (0 -> 80, k -> k-1)."""
    from diffcut.commands.benchmark import run_benchmark

    root = make_coco(tmp_path)
    dataset = open_benchmark("coco-object", root, limit=3)
    namer = planted_namer("coco-object", vocabulary_index)
    results = run_benchmark(dataset, segmenter, resolution=RESOLUTION, batch_size=3, namer=namer)
    miou, per_image = expected_scores(dataset, eval_id)
    result = results["none"]
    assert result.matching == "names" and result.num_images == 3
    assert result.miou == pytest.approx(miou) and result.per_image_miou == pytest.approx(per_image)
    assert result.per_class_iou[eval_id] > 0  # the planted class is present in these labels


@pytest.mark.slow
def test_benchmark_command_with_the_builtin_vocabulary(tmp_path, capsys):
    root = make_voc(tmp_path)
    argv = [
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
        str(RESOLUTION),
        "--vocabulary",
        "--naming-model",
        "tiny-random",
        "--quiet",
    ]
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vocabulary"] == "voc" and report["naming_model"] == "tiny-random"
    none = report["results"]["none"]
    assert none["matching"] == "names" and "paper_miou" not in none
    assert 0 <= none["miou"] <= 1 and 0 <= none["per_image_miou"] <= 1 and len(none["per_class_iou"]) == 21
    assert main(argv + ["--refine"]) == 0
    out = capsys.readouterr().out
    assert "per-image mIoU" in out and "dataset mIoU" in out and "named with voc by tiny-random" in out
    assert "with PAMR" in out and "without PAMR" in out
    assert BENCHMARKS["voc"].num_classes == 21
