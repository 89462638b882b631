"""Naming-stage cost per image on this machine: the published ConvNeXt-L CLIP architecture (random weights:
the cost does not depend on them) at the default 1024x1024 input, 30 segments, against the VOC vocabulary's
text classifier (computed once, timed separately). Usage: python benchmarks/naming.py [--resolution 1024].

``--whole-vocabulary voc`` instead times the text tower on every prompt of that built-in vocabulary
(synonyms x 14 ViLD templates, in the chunks of 128 that ``SegmentNamer.text_classifier`` uses; random
token ids of the full context length: the cost does not depend on the ids, and no tokenizer is needed)."""

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
    parser.add_argument("--whole-vocabulary", choices=naming.BUILTIN_VOCABULARIES, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = naming.build_clip(naming.CONVNEXT_LARGE_D_320).eval()
    if args.whole_vocabulary:
        time_whole_vocabulary(clip, args.whole_vocabulary)
        return
    rng = np.random.default_rng(0)
    image = torch.randn(1, 3, args.resolution, args.resolution)
    mask = (
        torch.from_numpy(rng.integers(0, args.segments, (32, 32)))
        .repeat_interleave(args.resolution // 32, 0)
        .repeat_interleave(args.resolution // 32, 1)
    )
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
    print(
        f"text tower, first call on 128 prompts: {text_seconds:.1f} s "
        f"(the VOC classifier encodes {synonyms} synonyms x 14 = {synonyms * 14} prompts once per vocabulary)"
    )


def time_whole_vocabulary(clip, name: str) -> None:
    """Text-tower seconds for one vocabulary's whole classifier, chunk by chunk."""
    vocabulary = naming.load_vocabulary(name)
    prompts = sum(len(s) for s in vocabulary.synonyms) * len(naming.VILD_PROMPTS)
    context = clip.context_length
    chunks = []
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, prompts, 128):
            size = min(128, prompts - start)
            tick = time.perf_counter()
            clip.encode_text(torch.randint(1, 49000, (size, context)), torch.full((size,), context - 1))
            chunks.append(time.perf_counter() - tick)
    total = time.perf_counter() - started
    print(f"threads={torch.get_num_threads()} vocabulary={name} prompts={prompts} chunks={len(chunks)}")
    print(
        f"text tower, whole vocabulary: {total:.1f} s ({total / prompts * 1000:.1f} ms per prompt); "
        f"chunks: {', '.join(f'{t:.1f}' for t in chunks)}"
    )


if __name__ == "__main__":
    main()
