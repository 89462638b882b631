"""``diffcut export``: labels as COCO JSON (RLE masks) or as folders of label-map PNGs.

``--format coco`` writes one JSON file (``--output`` is the file); ``--format
png`` writes ``<stem>.png`` per image and ``index.csv`` into the folder
``--output``. ``--classes`` takes a ``jobs/discover.py`` output: COCO
categories become its classes, PNGs hold class ids. See :mod:`diffcut.tools.export`.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffcut.tools.export import EXPORT_FORMATS

    parser.add_argument("--input", "-i", required=True, help="output of `diffcut label` (directory or s3:// prefix)")
    parser.add_argument(
        "--format",
        "-f",
        required=True,
        choices=EXPORT_FORMATS,
        help="coco: one COCO JSON file with RLE masks; png: a folder of label-map PNGs",
    )
    parser.add_argument("--output", "-o", required=True, help="the JSON file (coco) or the folder (png)")
    parser.add_argument(
        "--classes",
        default=None,
        help="output of jobs/discover.py: use its dataset-level classes (categories / PNG values)",
    )
    parser.add_argument(
        "--relative-to",
        default=None,
        help="coco: write file_name relative to this prefix when the image id starts with it "
        "(e.g. the labeling job's --input)",
    )
    parser.add_argument(
        "--palette", action="store_true", help="png: write 8-bit palette PNGs (VOC style) instead of grayscale"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    from diffcut.job.inputs import InputError
    from diffcut.tools.export import export_coco, export_png

    try:
        if args.format == "coco":
            if args.palette:
                raise ValueError("--palette applies to --format png only")
            summary = export_coco(args.input, args.output, classes=args.classes, relative_to=args.relative_to)
        else:
            if args.relative_to:
                raise ValueError("--relative-to applies to --format coco only")
            summary = export_png(args.input, args.output, classes=args.classes, palette=args.palette)
    except ImportError as error:
        print(
            f"diffcut export: error: {error}; install the export extra: pip install 'diffcut[export]'", file=sys.stderr
        )
        return 2
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"diffcut export: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    what = f"{summary.annotations} annotations" if summary.format == "coco" else f"{summary.files} PNG files"
    print(
        f"exported {summary.images} images ({what}); {summary.error_rows} error rows left out"
        + (f"; {summary.renamed} file names disambiguated" if summary.renamed else "")
    )
    print(f"output {summary.output}")
    return 0
