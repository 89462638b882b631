"""A labeling run's settings as frozen dataclasses: what changes the labels, what changes the speed, each stage's pool.

* :class:`LabelSettings`: every setting that changes the labels. Its fields *are* the ``params`` JSON of
  every output row (:meth:`LabelSettings.params`) and the resume check (:func:`changed_settings`: a rerun
  over an output made with other values is refused).
* :class:`SpeedSettings`: options that change the speed of the feature actors, not the labels.
* :class:`Pools`: one :class:`PoolSettings` per actor stage (and :class:`DecodeSettings` for the decode tasks).

Every default and help text is defined once, on the field (:func:`setting`); ``diffcut label`` builds its
flags from the fields (:func:`flags`, :func:`job_arguments`). Adding a label-changing setting is a field here
(with the stage whose method call takes it, :meth:`LabelSettings.options`) and the method code that uses it.
Plain Python: no Ray, no torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from diffcut import __version__
from diffcut.job import schema
from diffcut.job.images import DEFAULT_STRIDE, RESIZE_MODES, MaskSize, check_resolution
from diffcut.job.storage import InputError
from diffcut.method.clip import DEFAULT_NAMING_MODEL
from diffcut.method.defaults import (
    ATTENTION_KERNELS,
    DEFAULT_ALPHA,
    DEFAULT_MODEL,
    DEFAULT_NOISE_SEED,
    DEFAULT_TAU,
    DEFAULT_TIMESTEP,
    VAE_DTYPES,
)

# The groups of ``diffcut label --help``, in order.
METHOD, SIZES, SPEED, POOLS = "method (DiffCut)", "sizes", "speed (feature actors)", "Ray pools"
# The stages whose method call takes a label setting as the keyword argument of its name (LabelSettings.options).
FEATURES, SEGMENT = "features", "segment"


def setting(
    default: Any, flag: str | None, help: str, group: str = METHOD, *, stage: str | None = None, **argparse: Any
) -> Any:
    """A settings field: its default, its flag (without ``--``; None: fixed, no flag), help and argparse options,
    and the stage whose method call takes it (``stage``), in one place."""
    metadata = {"flag": flag, "help": help, "group": group, "stage": stage, "argparse": argparse}
    return field(default=default, metadata=metadata, init=flag is not None)


def batch_size_arg(text: str | int) -> int | str:
    """``--batch-size``: a positive integer or ``auto``."""
    if str(text).lower() == "auto":
        return "auto"
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1, or auto")
    return value


def _at_least_one(flag: str, value: int) -> None:
    if value < 1:
        raise InputError(f"{flag} must be at least 1; got {value}")


@dataclass(frozen=True)
class LabelSettings:
    """The settings that change the labels; recorded with every row and checked when a run resumes."""

    model: str = setting(
        DEFAULT_MODEL,
        "model",
        "diffusers pipeline: hub id, local folder (safetensors), or tiny-random (tests)",
        stage=FEATURES,
    )
    dtype: str = setting("auto", "dtype", "model dtype: auto (float16 on CUDA), float32, bfloat16", stage=FEATURES)
    tau: float = setting(DEFAULT_TAU, "tau", "recursive NCut threshold", stage=SEGMENT)
    alpha: float = setting(DEFAULT_ALPHA, "alpha", "affinity exponent", stage=SEGMENT)
    timestep: int = setting(DEFAULT_TIMESTEP, "timestep", "diffusion timestep of the noised latent", stage=FEATURES)
    noise_seed: int = setting(
        DEFAULT_NOISE_SEED, None, "seed of the noise shared by every image (the paper's)", stage=FEATURES
    )
    exact_search: bool = setting(
        False,
        "exact-search",
        "search every sweep cut of the Fiedler vector, not the paper's 100 thresholds",
        stage=SEGMENT,
    )
    refine: bool = setting(False, "refine", "refine masks with PAMR (paper's headline numbers)", stage=SEGMENT)
    vocabulary: str | None = setting(
        None,
        "vocabulary",
        "name every segment: voc, context, coco-object, or FILE (one class per line, synonyms comma-separated); "
        "adds a CLIP naming stage and class columns",
    )
    naming_model: str = setting(
        DEFAULT_NAMING_MODEL,
        "naming-model",
        "open_clip ConvNeXt CLIP for --vocabulary: name:pretrained tag, hub id, local folder (safetensors), "
        "or tiny-random (tests)",
    )
    resolution: int = setting(1024, "resolution", "model input: about resolution^2 pixels (a multiple of 32)", SIZES)
    resize: str = setting(
        "bucket",
        "resize",
        "square: resolution x resolution (paper); bucket: keep the aspect ratio",
        SIZES,
        choices=RESIZE_MODES,
    )
    mask_size: str = setting(
        "original", "mask-size", "output mask size: original, model, N (longest side), or WxH", SIZES
    )
    vae_dtype: str = setting(
        "auto",
        "vae-dtype",
        "VAE encoder dtype: auto (the VAE config's: float32 for SDXL's under float16); bfloat16 deviates "
        "from the paper",
        SPEED,
        stage=FEATURES,
        choices=VAE_DTYPES,
    )
    stride: int = setting(DEFAULT_STRIDE, None, "pixel stride of the feature map (every supported model's)")

    def __post_init__(self) -> None:
        check_resolution(self.resolution, self.stride)
        if self.resize not in RESIZE_MODES:
            raise InputError(f"unknown --resize {self.resize!r}; use one of {', '.join(RESIZE_MODES)}")
        object.__setattr__(self, "mask_size", str(MaskSize.parse(self.mask_size)))  # its one spelling
        if not self.tau > 0 or not self.alpha > 0:
            raise InputError(f"--tau and --alpha must be positive; got {self.tau}, {self.alpha}")
        if self.vae_dtype not in VAE_DTYPES:
            raise InputError(f"--vae-dtype must be one of {', '.join(VAE_DTYPES)}; got {self.vae_dtype!r}")
        # The values as the params JSON records them.
        for name, kind in (("tau", float), ("alpha", float), ("timestep", int), ("resolution", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        for name in ("refine", "exact_search"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.vocabulary is not None:
            from diffcut.method.naming import load_vocabulary

            try:
                load_vocabulary(self.vocabulary)
            except (ValueError, OSError) as error:
                raise InputError(str(error)) from None

    def options(self, stage: str) -> dict:
        """The keyword arguments of ``stage``'s method call (:data:`FEATURES`: ``FeatureExtractor.from_pretrained``,
        :data:`SEGMENT`: ``segment_features``): the fields marked with that stage, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["stage"] == stage}

    def params(self) -> dict:
        """The ``params`` of every row: the fields (the naming ones only with a vocabulary) and the versions."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.vocabulary is None:  # without naming, params (and so resuming) stay as they were
            del values["vocabulary"], values["naming_model"]
        return {**values, "diffcut_version": __version__, "schema_version": schema.SCHEMA_VERSION}


def changed_settings(stored: Mapping, params: Mapping) -> dict[str, tuple]:
    """``{setting: (stored value, new value)}`` for the label settings that differ; a setting missing from
    either side counts as its default."""
    changed = {}
    for f in fields(LabelSettings):
        old, new = stored.get(f.name, f.default), params.get(f.name, f.default)
        if old != new:
            changed[f.name] = (old, new)
    return changed


@dataclass(frozen=True)
class SpeedSettings:
    """Options of the feature actors that change their speed, not the labels (docs/method.md §2.1)."""

    batch_size: int | str = setting(
        4,
        "batch-size",
        "images per feature-extraction call, or auto: the largest that fits the GPU memory, per input size (1 on CPU)",
        POOLS,
        type=batch_size_arg,
    )
    compile: bool = setting(
        False,
        "compile",
        "torch.compile the VAE encoder and the truncated UNet (dynamic sizes; the first call per size range compiles)",
        SPEED,
    )
    channels_last: bool = setting(False, "channels-last", "NHWC memory format for the convolutions", SPEED)
    attention: str = setting(
        "sdpa",
        "attention",
        "attention kernel: sdpa (flash / memory-efficient on CUDA) or eager (reference)",
        SPEED,
        choices=ATTENTION_KERNELS,
    )
    tf32: bool = setting(False, "tf32", "TF32 for float32 matmuls and convolutions on CUDA", SPEED)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "batch_size", batch_size_arg(self.batch_size))
        except (TypeError, ValueError):
            raise InputError(f"--batch-size must be a positive integer or auto; got {self.batch_size!r}") from None
        if self.attention not in ATTENTION_KERNELS:
            raise InputError(f"--attention must be one of {', '.join(ATTENTION_KERNELS)}; got {self.attention!r}")

    def extractor_options(self) -> dict:
        """The keyword arguments of :meth:`diffcut.method.features.FeatureExtractor.from_pretrained`."""
        return {
            "compile": self.compile,
            "channels_last": self.channels_last,
            "attention": self.attention,
            "tf32": self.tf32,
        }


@dataclass(frozen=True)
class DecodeSettings:
    """The read + decode tasks (they write the shards too)."""

    batch_size: int = setting(
        256,
        "batch-size",
        "image files per read/decode task (WebDataset: images a shard's task holds at once); a task orders "
        "them by model input size so that model calls fill up (larger: fewer blank images in the calls, more "
        "memory: the encoded files of a task are held together)",
        POOLS,
    )
    cpus: float = setting(1.0, "cpus", "CPUs per read/decode task and per write task", POOLS)

    def __post_init__(self) -> None:
        _at_least_one("--decode-batch-size", self.batch_size)


@dataclass(frozen=True)
class PoolSettings:
    """One stage's Ray actor pool; ``gpus`` None: one GPU per actor when the model runs on CUDA, none on CPU."""

    min: int = setting(1, "pool-min", "minimum {actors}", POOLS)
    max: int = setting(1, "pool-max", "maximum {actors}", POOLS)
    gpus: float | None = setting(
        None,
        "gpus",
        "GPUs each {actor} requests (default: 1 when the model runs on CUDA, 0 on CPU; an explicit value is "
        "requested on any device)",
        POOLS,
        type=float,
    )
    cpus: float = setting(1.0, "cpus", "CPUs per {actor}", POOLS)

    def check(self, stage: str) -> None:
        if self.min < 1 or self.max < self.min:
            raise InputError(f"--{stage}-pool-min/-max must satisfy 1 <= min <= max; got {self.min}, {self.max}")


