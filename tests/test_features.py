"""Feature extraction (docs/method.md §2.1) on tiny locally built pipelines.

The reference below follows the published DiffCut recipe step by step with
the stock diffusers pipeline (its own prompt encoder and time ids, a full
UNet forward with a hook), so the comparison checks the early-exit extractor
against an independent path through the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcut.method.features import FeatureExtractor
from diffcut.method.tiny import tiny_random_path
from diffcut.method.unet import feature_module_path


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return tiny_random_path()


@pytest.fixture(scope="module")
def extractor(tiny_dir) -> FeatureExtractor:
    return FeatureExtractor.from_pretrained(str(tiny_dir), device="cpu", dtype=torch.float32)


def reference_features(model_dir, pixels, timestep=50, seed=42):
    """The published recipe, written out with the full diffusers pipeline."""
    from diffusers import AutoPipelineForText2Image, DDIMScheduler

    pipe = AutoPipelineForText2Image.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    batch, _, height, width = pixels.shape
    is_xl = getattr(pipe, "text_encoder_2", None) is not None
    with torch.no_grad():
        encoded = pipe.encode_prompt(
            [""] * batch, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if is_xl:
            prompt_embeds, _, pooled, _ = encoded
            time_ids = pipe._get_add_time_ids(
                (height, width),
                (0, 0),
                (height, width),
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            )
            added = {"text_embeds": pooled, "time_ids": time_ids.repeat(batch, 1)}
        else:
            prompt_embeds, added = encoded[0], None
        latent = pipe.vae.encode(2 * pixels - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(1, 4, height // 8, width // 8, generator=generator).expand_as(latent)
        t = torch.tensor([timestep]).expand(batch)
        noisy = pipe.scheduler.add_noise(latent, noise, t)
        blocks = [b for b in pipe.unet.down_blocks if getattr(b, "attentions", None)]
        module = blocks[-1].attentions[-1].transformer_blocks[-1].attn1
        captured = {}
        handle = module.register_forward_hook(lambda m, i, o: captured.setdefault("f", o))
        output = pipe.unet(noisy, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample
        handle.remove()
    assert torch.isfinite(output).all()
    return captured["f"].reshape(batch, height // 32, width // 32, -1)


def test_tiny_random_is_sdxl_architecture(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"):
        assert part in index
    unet_config = json.loads((tiny_dir / "unet" / "config.json").read_text())
    assert unet_config["addition_embed_type"] == "text_time"
    assert sum(t.startswith("CrossAttn") for t in unet_config["down_block_types"]) >= 2
    vae_config = json.loads((tiny_dir / "vae" / "config.json").read_text())
    assert 2 ** (len(vae_config["block_out_channels"]) - 1) == 8
    weights = sorted(p.suffix for p in tiny_dir.rglob("*") if p.is_file() and p.parent.name in ("unet", "vae"))
    assert weights and all(s in (".json", ".safetensors") for s in weights)


def test_tiny_random_loads_by_name(extractor):
    by_name = FeatureExtractor.from_pretrained("tiny-random")
    assert by_name.config.model == "tiny-random"
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(by_name.extract(pixels), extractor.extract(pixels))


@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_features_match_published_recipe(tiny_dir, extractor, size):
    pixels = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    ours = extractor.extract(pixels)
    reference = reference_features(tiny_dir, pixels)
    assert ours.shape == (2, size[0] // 32, size[1] // 32, extractor.feature_dim)
    relative = (ours - reference).norm() / reference.norm()
    assert relative < 1e-4, relative


def test_batch_equals_single_images(extractor):
    pixels = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    batch = extractor.extract(pixels)
    for i in range(3):
        single = extractor.extract(pixels[i : i + 1])
        torch.testing.assert_close(single[0], batch[i], rtol=1e-5, atol=1e-5)


def test_timestep_and_seed_change_features(tiny_dir, extractor):
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    base = extractor.extract(pixels)
    other_t = FeatureExtractor.from_pretrained(str(tiny_dir), timestep=400).extract(pixels)
    other_seed = FeatureExtractor.from_pretrained(str(tiny_dir), noise_seed=7).extract(pixels)
    assert not torch.allclose(base, other_t)
    assert not torch.allclose(base, other_seed)


def test_early_exit_never_runs_mid_or_up_blocks(tiny_dir):
    extractor = FeatureExtractor.from_pretrained(str(tiny_dir), release_unused=False)
    unet = extractor.unet
    calls = []
    handles = [unet.mid_block.register_forward_pre_hook(lambda m, a: calls.append("mid"))]
    handles += [b.register_forward_pre_hook(lambda m, a: calls.append("up")) for b in unet.up_blocks]
    handles.append(unet.conv_out.register_forward_pre_hook(lambda m, a: calls.append("out")))
    last_block = extractor.feature_module_name.rsplit(".attn1", 1)[0]
    handles.append(unet.get_submodule(last_block).attn2.register_forward_pre_hook(lambda m, a: calls.append("attn2")))
    try:
        extractor.extract(torch.rand(1, 3, 64, 64))
    finally:
        for h in handles:
            h.remove()
    assert calls == []


def test_released_modules_give_same_features(tiny_dir, extractor):
    full = FeatureExtractor.from_pretrained(str(tiny_dir), release_unused=False)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(full.extract(pixels), extractor.extract(pixels))
    assert extractor.unet.mid_block is None and len(extractor.unet.up_blocks) == 0
    released = sum(p.numel() for p in extractor.unet.parameters())
    kept = sum(p.numel() for p in full.unet.parameters())
    assert released < kept


def test_rejects_bad_pixels(extractor):
    with pytest.raises(ValueError, match="multiple of the model's stride 32"):
        extractor.extract(torch.rand(1, 3, 50, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        extractor.extract(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="floats"):
        extractor.extract(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_pickle_checkpoint_refused(tmp_path, tiny_dir):
    import shutil

    from safetensors.torch import load_file

    copy = tmp_path / "pickled"
    shutil.copytree(tiny_dir, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), copy / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match="pickle checkpoints"):
        FeatureExtractor.from_pretrained(str(copy))


def build_tiny_sd1(target: Path) -> Path:
    """A tiny SD 1.x-architecture pipeline (one text encoder, no added conditioning)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffcut.method.tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
        )
    )
    # SD 1.x layout: attention in the first three blocks, none in the last.
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=4,
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        scaling_factor=0.18215,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def test_sd1_family(tmp_path):
    model_dir = build_tiny_sd1(tmp_path / "tiny-sd1")
    extractor = FeatureExtractor.from_pretrained(str(model_dir))
    assert extractor.config.family == "sd"
    assert extractor.feature_module_name.startswith("down_blocks.2.")  # down_blocks[-2]
    assert extractor.stride == 32
    pixels = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    ours = extractor.extract(pixels)
    reference = reference_features(model_dir, pixels)
    assert ((ours - reference).norm() / reference.norm()) < 1e-4


def test_feature_module_path_rule(extractor):
    index, name = feature_module_path(extractor.unet)
    assert index == len(extractor.unet.down_blocks) - 1
    assert name.endswith(".attn1")


def test_features_are_deterministic_numpy(extractor):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    a = extractor.extract(pixels).numpy()
    b = extractor.extract(pixels).numpy()
    assert np.array_equal(a, b)


def test_sdxl_flops_early_exit_under_35_percent():
    """FLOPs are counted on the meta device (deterministic, no weights), so this is no timing test."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from flops import count_sdxl_flops

    flops = count_sdxl_flops(1024)
    assert flops["feature_shape"] == (32, 32, 1280)
    assert flops["unet_to_feature"] <= 0.35 * flops["full_unet"]
    assert 6.5e12 < flops["full_unet"] < 7.0e12  # docs/method.md §2.1: 6.76 TFLOP
