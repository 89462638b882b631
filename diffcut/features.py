"""Diffusion-UNet features for DiffCut (DESIGN.md §2.1).

DiffCut (Couairon et al., NeurIPS 2024, arXiv:2406.02842, §3.1) describes an
image by the output of one self-attention layer of a latent diffusion UNet,
run once on the slightly noised latent of the image:

1. pixels in [0, 1] -> ``2x - 1`` -> VAE encoder; latent = posterior *mean*
   times ``vae.config.scaling_factor``;
2. one N(0, 1) noise tensor of shape (1, 4, H/8, W/8) drawn from a
   ``torch.Generator`` on the model's device seeded 42, shared by every image
   of the batch, added with the DDIM scheduler's ``add_noise`` at t = 50;
3. the UNet runs on the empty prompt without classifier-free guidance (SDXL
   family: both text encoders, the pooled embedding and
   ``time_ids = (H, W, 0, 0, H, W)``);
4. the feature is the output of ``attn1`` (after its output projection,
   before the residual add) of the last transformer block of the last
   attention of the deepest down block that has attentions.

Nothing after that module is needed, so the forward pass stops there: a hook
captures the output and aborts the UNet, which saves ~70 % of the UNet's
FLOPs (benchmarks/flops.py), and the modules that would run after it (mid
block, up blocks, output head) are released from memory at load time.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcut.tiny import TINY_RANDOM_NAME, tiny_random_path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "segmind/SSD-1B"
DEFAULT_TIMESTEP = 50
DEFAULT_NOISE_SEED = 42

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@contextmanager
def _quiet_loading():
    """No per-component progress bars while loading: they flood Ray worker logs."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


class _FeatureCaptured(Exception):
    """Raised from the feature hook to stop the UNet right after the feature."""


@dataclass(frozen=True)
class ExtractorConfig:
    """Everything that determines the features, recorded in the output's ``params``."""

    model: str
    timestep: int = DEFAULT_TIMESTEP
    noise_seed: int = DEFAULT_NOISE_SEED
    family: str = "sdxl"  # "sdxl" (two text encoders, text_time) or "sd" (SD 1.x / 2.x)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/None -> float16 on CUDA, float32 elsewhere; names like ``"bfloat16"`` accepted."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return names[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}") from None


def refuse_pickle_checkpoints(model_dir: Path) -> None:
    """Refuse a local pipeline whose weights are not all in safetensors.

    Pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``) can run arbitrary code
    when loaded; diffcut loads weights from safetensors only.
    """
    offending = []
    for path in model_dir.rglob("*"):
        if path.suffix in _PICKLE_SUFFIXES and path.is_file():
            has_safetensors = any(path.parent.glob("*.safetensors"))
            if not has_safetensors:
                offending.append(str(path.relative_to(model_dir)))
    if offending:
        raise ValueError(
            f"refusing to load {model_dir}: weights {', '.join(sorted(offending))} are pickle checkpoints; "
            "diffcut loads safetensors only (convert them, e.g. with diffusers' save_pretrained(safe_serialization=True))"
        )


def feature_module_path(unet) -> tuple[int, str]:
    """Index of the hooked down block and the dotted path of the feature module.

    The deepest down block that has attentions: ``down_blocks[-1]`` for the
    SDXL family, ``down_blocks[-2]`` for SD 1.x / 2.x.
    """
    for index in range(len(unet.down_blocks) - 1, -1, -1):
        attentions = getattr(unet.down_blocks[index], "attentions", None)
        if attentions is not None and len(attentions) > 0:
            last = len(attentions) - 1
            blocks = attentions[last].transformer_blocks
            return index, f"down_blocks.{index}.attentions.{last}.transformer_blocks.{len(blocks) - 1}.attn1"
    raise ValueError("this UNet has no down block with attentions; DiffCut needs a self-attention layer")


