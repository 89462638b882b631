# Over 450 lines: kept whole while issue 15 edits it in parallel; to be split after that merge into
# prompts + vocabulary, the CLIP towers, and SegmentNamer.
"""Open-vocabulary names for DiffCut segments: mask-pooled ConvNeXt-CLIP features vs class-name prompts.

Follows the authors' open-vocabulary extension of DiffCut (``eval_diffcut_openvoc.py``
and ``tools/clip_classifier.py`` in the public DiffCut repository, adapted from
FC-CLIP, Yu et al., NeurIPS 2023):

1. the image goes through the visual trunk of an open_clip ConvNeXt CLIP
   (default ``convnext_large_d_320``, pretrained tag ``laion2b_s29b_b131k_ft_soup``)
   up to and including ``norm_pre``: a dense (C, H/32, W/32) feature map;
2. each segment's binary mask is bilinearly resized to that grid, thresholded
   at > 0, and the features are averaged inside it (FC-CLIP's ``MaskPooling``);
3. the pooled vector goes through the trunk's head (its LayerNorm, on a 1x1
   "image") and the visual projection head (the MLP): one CLIP image embedding
   per segment;
4. every class name is put into the 14 ViLD prompt templates; the text
   embeddings are L2-normalized, averaged over templates and normalized again;
   a class with comma-separated synonyms has one such embedding per synonym;
5. logits = min(exp(logit_scale), 100) * cos(image, text); a class's logit is the
   maximum over its synonyms; the predicted class is the argmax over the real
   classes of the vocabulary. ``class_score`` is the softmax probability of that
   class over the vocabulary.

Text embeddings are computed once per vocabulary (:meth:`SegmentNamer.text_classifier`).

Why an in-house model and not ``open_clip``
-------------------------------------------
Decision (2026-12-02): ``open_clip_torch`` 3.3.0 and ``timm`` 1.0.31 import
``torchvision`` at import time. With the CPU torch wheel this project installs
(``torch==2.13.0``), pip resolves ``torchvision`` 0.28.0 (0.29.x when torch is
not pinned), and ``import open_clip`` then fails with ``RuntimeError: operator
torchvision::nms does not exist`` (tried in a fresh venv here). A CUDA build of
torchvision would pull multi-GB wheels, which CI must not. So this module
implements the ConvNeXt CLIP itself, with torch only: :class:`ConvNextCLIP`
has the module and parameter names of open_clip's ``CLIP`` with a timm
ConvNeXt visual tower (``visual.trunk.stem.0``, ``visual.trunk.stages.2.blocks.5.conv_dw``,
``visual.head.mlp.fc1``, ``transformer.resblocks.0.attn.in_proj_weight``,
``text_projection``, ``logit_scale`` ...), so the published open_clip checkpoint
(safetensors) loads into it with a strict key check (:func:`load_clip`). The
``naming`` extra pins ``open_clip_torch``/``timm`` for environments where they
do import (e.g. a GPU node with a matching torchvision); ``diffcut`` itself
never needs them.

Choices that differ from the published code
-------------------------------------------
- Model loading: open_clip's ``create_model_and_transforms`` is replaced by
  :func:`load_clip` (same weights, same names; safetensors only, no pickles).
  The published model resolves to the hub repository
  ``laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup``.
- Tokenizer: transformers' ``CLIPTokenizer`` (the same BPE as open_clip's
  ``SimpleTokenizer``), read from ``vocab.json``/``merges.txt`` in the model
  directory, else from :data:`TOKENIZER_FALLBACK`. The end-of-text embedding is
  taken at the position of the first end-of-text token (open_clip takes the
  argmax of the token ids, which is the same position for the real vocabulary).
  Not checked against open_clip's tokens here (no network).
- Image input: the published script feeds its 1024x1024 evaluation image
  (2048x2048 for COCO-Object) as its dataloader prepared it; here the image is
  resized to ``resolution`` x ``resolution`` (default 1024, for every vocabulary:
  no 2048 upsampling for COCO-Object) and normalized with CLIP's mean/std.
- A segment whose resized mask is empty on the feature grid (smaller than a
  grid cell) is pooled with area weights instead (the published code would
  average nothing); a segment with no pixel at all gets ``class_id`` -1.
- The published ``get_classification_logits`` appends the vocabulary's last
  synonym column as a "void" logit and then drops it; this is the same as an
  argmax over the real classes, which is what is computed here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

#: The 14 ViLD prompt templates (Gu et al., 2022), as used by FC-CLIP and DiffCut's extension.
VILD_PROMPTS = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

#: Built-in vocabularies: the class lists (with synonyms) of the published extension.
#: ``voc``: PASCAL VOC 21 with FC-CLIP's prompt-engineered names (index 0 is "background"
#: with its many synonyms); ``context``: "background" + PASCAL Context 59; ``coco-object``:
#: "background" + the 80 COCO thing classes.
BUILTIN_VOCABULARIES = ("voc", "context", "coco-object")

DEFAULT_NAMING_MODEL = "convnext_large_d_320:laion2b_s29b_b131k_ft_soup"
TINY_NAMING_MODEL = "tiny-random"
#: open_clip's pretrained tag -> hub repository holding ``open_clip_config.json`` and the safetensors.
PRETRAINED_HUB = {
    "convnext_large_d_320:laion2b_s29b_b131k_ft_soup": "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup",
}
TOKENIZER_FALLBACK = "openai/clip-vit-large-patch14"
#: open_clip's OPENAI_DATASET_MEAN / STD.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: timm ConvNeXt variants: (depths, dims).
CONVNEXT_VARIANTS = {
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
#: open_clip's ``convnext_large_d_320`` model config.
CONVNEXT_LARGE_D_320 = {
    "embed_dim": 768,
    "vision_cfg": {"timm_model_name": "convnext_large", "timm_pool": "", "timm_proj": "mlp", "image_size": 320},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 16},
}
TINY_NAMING_VERSION = 1


# --------------------------------------------------------------------------- vocabularies
@dataclass(frozen=True)
class Vocabulary:
    """Class names; ``synonyms[i]`` are the comma-separated alternatives of class i."""

    name: str
    synonyms: tuple[tuple[str, ...], ...]

    @property
    def class_names(self) -> list[str]:
        """The first synonym of every class: the name written to the output."""
        return [names[0] for names in self.synonyms]

    def __len__(self) -> int:
        return len(self.synonyms)


def parse_vocabulary(text: str, name: str = "custom") -> Vocabulary:
    """One class per line, synonyms comma-separated; blank lines and ``#`` comments skipped."""
    classes = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        names = tuple(part.strip() for part in line.split(",") if part.strip())
        if names:
            classes.append(names)
    if not classes:
        raise ValueError(f"vocabulary {name!r} has no class names")
    return Vocabulary(name=name, synonyms=tuple(classes))


