"""Throughput of the labeling job against a plain single-process loop, measured in one run.

Both label the same generated images with the same library calls and write
the same Parquet rows:

* **loop**: one Python process; for each batch of ``--batch-size`` images:
  read, :func:`diffcut.job.inputs.decode_image`, ``FeatureExtractor.extract``,
  float16, :func:`diffcut.method.segmenter.segment_features`,
  :func:`diffcut.job.schema.ok_row`; one ``pyarrow.parquet.write_table`` at the
  end. torch may use every core. Model loading is timed separately and not
  counted.
* **job**: :func:`diffcut.job.pipeline.label_dataset` with an embedded Ray on
  127.0.0.1 (started by the job, as ``python jobs/label.py`` does). Its
  ``images_per_second`` counts from the start of the Ray Data execution to
  the last shard written, so actor start-up and model loading *are* inside
  it; Ray's own start is reported apart.

Loop and job alternate ``--repeats`` times; prints one JSON object with every
pair's rates and the median of ``job / loop``.

Example (what benchmarks/RESULTS.md records)::

    python benchmarks/pipeline.py --images 1000 --resolution 128 --extractor-pool-max 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of varied sizes (about 160 to 400 px a side, several aspect ratios)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        width, height = int(rng.integers(160, 400)), int(rng.integers(160, 400))
        image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
            x1, y1 = x0 + int(rng.integers(20, width)), y0 + int(rng.integers(20, height))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = folder / f"img_{index:05d}.jpg"
        image.save(path, quality=85)
        paths.append(path)
    return paths


def run_loop(paths: list[Path], output: Path, *, model: str, resolution: int, batch_size: int) -> dict:
    """The plain single-process loop over the same library calls as the job's stages."""
    import pyarrow.parquet as pq
    import torch

    from diffcut.job import inputs, schema
    from diffcut.method.features import FeatureExtractor
    from diffcut.method.segmenter import segment_features

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = time.perf_counter()
    extractor = FeatureExtractor.from_pretrained(model, device="cpu")
    load_seconds = time.perf_counter() - loaded
    params = schema.params_json({"model": model, "resolution": resolution})

    started = time.perf_counter()
    decoded = []
    for path in paths:
        image = inputs.decode_image(path.read_bytes(), lambda w, h: inputs.model_size(w, h, resolution))
        decoded.append((path, image))
    rows = []
    # Same grouping as the feature actors: one model call per bucket chunk.
    by_size: dict[tuple, list] = {}
    for path, image in decoded:
        by_size.setdefault(image.pixels.shape, []).append((path, image))
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            pixels = torch.from_numpy(np.stack([image.pixels for _, image in chunk])).permute(0, 3, 1, 2)
            features = extractor.extract(pixels.float() / 255).to(torch.float16).numpy()
            for (path, image), grid in zip(chunk, features):
                result = segment_features(grid, (image.height, image.width))
                rows.append(
                    schema.ok_row(
                        image_id=str(path),
                        source=str(path),
                        width=image.width,
                        height=image.height,
                        mask=result.mask,
                        latent_labels=result.latent_labels,
                        descriptors=result.embeddings,
                        tree=result.tree.to_dict(),
                        params=params,
                    )
                )
    output.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.rows_to_table(rows), output / "labels-loop.parquet")
    seconds = time.perf_counter() - started
    return {
        "images": len(rows),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(rows) / seconds, 3),
        "model_load_seconds": round(load_seconds, 3),
        "torch_threads": torch.get_num_threads(),
    }


def run_job(folder: Path, output: Path, *, model: str, resolution: int, batch_size: int, flags: dict) -> dict:
    import ray

    from diffcut.job.pipeline import label_dataset
    from diffcut.job.ray_session import connect_ray
    from diffcut.job.settings import job_arguments

    started = time.perf_counter()
    connect_ray(None, flags["decode_cpus"] + flags["extractor_cpus"] + flags["ncut_cpus"])
    ray_start = time.perf_counter() - started
    try:
        summary = label_dataset(
            str(folder),
            str(output),
            **job_arguments(
                dict(model=model, device="cpu", resolution=resolution, batch_size=batch_size, overwrite=True, **flags)
            ),
        )
    finally:
        ray.shutdown()
    return {
        "images": summary["processed"],
        "ok": summary["ok"],
        "seconds": summary["seconds"],
        "images_per_second": summary["images_per_second"],
        "ray_start_seconds": round(ray_start, 3),
        **flags,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decode-cpus", type=float, default=0.5)
    parser.add_argument("--extractor-cpus", type=float, default=0.5)
    parser.add_argument("--ncut-cpus", type=float, default=0.5)
    parser.add_argument("--ncut-pool-max", type=int, default=2)
    parser.add_argument("--extractor-pool-max", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="loop/job pairs, alternating")
    parser.add_argument("--keep", action="store_true", help="keep the generated images and outputs")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="diffcut-bench-"))
    flags = dict(
        decode_cpus=args.decode_cpus,
        extractor_cpus=args.extractor_cpus,
        ncut_cpus=args.ncut_cpus,
        ncut_pool_max=args.ncut_pool_max,
        extractor_pool_max=args.extractor_pool_max,
    )
    try:
        paths = make_images(work / "images", args.images)
        pairs = []
        # Alternate loop and job, so that load from other processes on a shared machine hits both
        # alike; the ratio reported is the median of the per-pair ratios.
        for repeat in range(args.repeats):
            loop = run_loop(
                paths, work / f"loop{repeat}", model=args.model, resolution=args.resolution, batch_size=args.batch_size
            )
            job = run_job(
                work / "images",
                work / f"job{repeat}",
                model=args.model,
                resolution=args.resolution,
                batch_size=args.batch_size,
                flags=flags,
            )
            pairs.append(
                {
                    "loop": loop,
                    "job": job,
                    "ratio_job_over_loop": round(job["images_per_second"] / loop["images_per_second"], 3),
                }
            )
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (", CUDA" if _has_cuda() else ", no GPU"),
            "images": args.images,
            "resolution": args.resolution,
            "model": args.model,
            "batch_size": args.batch_size,
            "runs": pairs,
            "ratio_job_over_loop": round(float(np.median([p["ratio_job_over_loop"] for p in pairs])), 3),
        }
        print(json.dumps(result, indent=2))
        print(
            f"job / loop images per second: {result['ratio_job_over_loop']} (median of {len(pairs)} pairs: "
            + ", ".join(f"{p['job']['images_per_second']} / {p['loop']['images_per_second']}" for p in pairs)
            + ")"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
