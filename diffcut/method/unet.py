"""The part of the diffusion UNet that DiffCut runs, and the model graph's speed switches.

DiffCut's feature is the output of ``attn1`` of the last transformer block of
the deepest down block that has attentions (docs/method.md §2.1; Couairon et al.,
NeurIPS 2024, arXiv:2406.02842, §3.1). :func:`truncated_unet_forward` runs,
from the loaded diffusers modules, exactly the part of
``UNet2DConditionModel.forward`` that comes before it and returns that output;
:func:`vae_latent_mean` is the VAE encoder's posterior mean. The module
wrappers, :func:`set_attention_kernel` and the ``torch.compile`` helpers are
the speed options of :class:`diffcut.method.features.FeatureExtractor`.
Tensors in, tensors out.
"""

from __future__ import annotations

import torch


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


def check_truncatable(unet, block_index: int) -> None:
    """Refuse a UNet whose forward :func:`truncated_unet_forward` does not reproduce.

    The SD 1.x / 2.x and SDXL families (SSD-1B, Segmind-Vega) pass: no class
    embedding, no image-hint conditioning, continuous-input transformers
    with plain LayerNorm blocks and no positional embedding.
    """
    config = unet.config
    problems = []
    if getattr(unet, "class_embedding", None) is not None:
        problems.append("class-conditioned (class_embed_type)")
    if config.addition_embed_type == "image_hint":
        problems.append("image_hint added conditioning")
    block = unet.down_blocks[block_index]
    if len(block.resnets) != len(block.attentions):
        problems.append("a feature block with unequal resnets and attentions")
    transformer = block.attentions[-1]
    if not getattr(transformer, "is_input_continuous", False):
        problems.append("a transformer on non-continuous inputs")
    last = transformer.transformer_blocks[-1]
    if getattr(last, "norm_type", None) not in ("layer_norm", "layer_norm_i2vgen") or last.pos_embed is not None:
        problems.append(f"a transformer block with norm_type {getattr(last, 'norm_type', None)!r} / pos_embed")
    if problems:
        raise ValueError("diffcut's truncated UNet forward does not support this UNet: " + "; ".join(problems))


def truncated_unet_forward(
    unet,
    block_index: int,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict | None,
) -> torch.Tensor:
    """The output of the feature's ``attn1``, running only what precedes it.

    The same steps, in the same order and with the same modules, as
    diffusers' ``UNet2DConditionModel.forward`` (diffusers 0.42, without the
    adapter / ControlNet / GLIGEN / mask inputs DiffCut never passes): time
    embedding, added (text-time) embedding, ``conv_in``, the down blocks
    before the feature's, and in the feature's ``CrossAttnDownBlock2D`` every
    resnet + transformer pair before its last one, the last resnet, then
    :func:`_transformer_to_attn1`. ``unet.down_blocks[block_index]`` is the
    block of :func:`feature_module_path`; :func:`check_truncatable` guards the
    assumptions. Returns (B, h * w, c) tokens in the UNet's dtype.
    """
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    hidden = unet.conv_in(sample)
    for block in unet.down_blocks[:block_index]:
        if getattr(block, "has_cross_attention", False):
            hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, _ = block(hidden_states=hidden, temb=emb)
    block = unet.down_blocks[block_index]
    last = len(block.attentions) - 1
    for resnet, transformer in zip(block.resnets[:last], block.attentions[:last]):
        hidden = resnet(hidden, emb)
        hidden = transformer(hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    hidden = block.resnets[last](hidden, emb)
    return _transformer_to_attn1(block.attentions[last], hidden, encoder_hidden_states)


def _transformer_to_attn1(transformer, hidden: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """A ``Transformer2DModel`` (continuous input) up to its last block's ``attn1`` output.

    GroupNorm, ``proj_in`` (a 1x1 conv before flattening, or a linear layer
    after it: ``use_linear_projection``), every ``BasicTransformerBlock`` but
    the last, then the last block's ``norm1`` and ``attn1`` -- what
    diffusers' ``Transformer2DModel.forward`` and
    ``BasicTransformerBlock.forward`` run before that point.
    """
    batch, _, height, width = hidden.shape
    hidden = transformer.norm(hidden)
    if not transformer.use_linear_projection:
        hidden = transformer.proj_in(hidden)
        hidden = hidden.permute(0, 2, 3, 1).reshape(batch, height * width, hidden.shape[1])
    else:
        hidden = hidden.permute(0, 2, 3, 1).reshape(batch, height * width, hidden.shape[1])
        hidden = transformer.proj_in(hidden)
    for block in transformer.transformer_blocks[:-1]:
        hidden = block(hidden, encoder_hidden_states=encoder_hidden_states)
    last = transformer.transformer_blocks[-1]
    normed = last.norm1(hidden)
    return last.attn1(normed, encoder_hidden_states=encoder_hidden_states if last.only_cross_attention else None)


def vae_latent_mean(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Mean of the VAE posterior of ``pixels`` in [-1, 1]: ``AutoencoderKL.encode(x).latent_dist.mean``.

    Encoder, ``quant_conv``, and the first half of the channels (the
    posterior's parameters are mean and log-variance stacked, diffusers'
    ``DiagonalGaussianDistribution``), without building the distribution
    object, so that ``torch.compile`` captures it as one graph.
    """
    moments = vae.encoder(pixels)
    if getattr(vae, "quant_conv", None) is not None:
        moments = vae.quant_conv(moments)
    mean, _ = torch.chunk(moments, 2, dim=1)
    return mean


class _VaeToLatentMean(torch.nn.Module):
    """:func:`vae_latent_mean` as a module: ``torch.compile`` keeps one code cache per module class."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels):
        return vae_latent_mean(self.vae, pixels)


class _UNetToFeature(torch.nn.Module):
    """:func:`truncated_unet_forward` as a module (see :class:`_VaeToLatentMean`)."""

    def __init__(self, unet, block_index: int):
        super().__init__()
        self.unet = unet
        self.block_index = block_index

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        return truncated_unet_forward(
            self.unet, self.block_index, sample, timestep, encoder_hidden_states, added_cond_kwargs
        )


def set_attention_kernel(models, attention: str) -> None:
    """Every attention of ``models`` on the SDPA kernel or the explicit (eager) one."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = AttnProcessor2_0 if attention == "sdpa" else AttnProcessor
    for model in models:
        model.set_attn_processor(processor())


def _mark_spatial_dynamic(tensor: torch.Tensor) -> None:
    """Height and width of a compiled call's input vary with the bucket: one graph for all."""
    torch._dynamo.mark_dynamic(tensor, 2)
    torch._dynamo.mark_dynamic(tensor, 3)


def _distinct_symbolic_sizes():
    """Compile height and width as two symbols even when a first image is square.

    With dynamo's default "duck sizing", equal sizes share one symbol: a
    square first call would give a graph valid for squares only and every
    non-square bucket would then recompile it.
    """
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)
