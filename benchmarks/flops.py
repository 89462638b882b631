"""FLOPs of DiffCut's feature extraction vs a full UNet forward, SDXL architecture.

Counts with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
(no weights, no memory: the CPU path would drop the attention kernels from the
count, the meta path dispatches ``scaled_dot_product_attention`` and counts it).
The early exit is the extractor's own ``unet_features``, so the number is for
the code that runs, not a model of it.

    python benchmarks/flops.py [--resolution 1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import SDXL_POOLED_SHAPE, SDXL_PROMPT_SHAPE, SDXL_UNET, SDXL_VAE

from diffcut.method.features import ExtractorConfig, FeatureExtractor


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_sdxl_flops(size: int = 1024) -> dict:
    """FLOPs per ``size`` x ``size`` image: full UNet, UNet to the feature, VAE encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        prompt = torch.empty(SDXL_PROMPT_SHAPE)
        pooled = torch.empty(SDXL_POOLED_SHAPE)
    extractor = FeatureExtractor(
        vae, unet, None, prompt, pooled, ExtractorConfig(model="sdxl-architecture"), meta, torch.float32
    )
    latent = torch.empty(1, 4, size // 8, size // 8, device=meta)
    timesteps = torch.full((1,), 50, dtype=torch.long, device=meta)
    pixels = torch.empty(1, 3, size, size, device=meta)
    prompt_embeds, added = extractor.conditioning(1, size, size)

    def full_unet():
        unet(latent, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added)

    return {
        "feature_module": extractor.feature_module_name,
        "feature_shape": tuple(extractor.unet_features(latent, timesteps, size, size).shape[1:]),
        "full_unet": count(full_unet),
        "unet_to_feature": count(lambda: extractor.unet_features(latent, timesteps, size, size)),
        "vae_encoder": count(lambda: extractor.encode(pixels)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args(argv)
    size = args.resolution
    flops = count_sdxl_flops(size)
    full, to_feature, vae_encoder = flops["full_unet"], flops["unet_to_feature"], flops["vae_encoder"]
    tera = 1e12
    print(f"SDXL architecture at {size}x{size}, feature {flops['feature_shape']} from {flops['feature_module']}")
    print(f"full UNet forward:        {full / tera:.2f} TFLOP")
    print(f"UNet up to the feature:   {to_feature / tera:.2f} TFLOP")
    print(f"VAE encoder:              {vae_encoder / tera:.2f} TFLOP")
    print(f"extraction / full UNet:   {to_feature / full:.1%}")
    print(
        f"whole extraction (VAE + UNet to feature) / (VAE + full UNet): "
        f"{(vae_encoder + to_feature) / (vae_encoder + full):.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