class FeatureExtractor:
    """Extracts DiffCut features from a diffusers latent-diffusion pipeline.

    Build it with :meth:`from_pretrained`; call :meth:`extract` on batches.
    """

    def __init__(self, vae, unet, scheduler, prompt_embeds, pooled_prompt_embeds, config: ExtractorConfig,
                 device: torch.device, dtype: torch.dtype):
        self.vae = vae
        self.unet = unet
        self.scheduler = scheduler
        self.config = config
        self.device = device
        self.dtype = dtype
        # Empty-prompt conditioning, computed once at load time.
        self.prompt_embeds = prompt_embeds
        self.pooled_prompt_embeds = pooled_prompt_embeds
        self.block_index, self.feature_module_name = feature_module_path(unet)
        self.feature_module = unet.get_submodule(self.feature_module_name)
        self.feature_dim = int(self.feature_module.to_out[0].out_features)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        downsamplings = sum(
            1 for block in unet.down_blocks[: self.block_index] if getattr(block, "downsamplers", None) is not None
        )
        self.stride = self.vae_scale * 2**downsamplings
        self._noise_cache: dict[tuple[int, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = torch.float32,
        *,
        timestep: int = DEFAULT_TIMESTEP,
        noise_seed: int = DEFAULT_NOISE_SEED,
        release_unused: bool = True,
    ) -> "FeatureExtractor":
        """Load a pipeline and prepare it for feature extraction.

        Args:
            model: a Hugging Face hub id (default ``segmind/SSD-1B``), a local
                diffusers pipeline directory, or ``"tiny-random"`` (a tiny
                random SDXL-architecture pipeline built locally, for tests).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``...
            dtype: weights dtype; float16 / bfloat16 on GPU. A VAE whose
                config asks for it (``force_upcast``, SDXL's) stays in
                float32 under float16, as it overflows otherwise.
            timestep: the noise level t (paper: 50).
            noise_seed: seed of the shared noise (paper: 42).
            release_unused: drop the modules that run after the feature (mid
                block, up blocks, output head) and the text encoders once the
                empty-prompt conditioning is cached.
        """
        from diffusers import DDIMScheduler, DiffusionPipeline

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model = str(model)
        source = str(tiny_random_path()) if model == TINY_RANDOM_NAME else model
        local = Path(source)
        kwargs = {}
        if local.is_dir():
            refuse_pickle_checkpoints(local)
            index = json.loads((local / "model_index.json").read_text()) if (local / "model_index.json").exists() else {}
            if "safety_checker" in index:
                kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            with warnings.catch_warnings(), _quiet_loading():
                # ``torch_dtype`` works on every diffusers we support; newer ones
                # also accept ``dtype`` and warn about the old name.
                warnings.simplefilter("ignore", FutureWarning)
                pipeline = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, use_safetensors=True, **kwargs)
        except (OSError, EnvironmentError) as error:
            if "safetensors" in str(error).lower():
                raise ValueError(
                    f"could not load {model!r} from safetensors: {error}. diffcut refuses pickle checkpoints."
                ) from error
            raise
        family = "sdxl" if getattr(pipeline, "text_encoder_2", None) is not None else "sd"
        config = ExtractorConfig(model=model, timestep=int(timestep), noise_seed=int(noise_seed), family=family)

        pipeline.to(device)
        vae = pipeline.vae
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)
        with torch.inference_mode():
            if family == "sdxl":
                prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
                    prompt="", device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
            else:
                prompt_embeds, _ = pipeline.encode_prompt(
                    prompt="", device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
                pooled = None
        # The published implementation builds a DDIM scheduler from the
        # checkpoint's scheduler config; only its noise schedule matters here.
        scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing")
        unet = pipeline.unet
        unet.eval()
        vae.eval()
        extractor = cls(vae, unet, scheduler, prompt_embeds.to(dtype), None if pooled is None else pooled.to(dtype),
                        config, device, dtype)
        if release_unused:
            extractor._release_modules_after_feature()
        del pipeline
        return extractor

    def _release_modules_after_feature(self) -> None:
        """Free the weights that can never run: everything after the feature."""
        unet = self.unet
        unet.mid_block = None
        unet.up_blocks = torch.nn.ModuleList()
        for name in ("conv_norm_out", "conv_out"):
            if getattr(unet, name, None) is not None:
                setattr(unet, name, torch.nn.Identity())
        for index in range(self.block_index + 1, len(unet.down_blocks)):
            unet.down_blocks[index] = torch.nn.Identity()
        # Also the decoder half of the VAE: only the encoder is used.
        for name in ("decoder", "post_quant_conv"):
            if getattr(self.vae, name, None) is not None:
                setattr(self.vae, name, torch.nn.Identity())

    # --------------------------------------------------------------- extraction
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def noise(self, latent_height: int, latent_width: int) -> torch.Tensor:
        """The shared N(0, 1) noise of shape (1, C, h, w), drawn from the seeded generator."""
        key = (latent_height, latent_width)
        if key not in self._noise_cache:
            generator = torch.Generator(device=self.device).manual_seed(self.config.noise_seed)
            self._noise_cache[key] = torch.randn(
                1, self.latent_channels, latent_height, latent_width, generator=generator, device=self.device
            )
        return self._noise_cache[key]

    def check_pixels(self, pixels: torch.Tensor) -> None:
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
            shape = tuple(pixels.shape) if hasattr(pixels, "shape") else type(pixels).__name__
            raise ValueError(f"pixels must be a float tensor of shape (B, 3, H, W); got {shape}")
        if not pixels.is_floating_point():
            raise ValueError(f"pixels must be floats in [0, 1]; got dtype {pixels.dtype}")
        height, width = pixels.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the model's stride {self.stride}; "
                "resize first (diffcut.io does this for the labeling job)"
            )

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latent of ``pixels`` in [0, 1]: posterior mean times the VAE's scaling factor."""
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode((2 * pixels - 1).to(self.device, vae_dtype)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    def conditioning(self, batch: int, height: int, width: int) -> tuple[torch.Tensor, dict | None]:
        """Empty-prompt text conditioning for a batch of ``height`` x ``width`` images."""
        prompt_embeds = self.prompt_embeds.expand(batch, -1, -1)
        if self.config.family != "sdxl":
            return prompt_embeds, None
        # original size, crop top-left, target size: (H, W, 0, 0, H, W)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        added = {"text_embeds": self.pooled_prompt_embeds.expand(batch, -1), "time_ids": time_ids.expand(batch, -1)}
        return prompt_embeds, added

    @torch.inference_mode()
    def extract(self, pixels: torch.Tensor) -> torch.Tensor:
        """DiffCut features of a batch.

        Args:
            pixels: float tensor (B, 3, H, W) with values in [0, 1]; H and W
                multiples of :attr:`stride`. No resizing happens here.

        Returns:
            float32 tensor (B, H / stride, W / stride, feature_dim) on
            :attr:`device`.
        """
        self.check_pixels(pixels)
        batch, _, height, width = pixels.shape
        latent = self.encode(pixels).float()
        noise = self.noise(latent.shape[-2], latent.shape[-1]).expand_as(latent)
        timesteps = torch.full((batch,), self.config.timestep, dtype=torch.long, device=self.device)
        noisy = self.scheduler.add_noise(latent, noise, timesteps)
        noisy = self.scheduler.scale_model_input(noisy, timesteps).to(self.dtype)
        return self.unet_features(noisy, timesteps, height, width).float()

    def unet_features(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor, height: int, width: int):
        """Run the UNet on a noisy latent up to the feature module, and no further.

        Returns the module's output as (B, H / stride, W / stride, c) in the
        model's dtype. A forward hook captures the output and raises, which
        unwinds the UNet's forward before anything after the feature runs.
        """
        batch = noisy_latent.shape[0]
        prompt_embeds, added = self.conditioning(batch, height, width)
        captured: list[torch.Tensor] = []

        def capture_and_stop(module, inputs, output):
            captured.append(output)
            raise _FeatureCaptured

        handle = self.feature_module.register_forward_hook(capture_and_stop)
        try:
            self.unet(noisy_latent, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added)
        except _FeatureCaptured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the UNet finished without running {self.feature_module_name}")
        return captured[0].reshape(batch, height // self.stride, width // self.stride, -1)

    def __repr__(self) -> str:
        return (f"FeatureExtractor(model={self.config.model!r}, family={self.config.family}, device={self.device}, "
                f"dtype={self.dtype}, stride={self.stride}, feature_dim={self.feature_dim}, "
                f"module={self.feature_module_name})")
