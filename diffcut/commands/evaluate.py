"""``diffcut evaluate``: score predicted label maps against ground truth (docs/method.md §3).

Ground truth: a folder of single-channel PNG label maps (searched
recursively). Predictions: a folder of PNG label maps with the same file
stems, or the labeling job's Parquet output (its ``--output``, one of its
label files, or a folder of such files) whose ``mask`` column holds
PNG-encoded label maps, matched by the base name of ``image_id`` without
its extension. Rows whose ``status`` is not
``"ok"`` are skipped and counted. With ``--matching names`` a Parquet output's
``semantic_mask`` column (class ids; outputs made with ``--vocabulary``) is
scored instead of ``mask`` (segment ids).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from diffcut.evaluation.protocol import (
    COMPARE_SIZE,
    IGNORE_INDEX,
    MATCHING_MODES,
    EvaluationResult,
    SegmentationEvaluator,
)

_ROW_COLUMNS = ("image_id", "status")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--predictions",
        "-p",
        required=True,
        type=Path,
        help="folder of predicted PNG label maps, or Parquet output of `diffcut label`",
    )
    parser.add_argument(
        "--ground-truth", "-g", required=True, type=Path, help="folder of ground-truth PNG label maps (same file stems)"
    )
    parser.add_argument("--num-classes", "-n", required=True, type=int, help="N: labels in [0, N) are classes")
    parser.add_argument(
        "--ignore-index",
        type=int,
        default=IGNORE_INDEX,
        help="ignored label (default 255; every label outside [0, N) is ignored)",
    )
    parser.add_argument(
        "--background-class",
        type=int,
        default=None,
        help="background class id: many-to-one background merge (VOC, Context, COCO-Object)",
    )
    parser.add_argument(
        "--matching",
        choices=MATCHING_MODES,
        default="per-image",
        help="per-image Hungarian matching (paper), one matching over the whole dataset, or names: predictions are "
        "class ids (vocabulary indices), no matching",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=COMPARE_SIZE[0],
        help="compare at SIZE x SIZE, both maps resized with nearest (default 128; 0 = the ground truth's own size)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


# --------------------------------------------------------------------------- inputs
def _png_files_by_stem(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    files: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() != ".png" or not path.is_file():
            continue
        if path.stem in files:
            duplicates.append(f"{files[path.stem]} and {path}")
        files[path.stem] = path
    if duplicates:
        raise ValueError(f"{what}: file stems must be unique; duplicated: " + "; ".join(duplicates[:5]))
    return files


def _format_stems(stems: list[str], limit: int = 20) -> str:
    shown = ", ".join(stems[:limit])
    return shown + (f", ... ({len(stems) - limit} more)" if len(stems) > limit else "")


def _is_label_output(path: Path) -> bool:
    """A folder the labeling job wrote to (its unit records, or rows it staged)."""
    from diffcut.job.units import PARTS_DIR, RECORDS_DIR

    return path.is_dir() and any((path / name).is_dir() for name in (RECORDS_DIR, PARTS_DIR))


def _parquet_files(path: Path) -> list[Path]:
    """The file; a labeling job's output: the label files of its recorded units; any other folder: its Parquet
    files (refusing the labels of an earlier diffcut, ``labels-*.parquet`` directly under it)."""
    from diffcut.job import units
    from diffcut.job.storage import InputError

    if path.is_file():
        return [path]
    if _is_label_output(path):
        files = units.label_files(str(path))
        if not files:
            raise InputError(f"no labels under {path}: the labeling job recorded no unit there yet")
        return [Path(file) for file in files]
    units.check_layout(str(path))
    return sorted(p for p in path.rglob("*.parquet") if p.is_file())


def is_parquet_source(path: Path) -> bool:
    """A ``.parquet`` file, a labeling job's output, or a folder holding Parquet files and no PNGs."""
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    if not path.is_dir():
        return False
    return _is_label_output(path) or (any(path.rglob("*.parquet")) and not any(path.rglob("*.png")))


