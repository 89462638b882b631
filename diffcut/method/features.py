"""Diffusion-UNet features for DiffCut (docs/method.md §2.1).

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

Nothing after that module is needed, so the UNet is not run as a whole:
:func:`~diffcut.method.unet.truncated_unet_forward` runs, from the loaded diffusers modules, exactly
the part of ``UNet2DConditionModel.forward`` that comes before the feature and
returns the ``attn1`` output. That leaves most of the UNet's FLOPs out
(docs/method.md §2.1, benchmarks/flops.py), needs no exception to stop, and is one graph that
``torch.compile(fullgraph=True)`` captures. The modules that would run after it
(mid block, up blocks, output head) are released from memory at load time.

Speed options (:meth:`FeatureExtractor.from_pretrained`): ``compile``,
``channels_last``, ``attention`` (SDPA or the explicit eager kernel), ``tf32``
and ``vae_dtype``; none changes the method, each changes the rounding only
(tests/test_gpu_options.py bounds each).

The truncated forward and the speed switches of the model graph are in
:mod:`diffcut.method.unet`. This module is over 450 lines because
:class:`FeatureExtractor` (most of them: loading, the speed options, the
automatic batch size and the forward) is one class whose parts share its state.
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

from diffcut.method.defaults import (
    ATTENTION_KERNELS,
    DEFAULT_MODEL,
    DEFAULT_NOISE_SEED,
    DEFAULT_TIMESTEP,
    VAE_DTYPES,
)
from diffcut.method.logs import records_left_out
from diffcut.method.tiny import TINY_RANDOM_NAME, tiny_random_path
from diffcut.method.unet import (
    _distinct_symbolic_sizes,
    _mark_spatial_dynamic,
    _UNetToFeature,
    _VaeToLatentMean,
    check_truncatable,
    feature_module_path,
    set_attention_kernel,
)

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@contextmanager
def _quiet_loading():
    """No per-component progress bars while loading (they flood Ray worker logs), and no notice that
    transformers' image processors fall back to PIL without torchvision: importing a diffusers pipeline
    imports them, and the method uses none."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        with records_left_out("transformers.utils.import_utils", "requires torchvision (not installed); falling back"):
            yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


#: ``batch_size="auto"`` never goes past this many images per call.
AUTO_BATCH_CAP = 32
#: Share of the device memory a call found by ``batch_size="auto"`` may peak at: the rest is
#: headroom for the allocator's fragmentation and for other buffers of the actor.
AUTO_BATCH_MEMORY_SHARE = 0.85


@dataclass(frozen=True)
class ExtractorConfig:
    """Everything that determines the features, recorded in the output's ``params``."""

    model: str
    timestep: int = DEFAULT_TIMESTEP
    noise_seed: int = DEFAULT_NOISE_SEED
    family: str = "sdxl"  # "sdxl" (two text encoders, text_time) or "sd" (SD 1.x / 2.x)
    vae_dtype: str = "float32"  # the dtype the VAE encoder ran in (resolved, never "auto")


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
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
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
            "diffcut loads safetensors only "
            "(convert them, e.g. with diffusers' save_pretrained(safe_serialization=True))"
        )