def _pool(flag: str, actor: str, default: Any, *, actors: str | None = None, without: tuple = ()) -> Any:
    words = {"actor": actor, "actors": actors or actor + "s"}
    return field(default_factory=lambda: default, metadata={"flag": flag, "words": words, "without": without})


@dataclass(frozen=True)
class Pools:
    """Resources of every stage: the decode tasks and one actor pool per stage (flags ``--<stage>-...``)."""

    decode: DecodeSettings = _pool("decode", "read/decode task", DecodeSettings())
    extractor: PoolSettings = _pool("extractor", "feature actor", PoolSettings())
    ncut: PoolSettings = _pool("ncut", "segmentation actor", PoolSettings(max=2), without=("gpus",))
    naming: PoolSettings = _pool("naming", "naming actor", PoolSettings(), actors="naming actors (--vocabulary)")

    def __post_init__(self) -> None:
        for f in fields(self):
            if isinstance(getattr(self, f.name), PoolSettings):
                getattr(self, f.name).check(f.name)

    def min_cpus(self, naming: bool) -> float:
        """CPUs a run needs at the least: one decode task and every pool at its minimum."""
        pools = (self.extractor, self.ncut, self.naming) if naming else (self.extractor, self.ncut)
        return self.decode.cpus + sum(pool.min * pool.cpus for pool in pools)