def iter_parquet_masks(
    path: Path, wanted: set[str], stats: dict, mask_column: str = "mask"
) -> Iterator[tuple[str, np.ndarray]]:
    """(stem, label map from ``mask_column``) for the ``ok`` rows of a Parquet output whose stem is wanted.

    Reads batch by batch, so a large output never sits in memory whole. Of a labeling job's output, it reads
    what :func:`diffcut.job.schema.read_labels` reads: the label files of the recorded units, where every
    ``source`` has one row. In any other folder of Parquet files a file without a readable footer is skipped
    and a ``source`` seen twice keeps its first row. Two *different* images with one stem are an error.
    """
    import pyarrow.parquet as pq

    from diffcut.job.schema import STATUS_OK, decode_mask

    owner: dict[str, str] = {}  # stem -> source (or image_id) of the row that claimed it
    for file in _parquet_files(path):
        try:
            parquet = pq.ParquetFile(file)
        except Exception as error:  # noqa: BLE001 - any unreadable footer: a file cut off, not this tool's to fix
            stats["unreadable"].append(f"{file} ({error.__class__.__name__})")
            continue
        names = parquet.schema_arrow.names
        wanted_columns = [*_ROW_COLUMNS, mask_column]
        missing = [c for c in wanted_columns if c not in names]
        if missing:
            made_without = (
                " (scoring names needs an output made with --vocabulary)" if mask_column == "semantic_mask" else ""
            )
            raise ValueError(
                f"{file}: no column(s) {missing}; expected the labeling job's output "
                f"with columns {wanted_columns}{made_without}"
            )
        columns = [*wanted_columns, "source"] if "source" in names else wanted_columns
        for batch in parquet.iter_batches(columns=columns, batch_size=256):
            rows = batch.to_pydict()
            sources = rows.get("source") or rows["image_id"]
            for image_id, source, status, mask in zip(rows["image_id"], sources, rows["status"], rows[mask_column]):
                stem = Path(str(image_id).replace("\\", "/").rsplit("/", 1)[-1]).stem
                if stem in owner:
                    if owner[stem] == source:
                        stats["duplicates"] += 1
                        continue
                    raise ValueError(
                        f"{file}: two different images share the stem {stem!r}: {owner[stem]!r} and {source!r}"
                    )
                owner[stem] = source
                if status != STATUS_OK:
                    stats["skipped"].append(stem)
                    continue
                if stem not in wanted:
                    stats["unused"] += 1
                    continue
                yield stem, decode_mask(mask)


def iter_png_masks(folder: Path, wanted: set[str], stats: dict) -> Iterator[tuple[str, np.ndarray]]:
    from diffcut.evaluation.datasets import read_label_png

    for stem, path in _png_files_by_stem(folder, "predictions").items():
        if stem not in wanted:
            stats["unused"] += 1
            continue
        yield stem, read_label_png(path)


# --------------------------------------------------------------------------- output
def format_result(result: EvaluationResult, title: str = "") -> str:
    """mIoU, pixel accuracy and a per-class IoU table, as text (percent)."""

    def pct(value: float) -> str:
        return "   n/a" if np.isnan(value) else f"{100 * value:6.2f}"

    lines = [title] if title else []
    lines.append(f"images          {result.num_images}")
    lines.append(f"matching        {result.matching}")
    lines.append(f"mIoU            {pct(result.miou).strip()}")
    if result.per_image_miou is not None:
        lines.append(
            f"per-image mIoU  {pct(result.per_image_miou).strip()}  (mean over images, as the published "
            "open-vocabulary script)"
        )
    lines.append(f"pixel accuracy  {pct(result.pixel_accuracy).strip()}")
    lines.append("")
    lines.append("class    IoU   (n/a: neither in the ground truth nor predicted)")
    for index, value in enumerate(result.per_class_iou):
        lines.append(f"{index:5d} {pct(value)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from diffcut.job.storage import InputError

    try:
        evaluator = SegmentationEvaluator(
            args.num_classes,
            background_class=args.background_class,
            ignore_index=args.ignore_index,
            matching=args.matching,
            size=(args.size, args.size) if args.size > 0 else None,
        )
        ground_truth = _png_files_by_stem(args.ground_truth, "ground truth")
        if not ground_truth:
            raise FileNotFoundError(f"no PNG label maps under {args.ground_truth}")
        wanted = set(ground_truth)
        stats = {"skipped": [], "unused": 0, "duplicates": 0, "unreadable": []}
        if is_parquet_source(args.predictions):
            predictions = iter_parquet_masks(
                args.predictions, wanted, stats, "semantic_mask" if args.matching == "names" else "mask"
            )
        elif args.predictions.is_dir():
            predictions = iter_png_masks(args.predictions, wanted, stats)
        else:
            raise FileNotFoundError(f"predictions {args.predictions}: not a folder of PNGs nor a Parquet file")

        from diffcut.evaluation.datasets import read_label_png

        scored: set[str] = set()
        for stem, prediction in predictions:
            evaluator.update(prediction, read_label_png(ground_truth[stem]))
            scored.add(stem)
        missing = sorted(wanted - scored)
        if missing:
            failed = sorted(set(missing) & set(stats["skipped"]))
            because = f"; {len(failed)} of them failed in the labeling job: {_format_stems(failed)}" if failed else ""
            raise ValueError(
                f"{len(missing)} of {len(wanted)} ground-truth images have no prediction "
                f"(matched by file stem): {_format_stems(missing)}{because}"
            )
    except InputError as error:  # the labels of an earlier diffcut, or none: exit 2 as the other tools
        print(f"diffcut evaluate: error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"diffcut evaluate: error: {error}", file=sys.stderr)
        return 1
    for file in stats["unreadable"]:
        print(f"warning: skipped unreadable Parquet file {file}", file=sys.stderr)
    if stats["skipped"]:
        print(f"warning: skipped {len(stats['skipped'])} prediction row(s) whose status is not 'ok'", file=sys.stderr)
    if stats["duplicates"]:
        print(f"note: {stats['duplicates']} repeated row(s) of the same source ignored", file=sys.stderr)
    if stats["unused"]:
        print(f"note: {stats['unused']} prediction(s) have no ground truth and were not scored", file=sys.stderr)
    result = evaluator.compute()
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(format_result(result))
    return 0
