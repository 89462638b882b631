"""The method's published settings (docs/method.md §2): the defaults of the library's API and of the job's flags.

Plain constants, so that reading them loads neither torch nor the solvers (the job's settings,
:mod:`diffcut.job.settings`, take their defaults from here).
"""

#: The diffusion model of the paper's headline results.
DEFAULT_MODEL = "segmind/SSD-1B"
#: The noise level t of the noised latent (paper: 50).
DEFAULT_TIMESTEP = 50
#: Seed of the noise shared by every image (paper: 42).
DEFAULT_NOISE_SEED = 42
#: Recursive NCut threshold: a region is split while its best cut is below it.
DEFAULT_TAU = 0.5
#: Exponent of the min-max scaled cosine affinity.
DEFAULT_ALPHA = 10.0
#: ``attention`` values: the SDPA kernel (flash / memory-efficient on CUDA) or the explicit
#: matmul-softmax-matmul of diffusers' ``AttnProcessor`` (the reference it must agree with).
ATTENTION_KERNELS = ("sdpa", "eager")
#: ``vae_dtype`` values. ``auto``: what the VAE's config asks: float32 under float16 when it
#: sets ``force_upcast`` (SDXL's VAE overflows in float16), else the model dtype.
VAE_DTYPES = ("auto", "float32", "float16", "bfloat16")
