"""Published architecture configs, for benchmarks that need the real sizes but no weights.

No hub access here: these are the public ``config.json`` values of the SDXL
base 1.0 UNet and VAE (the SDXL architecture that SSD-1B distills). Random or
meta-device weights built from them have the real shapes and FLOPs.
"""

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

#: Text-conditioning shapes of the SDXL family: 77 tokens x (768 + 1280), pooled 1280.
SDXL_PROMPT_SHAPE = (1, 77, 2048)
SDXL_POOLED_SHAPE = (1, 1280)

#: SSD-1B (segmind/SSD-1B), the paper's model: SDXL's UNet with fewer transformer blocks.
#: Source of the depths: the SGM-format detection config of SSD-1B in ComfyUI
#: (comfyanonymous/ComfyUI, comfy/model_detection.py ``SSD_1B`` and comfy/supported_models.py
#: ``SSD1B``): ``transformer_depth`` [0, 0, 2, 2, 4, 4] per input block, i.e. down blocks
#: with 0 (DownBlock2D), 2 and 4 transformer blocks per attention; ``transformer_depth_output``
#: [0, 0, 0, 1, 1, 2, 10, 4, 4] consumed from the end, i.e. up blocks (4, 4, 10), (2, 1, 1),
#: none; ``transformer_depth_middle`` -1, i.e. no transformer in the middle. Everything else
#: (channels 320/640/1280, 2 layers per block, 64-channel heads, context 2048, added
#: conditioning 2816, linear projections) is SDXL's. These depths, not segmind/SSD-1B's own
#: diffusers ``unet/config.json``, are the source: only the down blocks up to the feature run,
#: and they follow from them. The feature is then
#: down_blocks.2.attentions.1.transformer_blocks.3.attn1 (32x32x1280 at 1024x1024).
SSD1B_UNET = dict(
    SDXL_UNET,
    transformer_layers_per_block=(1, 2, 4),
    reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), (1, 1, 1)),
    mid_block_type=None,
)
