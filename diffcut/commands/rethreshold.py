"""``diffcut rethreshold``: re-cut labeled data at a smaller tau from the stored split trees.

No model, no GPU: every row's split tree is pruned at the new threshold
(docs/method.md §2.3). Latent labels equal a fresh run at that tau; the full-size
mask is the union of the merged segments (see :mod:`diffcut.tools.rethreshold`).

A named output (made with ``--vocabulary``) is named again: the new segments
get classes from the CLIP and vocabulary its ``params`` record (or
``--vocabulary`` / ``--naming-model``), on the image read again from each
row's ``source``; a row whose image cannot be read becomes an error row.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "-i", required=True, help="output of `diffcut label` (directory or s3:// prefix)")
    parser.add_argument(
        "--tau",
        "-t",
        required=True,
        type=float,
        help="new NCut threshold, at most the tau the labels were computed with",
    )
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        help="where to write the re-thresholded labels (the same command again resumes there)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the labels under --output (without it, other labels there are refused)",
    )
    naming = parser.add_argument_group("naming (outputs made with --vocabulary)")
    naming.add_argument(
        "--vocabulary",
        default=None,
        help="name the new segments with this vocabulary (voc, context, coco-object or FILE) "
        "instead of the recorded one; also names an output made without one",
    )
    naming.add_argument(
        "--naming-model", default=None, help="CLIP to name with instead of the recorded one (tiny-random for tests)"
    )
    naming.add_argument("--device", default="cpu", help="device of the naming CLIP (default cpu)")
    naming.add_argument(
        "--images-root",
        default=None,
        help="folder that relative sources are resolved against (default: the working directory)",
    )
    naming.add_argument(
        "--image-column",
        default="image",
        help="image column of Parquet inputs (file.parquet#row=N sources; default image)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    from diffcut.job.inputs import InputError
    from diffcut.tools.rethreshold import rethreshold_labels

    try:
        summary = rethreshold_labels(
            args.input,
            args.output,
            args.tau,
            overwrite=args.overwrite,
            vocabulary=args.vocabulary,
            naming_model=args.naming_model,
            device=args.device,
            images_root=args.images_root,
            image_column=args.image_column,
        )
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"diffcut rethreshold: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    print(
        f"re-thresholded {summary.rows} rows ({summary.ok} ok, {summary.error} error) "
        f"of {summary.units} unit(s) at tau={summary.tau:g}"
        + (f"; {summary.units_done_before} unit(s) were done already" if summary.units_done_before else "")
    )
    if summary.named:
        print(
            f"named the new segments again: {summary.renamed} rows; {summary.renaming_failed} rows could not be "
            "named and are error rows now (see their error column)"
        )
    print(f"segments: {summary.segments_before} -> {summary.segments_after}")
    print(f"output {summary.output}")
    return 0