def load_vocabulary(spec: str) -> Vocabulary:
    """``voc``, ``context``, ``coco-object`` (built in) or a path to a vocabulary file."""
    if spec in BUILTIN_VOCABULARIES:
        text = resources.files("diffcut").joinpath("data", "vocabularies", f"{spec}.txt").read_text("utf-8")
        return parse_vocabulary(text, spec)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--vocabulary {spec!r} is neither one of {', '.join(BUILTIN_VOCABULARIES)} nor a file")
    return parse_vocabulary(path.read_text("utf-8"), str(path))


# --------------------------------------------------------------------------- the model
def _modules():
    """torch building blocks, imported lazily so that ``import diffcut.method.naming`` stays cheap."""
    import torch
    from torch import nn

    class LayerNorm2d(nn.LayerNorm):
        """LayerNorm over the channels of an NCHW tensor (timm's ``LayerNorm2d``)."""

        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)

    class Mlp(nn.Module):
        def __init__(self, width: int, hidden: int, out: int, bias_out: bool = True):
            super().__init__()
            self.fc1 = nn.Linear(width, hidden)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden, out, bias=bias_out)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class ConvNextBlock(nn.Module):
        """timm ``ConvNeXtBlock`` (non-conv MLP path, layer scale ``gamma``)."""

        def __init__(self, dim: int):
            super().__init__()
            self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, 4 * dim, dim)
            self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

        def forward(self, x):
            y = self.conv_dw(x).permute(0, 2, 3, 1)
            y = self.mlp(self.norm(y)) * self.gamma
            return x + y.permute(0, 3, 1, 2)

    class ConvNextStage(nn.Module):
        def __init__(self, in_dim: int, dim: int, depth: int, first: bool):
            super().__init__()
            # timm: the first stage keeps the stem's stride; every later one halves the size.
            self.downsample = (nn.Identity() if first else
                               nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2)))
            self.blocks = nn.Sequential(*[ConvNextBlock(dim) for _ in range(depth)])

        def forward(self, x):
            return self.blocks(self.downsample(x))

    class NormHead(nn.Module):
        """timm ``NormMlpClassifierHead`` after ``reset_classifier(0)``: average pool, LayerNorm2d, flatten."""

        def __init__(self, dim: int):
            super().__init__()
            self.norm = LayerNorm2d(dim, eps=1e-6)

        def forward(self, x):
            return self.norm(x.mean(dim=(2, 3), keepdim=True)).flatten(1)

    class ConvNextTrunk(nn.Module):
        def __init__(self, depths: Sequence[int], dims: Sequence[int]):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
            self.stages = nn.Sequential(*[ConvNextStage(dims[max(0, i - 1)], dims[i], depths[i], i == 0)
                                          for i in range(len(depths))])
            self.norm_pre = nn.Identity()
            self.head = NormHead(dims[-1])

        def forward_dense(self, x):
            return self.norm_pre(self.stages(self.stem(x)))

    class VisualTower(nn.Module):
        """open_clip ``TimmModel`` with ``timm_proj="mlp"``: trunk + ``head.mlp``."""

        def __init__(self, depths, dims, embed_dim: int):
            super().__init__()
            self.trunk = ConvNextTrunk(depths, dims)
            self.head = nn.Sequential()
            self.head.add_module("mlp", Mlp(dims[-1], 2 * embed_dim, embed_dim, bias_out=False))

    class ResidualAttentionBlock(nn.Module):
        def __init__(self, width: int, heads: int):
            super().__init__()
            self.ln_1 = nn.LayerNorm(width)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            self.ln_2 = nn.LayerNorm(width)
            self.mlp = nn.Sequential()
            self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
            self.mlp.add_module("gelu", nn.GELU())
            self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

        def forward(self, x, attn_mask):
            h = self.ln_1(x)
            x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
            return x + self.mlp(self.ln_2(x))

    class TextTransformer(nn.Module):
        def __init__(self, width: int, layers: int, heads: int):
            super().__init__()
            self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

        def forward(self, x, attn_mask):
            for block in self.resblocks:
                x = block(x, attn_mask)
            return x

    class ConvNextCLIP(nn.Module):
        """open_clip ``CLIP`` with a timm ConvNeXt visual tower; same state-dict names."""

        def __init__(self, config: dict):
            super().__init__()
            vision, text = config["vision_cfg"], config["text_cfg"]
            if vision.get("timm_proj", "mlp") != "mlp" or vision.get("timm_pool", "") not in ("", "avg"):
                raise ValueError(f"only ConvNeXt towers with an MLP head are supported; got {vision}")
            name = vision["timm_model_name"]
            depths, dims = (vision["depths"], vision["dims"]) if "depths" in vision else CONVNEXT_VARIANTS[name]
            embed_dim = int(config["embed_dim"])
            self.config = config
            self.visual = VisualTower(depths, dims, embed_dim)
            width, context = int(text["width"]), int(text["context_length"])
            self.context_length = context
            self.token_embedding = nn.Embedding(int(text["vocab_size"]), width)
            self.positional_embedding = nn.Parameter(torch.zeros(context, width))
            self.transformer = TextTransformer(width, int(text["layers"]), int(text["heads"]))
            self.ln_final = nn.LayerNorm(width)
            self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            mask = torch.full((context, context), float("-inf")).triu_(1)
            self.register_buffer("attn_mask", mask, persistent=False)

        def encode_text(self, tokens, eot_positions):
            """Unnormalized text embeddings at each sequence's end-of-text token."""
            x = self.token_embedding(tokens) + self.positional_embedding
            x = self.ln_final(self.transformer(x, self.attn_mask))
            return x[torch.arange(x.shape[0]), eot_positions] @ self.text_projection

        def dense_features(self, images):
            """(B, C, H/32, W/32) trunk features after ``norm_pre`` (FC-CLIP's ``clip_vis_dense``)."""
            return self.visual.trunk.forward_dense(images)

        def embed_pooled(self, pooled):
            """(N, C) pooled dense features -> (N, embed_dim) image embeddings (trunk head, then visual head)."""
            x = self.visual.trunk.head(pooled[:, :, None, None])
            return self.visual.head(x)

    return ConvNextCLIP


