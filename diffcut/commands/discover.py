"""Dataset-level classes: ``diffcut discover`` and ``jobs/discover.py`` (:mod:`diffcut.tools.discover`)."""

from __future__ import annotations

import argparse
import json
import sys

from diffcut.tools.discover import DEFAULT_SAMPLE_SIZE, WEIGHTINGS, discover_classes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``jobs/discover.py``."""
    parser.add_argument("--input", "-i", required=True, help="output of `diffcut label` (directory or s3:// prefix)")
    parser.add_argument(
        "--output", "-o", required=True, help="where to write classes-*.parquet, centroids.npy and centroids.json"
    )
    parser.add_argument("--num-classes", "-k", required=True, type=int, help="K, the number of classes")
    parser.add_argument(
        "--sample-size",
        type=int,
        default=DEFAULT_SAMPLE_SIZE,
        help="segments the centroids are fitted on (a uniform sample of segments with pixels)",
    )
    parser.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        default="pixels",
        help="pixels: a segment weighs its share of its image's pixels; segments: every segment 1",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of k-means++")
    parser.add_argument("--max-iter", type=int, default=100, help="k-means iterations per run")
    parser.add_argument("--n-init", type=int, default=3, help="k-means runs from different seeds; the best is kept")
    parser.add_argument("--batch-rows", type=int, default=64, help="label rows per Ray Data batch")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs reserved per Ray Data task")
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else an embedded Ray on 127.0.0.1)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a discover output already at --output")


def run(args: argparse.Namespace) -> int:
    from diffcut.job.inputs import InputError

    try:
        info = discover_classes(
            args.input,
            args.output,
            args.num_classes,
            sample_size=args.sample_size,
            seed=args.seed,
            weighting=args.weighting,
            max_iter=args.max_iter,
            n_init=args.n_init,
            batch_rows=args.batch_rows,
            cpus_per_task=args.cpus_per_task,
            address=args.address,
            overwrite=args.overwrite,
        )
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"discover: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in info.items() if k != "labels_params"}, indent=1))
    return 0
