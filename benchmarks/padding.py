"""Blank images in the feature stage's model calls, with and without size-ordered decoding.

Every model call of the feature stage holds exactly ``--batch-size`` images of
one input size (bucket), padded with blank images when a feature batch has
fewer of that size (:class:`diffcut.job.stages.FeatureStage`; why in
docs/output-format.md, "Determinism"). Padding is model work -- GPU time on a
GPU run -- spent on nothing. :func:`diffcut.job.stages.decode_stage` orders the
records of each read/decode batch by input size (from the image headers)
before decoding, so the rows reach the feature batches grouped by bucket.

This script runs the real ``decode_stage`` over generated JPEG files at the
chosen resolution, in read/decode batches of each ``--decode-batch-sizes``
value, cuts its output into feature batches of ``4 * batch_size`` rows as the
job does, and counts the images the model runs with
:func:`diffcut.job.feature_batches.model_calls` -- the function the feature stage runs.
The baseline is the same rows in input (file) order: what the feature stage
saw before the ordering. Ray Data may interleave the decoded blocks of
concurrent decode tasks; they are ``4 * batch_size`` rows long, one feature
batch each, so this sequential model is close.

Size mixes (stated assumptions, not measured datasets):

* ``photo``: camera and web sizes -- 640x480 (40 %), 480x640 (15 %), 640x427
  (15 %), 427x640 (10 %), 1280x720 (10 %), 500x500 (5 %), 1024x768 (5 %).
* ``mixed``: width and height each uniform in 320..1280 px (web crawls,
  crops): aspect ratios from 1:4 to 4:1, many buckets.

Prints one JSON object per (mix, batch size, decode batch size): model images
per real image in file order and ordered, and their ratio.

Example (what benchmarks/RESULTS.md records)::

    python benchmarks/padding.py --images 2000
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTO_SIZES = [
    ((640, 480), 0.40),
    ((480, 640), 0.15),
    ((640, 427), 0.15),
    ((427, 640), 0.10),
    ((1280, 720), 0.10),
    ((500, 500), 0.05),
    ((1024, 768), 0.05),
]


def image_sizes(mix: str, count: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    if mix == "photo":
        choices = rng.choice(len(PHOTO_SIZES), size=count, p=[weight for _, weight in PHOTO_SIZES])
        return [PHOTO_SIZES[c][0] for c in choices]
    if mix == "mixed":
        return [(int(w), int(h)) for w, h in rng.integers(320, 1281, size=(count, 2))]
    raise ValueError(f"unknown mix {mix!r}")


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[str]:
    """One flat-colour JPEG per size (the header is what the ordering reads; decoding stays cheap)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, size in enumerate(sizes):
        buffer = io.BytesIO()
        Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3))).save(buffer, "JPEG", quality=70)
        path = folder / f"img_{index:05d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    return paths


def model_images(sizes: list[tuple[int, int]], batch_size: int, feature_batch: int) -> int:
    """Images the model runs for rows arriving in this order (padding included)."""
    from diffcut.job.feature_batches import model_calls

    calls = 0
    for start in range(0, len(sizes), feature_batch):
        calls += len(model_calls(sizes[start : start + feature_batch], batch_size))
    return calls * batch_size


def decode_in_batches(paths: list[str], *, resolution: int, decode_batch_size: int) -> list[tuple[int, int]]:
    """Input sizes of the rows ``decode_stage`` yields, in the order it yields them (the concatenation of
    its outputs over read/decode batches of ``decode_batch_size`` files)."""
    from diffcut.job import inputs
    from diffcut.job.stages import decode_stage

    units = inputs.plan_image_files(paths).units
    rows: list[tuple[str, tuple[int, int]]] = []
    for start in range(0, units.num_rows, decode_batch_size):
        # The block length (chunk_rows) does not change the order of the rows.
        for block in decode_stage(
            units.slice(start, decode_batch_size),
            image_column="image",
            resolution=resolution,
            resize="bucket",
            stride=inputs.DEFAULT_STRIDE,
            mask_size="model",
            max_image_pixels=inputs.DEFAULT_MAX_IMAGE_PIXELS,
            keep_image_bytes=False,
            chunk_rows=decode_batch_size,
        ):
            for row in block.select(["source", "pixel_width", "pixel_height", "status"]).to_pylist():
                assert row["status"] == "ok", row
                rows.append((row["source"], (row["pixel_height"], row["pixel_width"])))
    assert sorted(source for source, _ in rows) == sorted(paths)  # every image exactly once
    return rows


def compare(rows: list[tuple[str, tuple[int, int]]], paths: list[str], batch_size: int) -> dict:
    feature_batch = 4 * batch_size  # as diffcut.job.dataflow.run_stages hands rows to a feature actor
    position = {path: index for index, path in enumerate(paths)}
    ordered = [size for _, size in rows]
    in_file_order = [size for _, size in sorted(rows, key=lambda item: position[item[0]])]
    baseline = model_images(in_file_order, batch_size, feature_batch) / len(paths)
    now = model_images(ordered, batch_size, feature_batch) / len(paths)
    return {
        "images": len(paths),
        "buckets": len(set(ordered)),
        "batch_size": batch_size,
        "feature_batch_rows": feature_batch,
        "model_images_per_image_file_order": round(baseline, 3),
        "model_images_per_image_ordered": round(now, 3),
        "model_work_ratio": round(baseline / now, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--mixes", default="photo,mixed")
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--decode-batch-sizes", default="16,64")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffcut-padding-") as scratch:
        for mix in args.mixes.split(","):
            paths = write_images(Path(scratch) / mix, image_sizes(mix, args.images))
            for decode_batch_size in (int(v) for v in args.decode_batch_sizes.split(",")):
                rows = decode_in_batches(paths, resolution=args.resolution, decode_batch_size=decode_batch_size)
                for batch_size in (int(v) for v in args.batch_sizes.split(",")):
                    result = compare(rows, paths, batch_size)
                    print(json.dumps({"mix": mix, "decode_batch_size": decode_batch_size, **result}), flush=True)


if __name__ == "__main__":
    main()
