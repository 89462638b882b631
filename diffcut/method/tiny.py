"""A tiny, randomly initialized SDXL-architecture pipeline, built locally.

``FeatureExtractor.from_pretrained("tiny-random")`` resolves to the directory
this module writes. It has every part the real SDXL family has and that the
feature extractor touches -- two CLIP text encoders with their tokenizers, a
UNet with ``text_time`` added conditioning and two down blocks with
attention, a VAE that downsamples by 8 -- but with a few thousand channels
in total, so that tests and offline smoke runs take milliseconds per image.

The weights come from fixed seeds, are saved as safetensors with
``save_pretrained`` and are then loaded through the very same
``from_pretrained`` path as a real checkpoint. Its features mean nothing; it
exists to exercise the code, never as a default.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

#: Bump when the architecture below changes, so stale caches are not reused.
TINY_RANDOM_VERSION = 1
TINY_RANDOM_NAME = "tiny-random"
_SEED = 0


def cache_root() -> Path:
    """Where locally built models live: ``$DIFFCUT_CACHE`` or ``~/.cache/diffcut``."""
    root = os.environ.get("DIFFCUT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "diffcut"


def tiny_random_path() -> Path:
    """The directory of the tiny-random pipeline, built on first use."""
    target = cache_root() / f"tiny-random-sdxl-v{TINY_RANDOM_VERSION}"
    if not (target / "model_index.json").exists():
        build_tiny_random(target)
    return target


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for raw bytes.

    Printable Latin-1 bytes stand for themselves; the others are moved to
    code points above 255 so that every byte has a visible, unique symbol.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def tiny_clip_tokenizer():
    """A CLIP tokenizer over a byte alphabet and a handful of merges, built in memory."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
    for symbol in _byte_alphabet():
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_random(target: str | os.PathLike) -> Path:
    """Build the tiny SDXL-architecture pipeline and save it to ``target``.

    Written to a temporary sibling directory first and moved into place, so
    concurrent builders (several Ray actors on one node) never see a half
    written model.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(_SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    torch.manual_seed(_SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    time_embed_dim = 8
    torch.manual_seed(_SEED + 2)
    # Same block layout as SDXL (no attention in the first block, attention in
    # the two deeper ones, 2 downsamplers: features at 1/32 of the pixels).
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=text_config["hidden_size"] * 2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_config["projection_dim"],
        norm_num_groups=16,
    )
    torch.manual_seed(_SEED + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=256,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    # SDXL ships an Euler scheduler config; the extractor builds its DDIM
    # scheduler from it exactly as it does for the real checkpoints.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )

    def write(staging: Path) -> None:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / "DIFFCUT_TINY_RANDOM.json").write_text(
            json.dumps({"version": TINY_RANDOM_VERSION, "seed": _SEED, "note": "random weights, for tests"})
        )

    return publish_directory(target, "model_index.json", write)


def publish_directory(target: Path, marker: str, write) -> Path:
    """Run ``write(staging)`` in a temporary sibling of ``target``, then move it into place.

    Concurrent builders (several Ray actors on one node) never see a half
    written model: the first to finish wins, the others use its directory
    (recognised by the file ``marker``).
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first (target exists and is not empty): use theirs.
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
