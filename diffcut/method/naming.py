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
``open_clip_torch`` and ``timm`` import ``torchvision`` at import time, and
with the CPU torch wheel this project installs the torchvision that pip
resolves does not import (``operator torchvision::nms does not exist``;
docs/naming.md has the versions); a CUDA build of torchvision would pull
multi-GB wheels, which CI must not. So this module
implements the ConvNeXt CLIP itself, with torch only: :class:`ConvNextCLIP`
has the module and parameter names of open_clip's ``CLIP`` with a timm
ConvNeXt visual tower (``visual.trunk.stem.0``, ``visual.trunk.stages.2.blocks.5.conv_dw``,
``visual.head.mlp.fc1``, ``transformer.resblocks.0.attn.in_proj_weight``,
``text_projection``, ``logit_scale`` ...), so the published open_clip checkpoint
(safetensors) loads into it with a strict key check (:func:`load_clip`);
``diffcut`` never needs open_clip or timm.

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

The vocabularies and prompt templates live in :mod:`diffcut.method.vocabulary`,
the CLIP model and its loading in :mod:`diffcut.method.clip`; this module
(the pooling, the classification, :class:`SegmentNamer`) re-exports both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffcut.method.clip import (  # noqa: F401 - re-exported: the naming API in one place
    CLIP_MEAN,
    CLIP_STD,
    CONVNEXT_LARGE_D_320,
    CONVNEXT_VARIANTS,
    DEFAULT_NAMING_MODEL,
    PRETRAINED_HUB,
    TINY_NAMING_MODEL,
    build_clip,
    build_tiny_clip,
    load_clip,
    resolve_naming_model,
    tiny_naming_path,
)
from diffcut.method.vocabulary import (  # noqa: F401 - re-exported
    BUILTIN_VOCABULARIES,
    VILD_PROMPTS,
    Vocabulary,
    load_vocabulary,
    parse_vocabulary,
)


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

    class_id: np.ndarray  # (K,) int, -1 for a segment with no pixel
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
                ids = ids[: context - 1] + [eot]
            tokens[i, : len(ids)] = torch.tensor(ids)
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
                tokens, positions = self.tokenize(prompts[start : start + 128])
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
        image = torch.nn.functional.interpolate(
            image, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False, antialias=True
        )
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
            logits = classify(
                self.clip.embed_pooled(pooled),
                self.text,
                self.synonym_class,
                len(self.vocabulary),
                self.clip.logit_scale,
            )
            probabilities = logits.softmax(-1)
            score, class_id = probabilities.max(-1)
        class_id = torch.where(present, class_id, torch.full_like(class_id, -1)).cpu().numpy()
        score = torch.where(present, score, torch.zeros_like(score)).cpu().numpy().astype(np.float32)
        lookup = np.where(class_id < 0, 0, class_id)
        return Names(class_id=class_id, class_score=score, semantic_mask=lookup[np.asarray(mask)])
