"""``diffcut benchmark``: the paper's zero-shot segmentation benchmarks, end to end.

Reads a benchmark in its released layout (:mod:`diffcut.evaluation.datasets`),
preprocesses as the paper (centre square crop, image resized to
``--resolution``), runs the whole method (:class:`diffcut.method.segmenter.DiffCutSegmenter`:
features, recursive NCut, concept assignment at 128 x 128), scores with the
per-image protocol (:mod:`diffcut.evaluation.protocol`) and prints our mIoU beside the
paper's (Couairon et al., NeurIPS 2024, Table 1; docs/method.md §2.6).

With ``--refine`` the same segmentations are scored twice, without and with
PAMR; PAMR runs *inside* the protocol as in the published evaluation: after
the background merge, before the final matching, on the image resized to
128 x 128.

With ``--vocabulary`` (VOC, Context, COCO-Object: their built-in class names;
or a FILE with the benchmark's classes in its order) every segment is named by
the CLIP of :mod:`diffcut.method.naming` and the class ids are scored as they are, no
matching (:class:`diffcut.evaluation.protocol.SegmentationEvaluator` ``matching="names"``),
as the authors' ``eval_diffcut_openvoc.py``: the per-image averaged mIoU it
reports and the dataset-level mIoU. Vocabulary indices become evaluation ids
through :func:`diffcut.evaluation.datasets.vocabulary_eval_ids` (COCO-Object: vocabulary
0 "background" is our 80). With ``--refine`` the segments are refined with
PAMR before naming, as there. Differences from the published script: both maps
are compared at 128 x 128 (it compares at 1024 x 1024), and COCO-Object images
are not upsampled to 2048 for CLIP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from diffcut.evaluation.datasets import (
    BENCHMARK_VOCABULARIES,
    BENCHMARKS,
    BenchmarkDataset,
    BenchmarkSpec,
    open_benchmark,
    paper_preprocess,
    resize_bilinear,
    vocabulary_eval_ids,
)
from diffcut.evaluation.protocol import COMPARE_SIZE, EvaluationResult, SegmentationEvaluator
from diffcut.method.defaults import DEFAULT_ALPHA, DEFAULT_MODEL, DEFAULT_TAU
from diffcut.method.naming import DEFAULT_NAMING_MODEL

#: ``--vocabulary`` without a value: the benchmark's own built-in vocabulary.
DATASET_VOCABULARY = "dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--root", required=True, type=Path, help="dataset folder (or the folder holding it)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images")
    parser.add_argument("--refine", action="store_true", help="also score with PAMR refinement (paper's headline)")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"diffusers pipeline: hub id, local folder or tiny-random (default {DEFAULT_MODEL})",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto (float16 on CUDA), float32, bfloat16...")
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU, help=f"NCut threshold (default {DEFAULT_TAU})")
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help=f"affinity exponent (default {DEFAULT_ALPHA:g})"
    )
    parser.add_argument("--resolution", type=int, default=1024, help="input side after the crop (default 1024)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per feature-extraction batch")
    parser.add_argument(
        "--vocabulary",
        nargs="?",
        const=DATASET_VOCABULARY,
        default=None,
        help="name the segments and score the names (no matching): alone, the benchmark's "
        f"built-in class names ({', '.join(sorted(BENCHMARK_VOCABULARIES))}); or one of "
        "those, or FILE (the benchmark's classes in its order, synonyms comma-separated)",
    )
    parser.add_argument(
        "--naming-model",
        default=DEFAULT_NAMING_MODEL,
        help="open_clip ConvNeXt CLIP for --vocabulary: name:pretrained tag, hub id, local folder "
        f"(safetensors), or tiny-random (default {DEFAULT_NAMING_MODEL})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _batches(dataset: BenchmarkDataset, size: int):
    batch = []
    for sample in dataset:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_benchmark(
    dataset: BenchmarkDataset,
    segmenter,
    *,
    resolution: int = 1024,
    refine: bool = False,
    batch_size: int = 4,
    progress=None,
    namer=None,
) -> dict[str, EvaluationResult]:
    """Segment and score every image of ``dataset``.

    Returns ``{"none": result}`` and, with ``refine``, ``{"pamr": result}`` as
    well, both from the same segmentations. ``progress(done, total, results)``
    is called after each batch. With a ``namer`` (:class:`diffcut.method.naming.SegmentNamer`
    whose vocabulary fits the benchmark) the segments are named and scored with
    ``matching="names"`` (refined segments are named after PAMR).
    """
    import torch

    spec = dataset.spec
    stride = int(getattr(segmenter.extractor, "stride", 1))
    if resolution % stride:
        raise ValueError(f"--resolution {resolution} is not a multiple of the model's stride {stride}")

    eval_ids = None if namer is None else vocabulary_eval_ids(spec.name, len(namer.vocabulary))

    def new_evaluator() -> SegmentationEvaluator:
        return SegmentationEvaluator(
            spec.num_classes,
            background_class=spec.background_class,
            ignore_index=spec.ignore_index,
            size=COMPARE_SIZE,
            matching="per-image" if namer is None else "names",
        )

    def named(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The segments' class ids, as evaluation ids, per pixel."""
        names = namer.name(image, mask, int(mask.max()) + 1)
        return eval_ids[names.semantic_mask]

    evaluators = {"none": new_evaluator()}
    if refine:
        from diffcut.method.refine import refine_pamr

        evaluators["pamr"] = new_evaluator()
    done = 0
    for batch in _batches(dataset, batch_size):
        prepared = [paper_preprocess(sample.image, sample.labels, resolution) for sample in batch]
        pixels = torch.from_numpy(np.stack([image.transpose(2, 0, 1) for image, _ in prepared]))
        results = segmenter.segment(pixels, mask_sizes=[COMPARE_SIZE] * len(batch))
        for (image, labels), result in zip(prepared, results):
            # The published evaluation refines with the input image resized to the mask size.
            small = resize_bilinear(image, COMPARE_SIZE) if refine else None
            if namer is not None:
                evaluators["none"].update(named(image, result.mask), labels)
                if refine:
                    evaluators["pamr"].update(named(image, refine_pamr(small, result.mask)), labels)
                continue
            evaluators["none"].update(result.mask, labels)
            if refine:
                evaluators["pamr"].update(
                    result.mask, labels, refine=lambda mask, small=small: refine_pamr(small, mask)
                )
        done += len(batch)
        if progress is not None:
            progress(done, len(dataset), evaluators)
    return {name: evaluator.compute() for name, evaluator in evaluators.items()}


