"""The open_clip ConvNeXt CLIP that names segments: configs, the torch model, loading (hub id, directory, tiny random).

The model is written here with open_clip's state-dict names (so its
safetensors checkpoints load strictly) because open_clip and timm need
torchvision, which does not import beside the CPU torch of this project's
machines; see :mod:`diffcut.method.naming` for the method and the choices
that differ from the published extension.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

#: open_clip's OPENAI_DATASET_MEAN / STD.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_NAMING_MODEL = "convnext_large_d_320:laion2b_s29b_b131k_ft_soup"
TINY_NAMING_MODEL = "tiny-random"
#: open_clip's pretrained tag -> hub repository holding ``open_clip_config.json`` and the safetensors.
PRETRAINED_HUB = {
    "convnext_large_d_320:laion2b_s29b_b131k_ft_soup": "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup",
}
TOKENIZER_FALLBACK = "openai/clip-vit-large-patch14"
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
            self.downsample = (
                nn.Identity()
                if first
                else nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2))
            )
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
            self.stages = nn.Sequential(
                *[ConvNextStage(dims[max(0, i - 1)], dims[i], depths[i], i == 0) for i in range(len(depths))]
            )
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
        "vision_cfg": {
            "timm_model_name": "diffcut_tiny",
            "depths": [1, 1, 1, 1],
            "dims": [8, 16, 16, 24],
            "timm_pool": "",
            "timm_proj": "mlp",
            "image_size": 64,
        },
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

    from diffcut.method.tiny import publish_directory, tiny_clip_tokenizer

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
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
    return Path(
        snapshot_download(repo, allow_patterns=["open_clip_config.json", "*.safetensors", "*.json", "merges.txt"])
    )


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