def build_clip(config: dict):
    """An untrained :class:`ConvNextCLIP` for an open_clip model config (``model_cfg``)."""
    return _modules()(config)


def _tiny_config(vocab_size: int) -> dict:
    return {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "diffcut_tiny", "depths": [1, 1, 1, 1], "dims": [8, 16, 16, 24],
                       "timm_pool": "", "timm_proj": "mlp", "image_size": 64},
        "text_cfg": {"context_length": 24, "vocab_size": vocab_size, "width": 16, "heads": 2, "layers": 1},
    }


def tiny_naming_path() -> Path:
    """The tiny random ConvNeXt CLIP (safetensors + config + tokenizer), built locally on first use."""
    from diffcut.method.tiny import cache_root

    target = cache_root() / f"tiny-random-convnext-clip-v{TINY_NAMING_VERSION}"
    if not (target / "open_clip_config.json").exists():
        build_tiny_clip(target)
    return target


def build_tiny_clip(target: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny randomly initialized ConvNeXt CLIP in open_clip's hub layout to ``target``."""
    import torch
    from safetensors.torch import save_file

    from diffcut.method.tiny import _tiny_clip_tokenizer, publish_directory

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_clip_tokenizer()
    config = _tiny_config(len(tokenizer))
    torch.manual_seed(seed)
    model = build_clip(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(1.0)  # a visible residual branch: random weights that do something
            elif parameter.ndim >= 2:
                parameter.normal_(0.0, 0.2)
    def write(staging: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, staging / "open_clip_model.safetensors")
        (staging / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "note": "random, for tests"}))
        tokenizer.save_pretrained(staging)

    return publish_directory(target, "open_clip_config.json", write)