def _pct(value: float | None) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{100 * value:.1f}"


def format_table(spec: BenchmarkSpec, results: dict[str, EvaluationResult], header: str) -> str:
    """Our mIoU and pixel accuracy beside the paper's mIoU, one row per refinement setting.

    Named results (``matching="names"``) show the per-image averaged mIoU (the
    published open-vocabulary script's) and the dataset-level mIoU instead; the
    paper's unsupervised mIoU is not comparable to them and is not shown.
    """
    paper = {"none": spec.paper_miou, "pamr": spec.paper_miou_pamr}
    names = {"none": "without PAMR", "pamr": "with PAMR"}
    if any(result.matching == "names" for result in results.values()):
        rows = [("", "per-image mIoU", "dataset mIoU", "pixel acc.")]
        cells = lambda r: (_pct(r.per_image_miou), _pct(r.miou), _pct(r.pixel_accuracy))  # noqa: E731
    else:
        rows = [("", "mIoU ours", "mIoU paper", "pixel acc. ours")]
        cells = None
    for key in ("none", "pamr"):
        if key in results:
            if cells is not None:
                rows.append((names[key], *cells(results[key])))
            else:
                rows.append(
                    (names[key], _pct(results[key].miou), f"{paper[key]:.1f}", _pct(results[key].pixel_accuracy))
                )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [header]
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        dataset = open_benchmark(args.dataset, args.root, limit=args.limit)
    except (OSError, ValueError) as error:
        print(f"diffcut benchmark: error: {error}", file=sys.stderr)
        return 1
    if args.batch_size < 1:
        print("diffcut benchmark: error: --batch-size must be >= 1", file=sys.stderr)
        return 2

    spec = dataset.spec
    vocabulary = None
    if args.vocabulary is not None:
        from diffcut.method.naming import load_vocabulary

        spec_name = BENCHMARK_VOCABULARIES.get(spec.name) if args.vocabulary == DATASET_VOCABULARY else args.vocabulary
        try:
            if spec_name is None:
                raise ValueError(
                    f"benchmark {spec.name!r} has no built-in vocabulary (built in: "
                    f"{', '.join(sorted(BENCHMARK_VOCABULARIES))}); pass --vocabulary FILE"
                )
            vocabulary = load_vocabulary(spec_name)
            vocabulary_eval_ids(spec.name, len(vocabulary))  # a vocabulary that does not fit fails here, early
        except (OSError, ValueError) as error:
            print(f"diffcut benchmark: error: --vocabulary: {error}", file=sys.stderr)
            return 1

    from diffcut.method.features import FeatureExtractor
    from diffcut.method.segmenter import DiffCutSegmenter

    extractor = FeatureExtractor.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    segmenter = DiffCutSegmenter(extractor, tau=args.tau, alpha=args.alpha, refine=False)
    namer = None
    if vocabulary is not None:
        from diffcut.method.naming import SegmentNamer

        namer = SegmentNamer(args.naming_model, vocabulary, device=str(extractor.device), resolution=args.resolution)

    step = max(1, len(dataset) // 20)  # about twenty progress lines per run
    last_line = {"at": 0}

    def progress(done: int, total: int, evaluators) -> None:
        if args.quiet or (done // step == last_line["at"] // step and done < total):
            return
        last_line["at"] = done
        scores = "  ".join(f"mIoU {name} {_pct(ev.compute().miou)}" for name, ev in evaluators.items())
        print(f"[{done}/{total}] {scores}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    try:
        results = run_benchmark(
            dataset,
            segmenter,
            resolution=args.resolution,
            refine=args.refine,
            batch_size=args.batch_size,
            progress=progress,
            namer=namer,
        )
    except ValueError as error:
        print(f"diffcut benchmark: error: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    throughput = len(dataset) / seconds if seconds > 0 else float("nan")
    device = str(extractor.device)

    naming = {} if namer is None else {"vocabulary": vocabulary.name, "naming_model": args.naming_model}
    if args.json:
        print(
            json.dumps(
                {
                    "dataset": spec.name,
                    "title": spec.title,
                    "layout": dataset.layout,
                    "images": len(dataset),
                    "limit": args.limit,
                    "model": args.model,
                    "device": device,
                    "tau": args.tau,
                    "alpha": args.alpha,
                    "resolution": args.resolution,
                    "images_per_second": throughput,
                    **naming,
                    "results": {
                        key: {
                            **result.to_dict(),
                            **(
                                {}
                                if namer is not None
                                else {"paper_miou": (spec.paper_miou if key == "none" else spec.paper_miou_pamr) / 100}
                            ),
                        }
                        for key, result in results.items()
                    },
                }
            )
        )
        return 0
    named = "" if namer is None else f", named with {vocabulary.name} by {args.naming_model}"
    header = (
        f"DiffCut zero-shot benchmark: {spec.title} ({spec.name}), {len(dataset)} images, model {args.model}, "
        f"tau {args.tau:g}, alpha {args.alpha:g}, resolution {args.resolution}, {device}{named}"
    )
    print(format_table(spec, results, header))
    if args.limit is not None:
        print(f"note: ours over the first {len(dataset)} images only; the paper's over the whole split")
    print(f"throughput: {throughput:.2f} images/s (reading, features, NCut, scoring)")
    return 0