#: label_dataset's keyword argument for each settings object (speed first: its flags lead the speed group's).
SETTINGS = {"speed": SpeedSettings, "label": LabelSettings, "pools": Pools}


@dataclass(frozen=True)
class Flag:
    """One ``diffcut label`` flag of a settings field: ``owner`` is the path of the object that holds it."""

    flag: str
    owner: tuple[str, ...]
    name: str
    default: Any
    help: str
    group: str
    options: dict

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


def flags() -> Iterator[Flag]:
    """Every settings field that has a flag, in the order of the fields."""
    for key, cls in SETTINGS.items():
        if cls is Pools:
            for pool in fields(Pools):
                meta = pool.metadata
                default = pool.default_factory()
                yield from _fields_flags(default, (key, pool.name), meta["flag"] + "-", meta["words"], meta["without"])
        else:
            yield from _fields_flags(cls(), (key,), "", {}, ())


def _fields_flags(default: Any, owner: tuple, prefix: str, words: dict, without: tuple) -> Iterator[Flag]:
    for f in fields(default):
        meta = f.metadata
        if meta["flag"] is None or f.name in without:
            continue
        help = meta["help"].format(**words)
        yield Flag(
            "--" + prefix + meta["flag"], owner, f.name, getattr(default, f.name), help, meta["group"], meta["argparse"]
        )


def job_arguments(values: Mapping[str, Any]) -> dict:
    """label_dataset's keyword arguments from flag values by argparse dest (a ``diffcut label`` namespace, or
    ``{"model": "tiny-random", "tau": 0.3, "device": "cpu", ...}``): the settings' flags become
    ``label``, ``speed`` and ``pools`` (a flag not given keeps its default), every other key passes as it is."""
    given: dict[tuple, dict] = {}
    rest = dict(values)
    for spec in flags():
        if spec.dest in rest:
            given.setdefault(spec.owner, {})[spec.name] = rest.pop(spec.dest)
    pools = {f.name: replace(f.default_factory(), **given.get(("pools", f.name), {})) for f in fields(Pools)}
    return {
        **rest,
        "label": LabelSettings(**given.get(("label",), {})),
        "speed": SpeedSettings(**given.get(("speed",), {})),
        "pools": Pools(**pools),
    }
