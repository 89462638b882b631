#!/usr/bin/env python
"""CPU time per image of the NCut stage, for sizing CPU cores per GPU (infra/README.md).

Times, on one core (an NCut actor holds ``--ncut-cpus 1``), what a segmentation actor does
per image at the paper's setting: a 32x32x1280 feature map (SSD-1B at 1024x1024) ->
``recursive_ncut`` (tau 0.5, alpha 10, with the split tree) -> ``assign_concepts`` at the
mask size (1024x1024 by default) -> descriptors and the output row (PNG masks, tree JSON),
i.e. ``segment_features`` + ``schema.ok_row``. Optionally PAMR (``--refine``). Also the
read/decode task's work for one JPEG (decode, resize to the model input).

The feature maps are synthetic: ``--regions`` areas (random centres, nearest-centre cells)
with a random direction each plus per-cell noise, which gives the cut a structure to find;
the segment count drives the cost, so several counts are timed. I.i.d. random features
(no structure: the cut splits them down to single cells, 1024 segments) are timed as a
pathological case. Times are per image, median and mean over ``--repeats`` different maps,
after one warm-up.

    python infra/measure_ncut_time.py            # the numbers in benchmarks/RESULTS.md
    python infra/measure_ncut_time.py --refine   # with PAMR at the mask size
"""

from __future__ import annotations

import os

# One core per NCut actor: keep BLAS / OpenMP / torch from using more than one.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffcut.job import inputs, schema  # noqa: E402
from diffcut.method.assign import assign_concepts  # noqa: E402
from diffcut.method.ncut import recursive_ncut  # noqa: E402
from diffcut.method.segmenter import segment_features  # noqa: E402


def structured_features(rng: np.random.Generator, size: int, dim: int, regions: int, noise: float) -> np.ndarray:
    """(size, size, dim) float16-rounded features: ``regions`` areas with distinct directions."""
    centres = rng.uniform(0, size, (regions, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    cells = np.stack([yy.ravel(), xx.ravel()], 1)
    nearest = np.argmin(((cells[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    directions = rng.normal(size=(regions, dim))
    features = directions[nearest] + noise * rng.normal(size=(size * size, dim))
    # Features cross the pipeline's stages as float16.
    return features.reshape(size, size, dim).astype(np.float16).astype(np.float32)


def random_features(rng: np.random.Generator, size: int, dim: int) -> np.ndarray:
    return rng.normal(size=(size, size, dim)).astype(np.float16).astype(np.float32)


def time_one(features: np.ndarray, mask_size: tuple[int, int], refine: bool, image: np.ndarray | None) -> dict:
    t0 = time.perf_counter()
    labels, tree = recursive_ncut(features, tau=0.5, alpha=10.0, return_tree=True)
    t1 = time.perf_counter()
    assign_concepts(features, labels, size=mask_size)
    t2 = time.perf_counter()
    # The whole per-image work of the segmentation actor (NCut and assignment again, PAMR if
    # asked, descriptors, encoded output row), as the pipeline calls it.
    result = segment_features(features, mask_size, tau=0.5, alpha=10.0, refine=refine, image=image)
    schema.ok_row(
        image_id="x",
        source="x",
        width=mask_size[1],
        height=mask_size[0],
        mask=result.mask,
        latent_labels=result.latent_labels,
        descriptors=result.embeddings,
        tree=result.tree.to_dict(),
        params="{}",
    )
    t3 = time.perf_counter()
    return {"ncut": t1 - t0, "assign": t2 - t1, "actor": t3 - t2, "segments": int(labels.max()) + 1}


def time_decode(rng: np.random.Generator, repeats: int, resolution: int) -> str:
    """Decode + resize of a 1280x960 JPEG to the model's input, as the read/decode task does it."""
    import io

    from PIL import Image

    smooth = rng.uniform(0, 255, (30, 40, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(smooth).resize((1280, 960), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    rule = lambda w, h: inputs.model_size(w, h, resolution, "bucket")  # noqa: E731
    inputs.decode_image(data, rule)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decoded = inputs.decode_image(data, rule)
        times.append(time.perf_counter() - t0)
    height, width = decoded.pixels.shape[:2]
    return (
        f"decode + resize of a 1280x960 JPEG ({len(data) // 1024} KiB) to {width}x{height}: "
        f"{statistics.median(times):.3f} s median / {statistics.mean(times):.3f} s mean"
    )


def summarize(name: str, runs: list[dict]) -> str:
    def stat(key: str) -> str:
        values = [r[key] for r in runs]
        return f"{statistics.median(values):.3f} s median / {statistics.mean(values):.3f} s mean"

    segments = [r["segments"] for r in runs]
    return (
        f"{name}: recursive_ncut {stat('ncut')}; assign_concepts {stat('assign')}; "
        f"whole actor step {stat('actor')}; segments {min(segments)}-{max(segments)} "
        f"(median {statistics.median(segments):g})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="feature grid side (32 for SDXL-type at 1024)")
    parser.add_argument("--dim", type=int, default=1280, help="feature channels (1280 for SSD-1B)")
    parser.add_argument(
        "--regions", default="4,8,16,32", help="areas in the structured feature maps (comma-separated: one line each)"
    )
    parser.add_argument(
        "--unstructured",
        type=int,
        default=2,
        help="maps of i.i.d. normal features to time (the cut splits them into every cell)",
    )
    parser.add_argument("--noise", type=float, default=0.5, help="per-cell noise relative to the region directions")
    parser.add_argument("--mask", type=int, default=1024, help="mask side for assign_concepts (and PAMR)")
    parser.add_argument("--refine", action="store_true", help="include PAMR in the actor step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    mask_size = (args.mask, args.mask)
    image = rng.uniform(0, 1, (args.mask, args.mask, 3)).astype(np.float32) if args.refine else None
    print(
        f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"features {args.size}x{args.size}x{args.dim}, mask {args.mask}x{args.mask}, refine {args.refine}"
    )

    print(time_decode(rng, args.repeats, args.mask), flush=True)
    regions = [int(r) for r in args.regions.split(",") if r]
    time_one(structured_features(rng, args.size, args.dim, regions[0], args.noise), mask_size, args.refine, image)
    for count in regions:
        runs = [
            time_one(structured_features(rng, args.size, args.dim, count, args.noise), mask_size, args.refine, image)
            for _ in range(args.repeats)
        ]
        print(summarize(f"structured, {count} regions", runs), flush=True)
    if args.unstructured:
        runs = [
            time_one(random_features(rng, args.size, args.dim), mask_size, args.refine, image)
            for _ in range(args.unstructured)
        ]
        print(summarize("unstructured (pathological: i.i.d. normal)", runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
