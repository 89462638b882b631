"""``diffcut segment IMAGE... --out DIR``: segment a few image files on this machine.

For each image it writes ``<stem>.png``, the label map at the image's own
size (8-bit, or 16-bit past 255 segments), and ``<stem>_overlay.png``, the
image with coloured segments and their boundaries, for a person to look at.
No Ray: one process, the model loaded once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffcut.method.defaults import DEFAULT_ALPHA, DEFAULT_MODEL, DEFAULT_TAU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to segment")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="hub id, local diffusers pipeline directory, or 'tiny-random' (default: %(default)s)",
    )
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU, help="NCut threshold (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="affinity exponent (default: %(default)s)")
    parser.add_argument("--refine", action="store_true", help="apply PAMR refinement to the mask")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto (fp16 on GPU)")
    parser.add_argument(
        "--resolution", type=int, default=1024, help="model input is about resolution^2 pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--resize",
        choices=("bucket", "square"),
        default="bucket",
        help="'square' reproduces the paper (resolution x resolution); 'bucket' keeps the aspect ratio",
    )
    from diffcut.commands.label import add_speed_arguments

    add_speed_arguments(parser.add_argument_group("speed"))


def run(args: argparse.Namespace) -> int:
    return segment_files(
        args.images,
        args.out,
        model=args.model,
        tau=args.tau,
        alpha=args.alpha,
        refine=args.refine,
        device=args.device,
        dtype=args.dtype,
        resolution=args.resolution,
        resize=args.resize,
        compile=args.compile,
        channels_last=args.channels_last,
        attention=args.attention,
        tf32=args.tf32,
        vae_dtype=args.vae_dtype,
    )


def segment_files(
    images,
    out,
    *,
    model=DEFAULT_MODEL,
    tau=DEFAULT_TAU,
    alpha=DEFAULT_ALPHA,
    refine=False,
    device="auto",
    dtype="auto",
    resolution=1024,
    resize="bucket",
    **speed,
) -> int:
    """Segment ``images`` into ``out``; returns the number of images that failed (0 = all written).

    ``speed``: the extractor's speed options (``compile``, ``channels_last``, ``attention``,
    ``tf32``, ``vae_dtype``; :meth:`FeatureExtractor.from_pretrained`)."""
    import numpy as np
    import torch
    from PIL import Image

    from diffcut.job.inputs import ImageDecodeError, check_resolution, decode_image, model_size
    from diffcut.method.features import FeatureExtractor
    from diffcut.method.segmenter import segment_features
    from diffcut.tools.visualize import overlay, save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extractor = FeatureExtractor.from_pretrained(model, device=device, dtype=dtype, **speed)
    check_resolution(resolution, extractor.stride)
    failures = 0
    for path in map(Path, images):
        try:
            decoded = decode_image(path.read_bytes())
        except (OSError, ImageDecodeError) as error:
            print(f"{path}: error: {error}", file=sys.stderr)
            failures += 1
            continue
        width, height = decoded.width, decoded.height
        input_size = model_size(width, height, resolution, resize, extractor.stride)
        resized = Image.fromarray(decoded.pixels).resize(input_size, Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None].float() / 255.0
        features = extractor.extract(pixels)[0]
        result = segment_features(
            features, (height, width), tau=tau, alpha=alpha, refine=refine, image=decoded.pixels if refine else None
        )
        stem = path.stem
        save_png(out / f"{stem}.png", result.mask)
        save_png(out / f"{stem}_overlay.png", overlay(decoded.pixels, result.mask))
        print(
            f"{path}: {result.num_segments} segments, {width}x{height}, model input {input_size[0]}x{input_size[1]}"
            f" -> {out / (stem + '.png')}"
        )
    return 1 if failures else 0
