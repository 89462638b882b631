"""``diffcut gallery``: a static HTML gallery of labeled images (see :mod:`diffcut.tools.gallery`)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffcut.tools.gallery import DEFAULT_PER_PAGE, DEFAULT_THUMB_SIZE

    parser.add_argument("--input", "-i", required=True, help="output of `diffcut label` (directory or s3:// prefix)")
    parser.add_argument(
        "--out", "--output", "-o", dest="out", required=True, help="the gallery folder (open index.html in a browser)"
    )
    parser.add_argument("--per-page", type=int, default=DEFAULT_PER_PAGE, help="images per page (default 50)")
    parser.add_argument(
        "--thumb-size",
        type=int,
        default=DEFAULT_THUMB_SIZE,
        help="longest side of the thumbnails in pixels (default 256)",
    )
    parser.add_argument(
        "--images",
        "--images-root",
        dest="images_root",
        default=None,
        help="where relative image sources are (default: the current directory)",
    )
    parser.add_argument("--image-column", default="image", help="image column of Parquet inputs (default image)")
    parser.add_argument("--limit", type=int, default=None, help="show at most this many labeled images")
    parser.add_argument("--title", default=None, help="page title (default: the labels' location)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    from diffcut.job.inputs import InputError, join_uri
    from diffcut.tools.gallery import build_gallery

    try:
        summary = build_gallery(
            args.input,
            args.out,
            per_page=args.per_page,
            thumb_size=args.thumb_size,
            images_root=args.images_root,
            image_column=args.image_column,
            limit=args.limit,
            title=args.title,
        )
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"diffcut gallery: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    print(
        f"gallery of {summary.images} images on {summary.pages} page(s) ({summary.without_picture} without "
        f"their picture), {summary.error_rows} error rows listed"
    )
    print(f"open {join_uri(summary.output, 'index.html')}")
    return 0
