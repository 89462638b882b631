"""``diffcut rethreshold``: re-cut labeled data at a smaller tau from the stored split trees.

No model, no GPU: every row's split tree is pruned at the new threshold
(DESIGN.md §2.3). Latent labels equal a fresh run at that tau; the full-size
mask is the union of the merged segments (see :mod:`diffcut.tools.rethreshold`).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "-i", required=True, help="output of `diffcut label` (directory or s3:// prefix)")
    parser.add_argument("--tau", "-t", required=True, type=float,
                        help="new NCut threshold, at most the tau the labels were computed with")
    parser.add_argument("--output", "-o", required=True, help="where to write the re-thresholded shards")
    parser.add_argument("--overwrite", action="store_true", help="replace label shards already under --output")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    from diffcut.job.io import InputError
    from diffcut.tools.rethreshold import rethreshold_labels

    try:
        summary = rethreshold_labels(args.input, args.output, args.tau, overwrite=args.overwrite)
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"diffcut rethreshold: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    print(f"re-thresholded {summary.rows} rows ({summary.ok} ok, {summary.error} error rows copied) "
          f"from {summary.shards} shard(s) at tau={summary.tau:g}")
    print(f"segments: {summary.segments_before} -> {summary.segments_after}")
    for uri in summary.skipped_incomplete_shards:
        print(f"warning: skipped incomplete shard {uri}", file=sys.stderr)
    print(f"output {summary.output}")
    return 0
