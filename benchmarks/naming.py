"""Naming-stage cost per image on this machine: the published ConvNeXt-L CLIP architecture (random weights:
the cost does not depend on them) at the default 1024x1024 input, 30 segments, against the VOC vocabulary's
text classifier (computed once, timed separately). Usage: python benchmarks/naming.py [--resolution 1024]."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffcut.method import naming


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--segments", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = naming.build_clip(naming.CONVNEXT_LARGE_D_320).eval()
    rng = np.random.default_rng(0)
    image = torch.randn(1, 3, args.resolution, args.resolution)
    mask = torch.from_numpy(rng.integers(0, args.segments, (32, 32))).repeat_interleave(
        args.resolution // 32, 0).repeat_interleave(args.resolution // 32, 1)
    vocabulary = naming.load_vocabulary("voc")
    synonyms = sum(len(s) for s in vocabulary.synonyms)
    with torch.no_grad():
        started = time.perf_counter()
        tokens = torch.randint(1, 49000, (128, 77))
        clip.encode_text(tokens, torch.full((128,), 76))
        text_seconds = time.perf_counter() - started  # 128 of the vocabulary's prompts, first call
        text = torch.nn.functional.normalize(torch.randn(synonyms, 768), dim=-1)
        owner = torch.tensor([c for c, s in enumerate(vocabulary.synonyms) for _ in s])
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            dense = clip.dense_features(image)[0]
            masks = mask[None] == torch.arange(args.segments)[:, None, None]
            pooled, _ = naming.mask_pool(dense, masks)
            naming.classify(clip.embed_pooled(pooled), text, owner, len(vocabulary), clip.logit_scale)
            times.append(time.perf_counter() - started)
    print(f"threads={torch.get_num_threads()} resolution={args.resolution} segments={args.segments}")
    print(f"per image: {min(times):.2f} s (min of {args.repeats}: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"text tower, first call on 128 prompts: {text_seconds:.1f} s "
          f"(the VOC classifier encodes {synonyms} synonyms x 14 = {synonyms * 14} prompts once per vocabulary)")


if __name__ == "__main__":
    main()