def resolve_vae_dtype(vae_dtype: str | torch.dtype | None, dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The VAE's dtype: ``auto`` follows the VAE config (float32 under float16 with ``force_upcast``)."""
    if vae_dtype is None or vae_dtype == "auto":
        return torch.float32 if dtype == torch.float16 and force_upcast else dtype
    if not isinstance(vae_dtype, torch.dtype) and str(vae_dtype) not in VAE_DTYPES:
        raise ValueError(f"unknown vae_dtype {vae_dtype!r}; use one of {', '.join(VAE_DTYPES)}")
    return resolve_dtype(vae_dtype, torch.device("cpu"))


def largest_batch(fits, cap: int) -> int:
    """The largest batch size b <= ``cap`` with ``fits(b)`` true, given ``fits(1)``.

    Doubling until a size does not fit (or ``cap``), then bisection between the
    last size that fitted and the first that did not: O(log cap) probes.
    Assumes ``fits`` is monotone (memory grows with the batch). Returns 1 when
    even one image does not fit (the call will then fail and be reported).
    """
    good, bad = 0, cap + 1
    size = 1
    while size <= cap:
        if fits(size):
            good = size
            size *= 2
        else:
            bad = size
            break
    if good == 0:
        return 1
    if size > cap and good < cap:
        if fits(cap):
            return cap
        bad = cap
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


class FeatureExtractor:
    """Extracts DiffCut features from a diffusers latent-diffusion pipeline.

    Build it with :meth:`from_pretrained`; call :meth:`extract` on batches.
    """

    def __init__(
        self,
        vae,
        unet,
        scheduler,
        prompt_embeds,
        pooled_prompt_embeds,
        config: ExtractorConfig,
        device: torch.device,
        dtype: torch.dtype,
        *,
        compile: bool | str = False,
        channels_last: bool = False,
    ):
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
        check_truncatable(unet, self.block_index)
        self.feature_module = unet.get_submodule(self.feature_module_name)
        self.feature_dim = int(self.feature_module.to_out[0].out_features)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        downsamplings = sum(
            1 for block in unet.down_blocks[: self.block_index] if getattr(block, "downsamplers", None) is not None
        )
        self.stride = self.vae_scale * 2**downsamplings
        self._noise_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._auto_batch: dict[tuple[int, int], int] = {}
        self.channels_last = bool(channels_last)
        self.compiled = compile not in (False, None, "", "off")
        vae_forward = _VaeToLatentMean(vae)
        unet_forward = _UNetToFeature(unet, self.block_index)
        if self.compiled:
            backend = compile if isinstance(compile, str) and compile != "on" else "inductor"
            # Bucketed inputs come in many sizes: the spatial dimensions are
            # marked dynamic at each call (_mark_spatial_dynamic), so one graph
            # serves every bucket instead of one compilation per size.
            vae_forward = torch.compile(vae_forward, backend=backend, fullgraph=True)
            unet_forward = torch.compile(unet_forward, backend=backend, fullgraph=True)
        self._vae_forward = vae_forward
        self._unet_forward = unet_forward

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

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
        compile: bool | str = False,
        channels_last: bool = False,
        attention: str = "sdpa",
        tf32: bool = False,
        vae_dtype: str | torch.dtype | None = "auto",
    ) -> FeatureExtractor:
        """Load a pipeline and prepare it for feature extraction (docs/method.md §2.1).

        Parameters
        ----------
        model : str or os.PathLike, default "segmind/SSD-1B"
            A Hugging Face hub id, a local diffusers pipeline directory, or
            ``"tiny-random"`` (a tiny random SDXL-architecture pipeline built
            locally, for tests). Weights are read from safetensors only.
        device : str or torch.device, default "cpu"
            ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``...
        dtype : str or torch.dtype, default torch.float32
            Weights dtype; float16 / bfloat16 on GPU. A VAE whose config asks
            for it (``force_upcast``, SDXL's) stays in float32 under float16, as
            it overflows otherwise.
        timestep : int, default 50
            The noise level t (paper: 50).
        noise_seed : int, default 42
            Seed of the shared noise (paper: 42).
        release_unused : bool, default True
            Drop the modules that run after the feature (mid block, up blocks,
            output head) and the text encoders once the empty-prompt
            conditioning is cached.
        compile : bool or str, default False
            ``torch.compile`` the VAE encoder and the truncated UNet
            (``True``/``"on"``: inductor; another string names a backend).
            Height and width are dynamic, so buckets share one graph; the first
            call (see :meth:`warm_up`) pays the compilation.
        channels_last : bool, default False
            NHWC memory format for the convolutions (faster cuDNN kernels
            under float16 / bfloat16 on GPU).
        attention : {"sdpa", "eager"}, default "sdpa"
            ``scaled_dot_product_attention`` (flash / memory-efficient kernels
            on CUDA; diffusers' default) or explicit matmul + softmax (the
            reference).
        tf32 : bool, default False
            Allow TF32 for the float32 matmuls and convolutions on CUDA (the
            float32 VAE under float16). Process-wide; no effect on CPU.
        vae_dtype : str or torch.dtype, default "auto"
            ``"auto"`` (the VAE config's choice: float32 for SDXL's VAE under
            float16), ``"float32"``, ``"float16"``, ``"bfloat16"``. bfloat16 is
            a deviation from the published recipe (which keeps SDXL's VAE in
            float32): faster, and the latent differs by bfloat16 rounding (~1e-2 relative).

        Returns
        -------
        FeatureExtractor
            Ready for :meth:`extract`: pixels (B, 3, H, W) in [0, 1] with H and
            W multiples of :attr:`stride` -> (B, H / stride, W / stride,
            :attr:`feature_dim`) float32 features.

        References
        ----------
        .. [1] P. Couairon et al., "DiffCut: Catalyzing Zero-Shot Semantic Segmentation with
           Diffusion Features and Recursive Normalized Cut", NeurIPS 2024, arXiv:2406.02842,
           Sec. 3.1.

        Examples
        --------
        The tiny random model (built locally, no download):

        >>> import torch
        >>> from diffcut.method.features import FeatureExtractor
        >>> extractor = FeatureExtractor.from_pretrained("tiny-random")
        >>> extractor.stride, extractor.feature_dim
        (32, 64)
        >>> features = extractor.extract(torch.rand(1, 3, 64, 96))
        >>> tuple(features.shape), features.dtype
        ((1, 2, 3, 64), torch.float32)
        """
        from diffusers import DDIMScheduler, DiffusionPipeline

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention {attention!r}; use one of {', '.join(ATTENTION_KERNELS)}")
        if vae_dtype not in (None, *VAE_DTYPES) and not isinstance(vae_dtype, torch.dtype):
            raise ValueError(f"unknown vae_dtype {vae_dtype!r}; use one of {', '.join(VAE_DTYPES)}")
        if tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        model = str(model)
        with _quiet_loading():  # building the tiny model imports a diffusers pipeline too
            source = str(tiny_random_path()) if model == TINY_RANDOM_NAME else model
        local = Path(source)
        kwargs = {}
        if local.is_dir():
            refuse_pickle_checkpoints(local)
            index = (
                json.loads((local / "model_index.json").read_text()) if (local / "model_index.json").exists() else {}
            )
            if "safety_checker" in index:
                kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            with warnings.catch_warnings(), _quiet_loading():
                # ``torch_dtype`` works on every diffusers we support; newer ones
                # also accept ``dtype`` and warn about the old name.
                warnings.simplefilter("ignore", FutureWarning)
                # low_cpu_mem_usage=False: diffusers' path without accelerate, stated (else it advises installing
                # accelerate, which loads safetensors no faster here: benchmarks/RESULTS.md, model loading).
                pipeline = DiffusionPipeline.from_pretrained(
                    source, torch_dtype=dtype, use_safetensors=True, low_cpu_mem_usage=False, **kwargs
                )
        except OSError as error:
            if "safetensors" in str(error).lower():
                raise ValueError(
                    f"could not load {model!r} from safetensors: {error}. diffcut refuses pickle checkpoints."
                ) from error
            raise
        family = "sdxl" if getattr(pipeline, "text_encoder_2", None) is not None else "sd"
        vae = pipeline.vae
        resolved_vae_dtype = resolve_vae_dtype(vae_dtype, dtype, bool(getattr(vae.config, "force_upcast", False)))
        config = ExtractorConfig(
            model=model,
            timestep=int(timestep),
            noise_seed=int(noise_seed),
            family=family,
            vae_dtype=str(resolved_vae_dtype).removeprefix("torch."),
        )

        pipeline.to(device)
        if resolved_vae_dtype != dtype:
            vae.to(resolved_vae_dtype)
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
        set_attention_kernel([unet, vae], attention)
        if channels_last:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
        extractor = cls(
            vae,
            unet,
            scheduler,
            prompt_embeds.to(dtype),
            None if pooled is None else pooled.to(dtype),
            config,
            device,
            dtype,
            compile=compile,
            channels_last=channels_last,
        )
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
                "resize first (diffcut.job.inputs does this for the labeling job)"
            )

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latent of ``pixels`` in [0, 1]: posterior mean times the VAE's scaling factor."""
        scaled = (2 * pixels - 1).to(self.device, self.vae_dtype)
        if self.channels_last:
            scaled = scaled.contiguous(memory_format=torch.channels_last)
        if self.compiled:
            _mark_spatial_dynamic(scaled)
            with _distinct_symbolic_sizes():
                return self._vae_forward(scaled) * self.vae.config.scaling_factor
        return self._vae_forward(scaled) * self.vae.config.scaling_factor

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
        model's dtype (:func:`~diffcut.method.unet.truncated_unet_forward`).
        """
        batch = noisy_latent.shape[0]
        prompt_embeds, added = self.conditioning(batch, height, width)
        if self.channels_last:
            noisy_latent = noisy_latent.contiguous(memory_format=torch.channels_last)
        if self.compiled:
            _mark_spatial_dynamic(noisy_latent)
            with _distinct_symbolic_sizes():
                tokens = self._unet_forward(noisy_latent, timesteps, prompt_embeds, added)
        else:
            tokens = self._unet_forward(noisy_latent, timesteps, prompt_embeds, added)
        return tokens.reshape(batch, height // self.stride, width // self.stride, -1)

    # ------------------------------------------------------------- batch sizes
    def warm_up(self, sizes, batch_size: int = 1) -> None:
        """One call per (height, width) in ``sizes``: compiles (``compile``) and
        selects kernels before the first real batch, so no image pays for it."""
        for height, width in sizes:
            self.extract(torch.zeros(batch_size, 3, height, width, device=self.device))

    def auto_batch_size(self, height: int, width: int, cap: int = AUTO_BATCH_CAP) -> int:
        """The largest batch of ``height`` x ``width`` images that fits the device, found once per size.

        CUDA: :func:`largest_batch` over real calls on blank images; a call
        fits when it neither runs out of memory nor peaks above
        :data:`AUTO_BATCH_MEMORY_SHARE` of the device memory. CPU: 1. Host
        memory is not what limits a CPU run and a CPU does no more work per
        image in a larger call, while the labeling job pads every call to its
        batch size: one image per call wastes nothing on blank padding.
        """
        key = (int(height), int(width))
        if key not in self._auto_batch:
            if self.device.type != "cuda":
                self._auto_batch[key] = 1
            else:
                self._auto_batch[key] = largest_batch(lambda b: self._fits_on_device(b, *key), cap)
                log.info("batch size for %dx%d: %d", width, height, self._auto_batch[key])
        return self._auto_batch[key]

    def _fits_on_device(self, batch: int, height: int, width: int) -> bool:
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self.extract(torch.zeros(batch, 3, height, width, device=self.device))
            torch.cuda.synchronize(self.device)
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(self.device) <= AUTO_BATCH_MEMORY_SHARE * total

    def __repr__(self) -> str:
        return (
            f"FeatureExtractor(model={self.config.model!r}, family={self.config.family}, device={self.device}, "
            f"dtype={self.dtype}, stride={self.stride}, feature_dim={self.feature_dim}, "
            f"module={self.feature_module_name})"
        )
