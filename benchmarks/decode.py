"""Decode + resize throughput of one CPU core, as the job's read/decode tasks do it.

``diffcut.job.inputs.decode_image`` (open, EXIF orientation, RGB, bilinear resize to the model
input size; JPEG decoded at a reduced DCT scale when the target is smaller) on one thread,
for JPEG (quality 90) and PNG sources: 1024x1024 (the model size itself: decode only),
2048x1536 (3 MP, resized to its 1024 bucket) and 4032x3024 (12 MP phone photo). The
images are photo-like (smooth structure plus sensor-like noise) so that they compress as
photos do; random noise would make PNG unrealistically large and slow.

    python benchmarks/decode.py [--seconds 3]

Prints images/s per core and the cores a GPU needs to be fed at 40 and 60 images/s.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffcut.job.inputs import decode_image, model_size

SOURCES = [(1024, 1024), (2048, 1536), (4032, 3024)]
TARGET_RATES = (40, 60)


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields, edges and mild noise (JPEG/PNG sizes of a photo, not of noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for channel in range(3):
        for _ in range(6):
            fx, fy, phase = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 6.28)]
            image[..., channel] += np.sin(x / width * fx * 6.28 + y / height * fy * 6.28 + phase)
    image = (image - image.min()) / (image.max() - image.min()) * 200 + 20
    image[(x // 97 + y // 89) % 5 == 0] *= 0.6  # hard edges
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, kind: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    if kind == "jpeg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def rate(data: bytes, resolution: int, seconds: float) -> float:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count < 3:
        decode_image(data, lambda w, h: model_size(w, h, resolution))
        count += 1
    return count / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args(argv)
    rows = []
    print(
        f"{'source':<10} {'kind':<5} {'MB':>6} {'img/s/core':>11} "
        + " ".join(f"{'cores@' + str(r):>9}" for r in TARGET_RATES)
    )
    for width, height in SOURCES:
        pixels = photo_like(width, height)
        for kind in ("jpeg", "png"):
            data = encode(pixels, kind)
            per_core = rate(data, args.resolution, args.seconds)
            cores = {r: round(r / per_core, 1) for r in TARGET_RATES}
            rows.append(
                {
                    "source": f"{width}x{height}",
                    "kind": kind,
                    "bytes": len(data),
                    "images_per_s_per_core": round(per_core, 2),
                    "cores_needed": cores,
                }
            )
            print(
                f"{width}x{height:<5} {kind:<5} {len(data) / 1e6:>6.2f} {per_core:>11.1f} "
                + " ".join(f"{cores[r]:>9}" for r in TARGET_RATES),
                flush=True,
            )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