def resolve_naming_model(model: str) -> Path:
    """``tiny-random``, a local directory, an open_clip ``name:pretrained`` tag or a hub repository id."""
    if model == TINY_NAMING_MODEL:
        return tiny_naming_path()
    if os.path.isdir(model):
        return Path(model)
    from huggingface_hub import snapshot_download

    repo = PRETRAINED_HUB.get(model, model)
    return Path(snapshot_download(repo, allow_patterns=["open_clip_config.json", "*.safetensors", "*.json",
                                                        "merges.txt"]))


def load_clip(model: str, device: str = "cpu"):
    """(model, tokenizer) from open_clip's layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``.

    The state dict must match :class:`ConvNextCLIP` exactly (strict load).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    path = resolve_naming_model(model)
    config_file = path / "open_clip_config.json"
    config = json.loads(config_file.read_text())["model_cfg"] if config_file.exists() else CONVNEXT_LARGE_D_320
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no .safetensors weights in {path} (pickled checkpoints are not loaded)")
    clip = build_clip(config)
    clip.load_state_dict(load_file(str(weights[0])), strict=True)
    clip.to(device=device, dtype=torch.float32).eval()
    has_tokenizer = (path / "vocab.json").exists() or (path / "tokenizer.json").exists()
    source = str(path) if has_tokenizer else TOKENIZER_FALLBACK
    tokenizer = CLIPTokenizer.from_pretrained(source)
    return clip, tokenizer


# --------------------------------------------------------------------------- the algorithm
def mask_pool(dense, masks):
    """FC-CLIP's mask pooling: average ``dense`` (C, h, w) inside each of ``masks`` (K, H, W) {0,1}.

    Masks are bilinearly resized to (h, w) and thresholded at > 0; a mask left
    empty there falls back to area weights (a deviation: see the module doc).
    Returns (K, C) and a (K,) bool of segments that had any pixel.
    """
    import torch
    import torch.nn.functional as F

    masks = masks[None].float()
    size = dense.shape[-2:]
    binary = (F.interpolate(masks, size=size, mode="bilinear", align_corners=False) > 0).float()[0]
    area = F.interpolate(masks, size=size, mode="area")[0]
    weights = torch.where(binary.sum((1, 2), keepdim=True) > 0, binary, area)
    present = weights.sum((1, 2)) > 0
    weights = weights / (weights.sum((1, 2), keepdim=True) + 1e-8)
    return torch.einsum("chw,khw->kc", dense, weights), present


def classify(image_embeddings, text_classifier, synonym_class, num_classes: int, logit_scale):
    """Class logits: scaled cosine to every synonym, maximum over each class's synonyms.

    Args:
        image_embeddings: (K, D) unnormalized.
        text_classifier: (S, D) normalized, one row per synonym.
        synonym_class: (S,) long, the class of every synonym row.
        logit_scale: CLIP's log-scale parameter; exp is clamped at 100.
    Returns:
        (K, num_classes) logits.
    """
    import torch
    import torch.nn.functional as F

    scale = torch.clamp(logit_scale.exp(), max=100)
    logits = scale * F.normalize(image_embeddings, dim=-1) @ text_classifier.T
    out = torch.full((logits.shape[0], num_classes), float("-inf"), dtype=logits.dtype, device=logits.device)
    index = synonym_class[None].expand_as(logits)
    return out.scatter_reduce(1, index, logits, reduce="amax", include_self=True)


@dataclass
class Names:
    """Per-segment names of one image."""

    class_id: np.ndarray     # (K,) int, -1 for a segment with no pixel
    class_score: np.ndarray  # (K,) float, softmax probability of the class
    semantic_mask: np.ndarray  # (H, W) class id per pixel


class SegmentNamer:
    """A loaded CLIP and one vocabulary's text classifier (computed once)."""

    def __init__(self, model: str, vocabulary: Vocabulary | str, device: str = "cpu", resolution: int = 1024):
        import torch

        self.torch = torch
        self.device = device
        self.model_name = model
        self.resolution = int(resolution)
        self.vocabulary = load_vocabulary(vocabulary) if isinstance(vocabulary, str) else vocabulary
        self.clip, self.tokenizer = load_clip(model, device)
        self.text, self.synonym_class = self.text_classifier()

    def tokenize(self, texts: Sequence[str]):
        """(N, context) token ids (zero-padded) and the end-of-text position of each."""
        torch = self.torch
        context = self.clip.context_length
        eot = self.tokenizer.eos_token_id
        tokens = torch.zeros((len(texts), context), dtype=torch.long)
        positions = []
        for i, text in enumerate(texts):
            ids = self.tokenizer(text, truncation=True, max_length=context)["input_ids"]
            if ids[-1] != eot:
                ids = ids[:context - 1] + [eot]
            tokens[i, :len(ids)] = torch.tensor(ids)
            positions.append(len(ids) - 1)
        return tokens.to(self.device), torch.tensor(positions, device=self.device)

    def text_classifier(self):
        """(S, D) normalized template-averaged text embeddings, one per synonym, and each synonym's class."""
        torch = self.torch
        synonyms = [(c, name) for c, names in enumerate(self.vocabulary.synonyms) for name in names]
        prompts = [template.format(name) for _, name in synonyms for template in VILD_PROMPTS]
        chunks = []
        with torch.no_grad():
            for start in range(0, len(prompts), 128):
                tokens, positions = self.tokenize(prompts[start:start + 128])
                chunks.append(self.clip.encode_text(tokens, positions))
        text = torch.cat(chunks)
        text = text / text.norm(dim=-1, keepdim=True)
        text = text.reshape(len(synonyms), len(VILD_PROMPTS), -1).mean(1)
        text = text / text.norm(dim=-1, keepdim=True)
        return text, torch.tensor([c for c, _ in synonyms], device=self.device)

    def preprocess(self, pixels: np.ndarray):
        """(H, W, 3) uint8, or float in [0, 1] (the benchmark's prepared image) -> (1, 3, r, r) CLIP-normalized."""
        torch = self.torch
        pixels = np.asarray(pixels)
        if np.issubdtype(pixels.dtype, np.floating):
            image = torch.from_numpy(np.array(pixels, dtype=np.float32))
        else:
            image = torch.from_numpy(np.array(pixels, dtype=np.uint8)).float() / 255
        image = image.to(self.device).permute(2, 0, 1)[None]
        image = torch.nn.functional.interpolate(image, size=(self.resolution, self.resolution), mode="bilinear",
                                                align_corners=False, antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        return (image - mean) / std

    def name(self, pixels: np.ndarray, mask: np.ndarray, num_segments: int) -> Names:
        """Names of segments 0..num_segments-1 of ``mask`` (H, W) in the image ``pixels`` (H', W', 3)."""
        torch = self.torch
        with torch.no_grad():
            dense = self.clip.dense_features(self.preprocess(pixels))[0]
            labels = torch.from_numpy(np.asarray(mask, dtype=np.int64)).to(self.device)
            masks = labels[None] == torch.arange(num_segments, device=self.device)[:, None, None]
            pooled, present = mask_pool(dense, masks)
            logits = classify(self.clip.embed_pooled(pooled), self.text, self.synonym_class, len(self.vocabulary),
                              self.clip.logit_scale)
            probabilities = logits.softmax(-1)
            score, class_id = probabilities.max(-1)
        class_id = torch.where(present, class_id, torch.full_like(class_id, -1)).cpu().numpy()
        score = torch.where(present, score, torch.zeros_like(score)).cpu().numpy().astype(np.float32)
        lookup = np.where(class_id < 0, 0, class_id)
        return Names(class_id=class_id, class_score=score, semantic_mask=lookup[np.asarray(mask)])
