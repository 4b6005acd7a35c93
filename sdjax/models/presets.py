"""Full-size Stable Diffusion architectures as diffusers/transformers config.json dicts.

For building models without a checkpoint (training from scratch, memory planning, structure
tests). A real checkpoint's own config.json always takes precedence when loading it.
"""

from __future__ import annotations

import copy

_SD_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 512, "scaling_factor": 0.18215,
}

_SD_UNET = {
    "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "norm_num_groups": 32,
    "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}

PRESETS: dict[str, dict[str, dict]] = {
    # runwayml/stable-diffusion-v1-5: CLIP ViT-L/14 text, 8 heads at every level.
    "sd15": {
        "text_encoder": {
            "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2,
        },
        "vae": _SD_VAE,
        "unet": dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768),
    },
    # stabilityai/stable-diffusion-2-1 (768, v-prediction): OpenCLIP ViT-H/14 text cut to 23 layers,
    # head dim 64 everywhere, linear projections, attention logits upcast to float32.
    "sd21": {
        "text_encoder": {
            "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 23, "num_attention_heads": 16, "max_position_embeddings": 77,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2,
        },
        "vae": dict(_SD_VAE, sample_size=768),
        "unet": dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     use_linear_projection=True, upcast_attention=True, sample_size=96),
    },
}


def preset(name: str, key: str = "model.architecture") -> dict[str, dict]:
    """A copy of PRESETS[name]; an unknown name is an error naming `key` (the flag or config key)."""
    if name not in PRESETS:
        raise ValueError(f"{key} {name!r} is unknown; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _small_family(vae_channels: list[int], unet_channels: list[int], heads: int, text_width: int,
                  text_layers: int, latent_side: int, text_positions: int = 77,
                  latent_channels: int = 4, unet_layers: int = 1) -> dict[str, dict]:
    """A scaled-down SD architecture for training from scratch (the text vocab size and EOS id are
    set from the tokenizer when the model is built)."""
    levels = len(unet_channels)
    return {
        "text_encoder": {
            "architectures": ["CLIPTextModel"], "vocab_size": 0, "hidden_size": text_width,
            "intermediate_size": 4 * text_width, "num_hidden_layers": text_layers, "num_attention_heads": 4,
            "max_position_embeddings": text_positions, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "eos_token_id": 0,
        },
        "vae": dict(_SD_VAE, block_out_channels=vae_channels, layers_per_block=1, norm_num_groups=8,
                    down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
                    up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
                    sample_size=latent_side * 2 ** (len(vae_channels) - 1), scaling_factor=1.0,
                    latent_channels=latent_channels),
        "unet": dict(_SD_UNET, in_channels=latent_channels, out_channels=latent_channels,
                     block_out_channels=unet_channels, layers_per_block=unet_layers, norm_num_groups=8,
                     attention_head_dim=heads, cross_attention_dim=text_width, sample_size=latent_side,
                     down_block_types=["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)),
    }


# Tiny: CPU tests and smoke runs (32x32 images, 16x16 latents). Small: the shipped default model,
# trained from scratch on CPU in about 32 minutes (64x64 images, 8x8x8 latents; prompts of the
# shapes dataset are 10 tokens, so 16 positions).
PRESETS["tiny"] = _small_family([16, 32], [32, 64], heads=4, text_width=32, text_layers=2, latent_side=16)
# Two res blocks per UNet level: at 1000 steps it drew the asked shape for 71% of large and 46% of
# small shapes, against 54% and 27% with one (wider levels, 96/192 channels, did not help: 52%, 33%).
PRESETS["small"] = _small_family([16, 32, 64, 64], [64, 128], heads=4, text_width=64, text_layers=2,
                                 latent_side=8, text_positions=16, latent_channels=8, unet_layers=2)

# SDXL base 1.0 and refiner 1.0 (stabilityai/stable-diffusion-xl-*-1.0), as their config.json files give
# them (parameter counts and key layouts are tested against the reference classes). For planning and
# structure; they are fine-tuned from a checkpoint (model.pretrained), not trained from scratch.
_SDXL_TEXT_L = dict(PRESETS["sd15"]["text_encoder"], hidden_act="quick_gelu")
_SDXL_TEXT_G = {
    "architectures": ["CLIPTextModelWithProjection"], "vocab_size": 49408, "hidden_size": 1280,
    "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2, "projection_dim": 1280,
}
_SDXL_VAE = dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
PRESETS.update({
    "sdxl": {
        "text_encoder": _SDXL_TEXT_L, "text_encoder_2": _SDXL_TEXT_G, "vae": _SDXL_VAE,
        "unet": dict(_SD_UNET, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                     transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
                     sample_size=128, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
    },
    "sdxl_refiner": {
        "text_encoder_2": _SDXL_TEXT_G, "vae": _SDXL_VAE,
        "unet": dict(_SD_UNET, block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
                     transformer_layers_per_block=4, cross_attention_dim=1280, use_linear_projection=True,
                     sample_size=128, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2560,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
    },
})

# What a preset's model_index.json says beyond its components (the SD presets: nothing).
PIPELINE_OPTIONS: dict[str, dict] = {
    "sdxl": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
    "sdxl_refiner": {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
                     "force_zeros_for_empty_prompt": False},
}
