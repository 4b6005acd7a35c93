"""Tiny random-weight reference models (PyTorch diffusers/transformers), saved as diffusers folders.

Nothing is downloaded: weights are random, the tokenizer is a byte-level CLIP BPE vocabulary
built by sdjax.tokenizer.write_bpe_tokenizer. Torch's default init leaves norms at 1 and biases at 0, so every tensor gets extra
noise to make the parity tests sensitive to each parameter.
"""

from __future__ import annotations

import os

import torch

from sdjax.tokenizer import write_bpe_tokenizer


def write_tokenizer(folder: str, pad: str) -> int:
    """Saves a byte-level CLIPTokenizer with a few merges to `folder`; `pad` is "eos" (SD1) or "!"
    (SD2, id 0). Returns the vocab size."""
    merges = [("c", "i"), ("ci", "r"), ("e", "d</w>"), ("r", "ed</w>"), ("o", "n")]
    return len(write_bpe_tokenizer(folder, merges, pad))


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Adds N(0, scale) noise to every parameter, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def text_encoder(flavour: str, vocab_size: int, eos_id: int):
    """SD1 flavour: quick_gelu, legacy eos id 2 (argmax pooling). SD2: exact gelu, real eos id."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu" if flavour == "sd1" else "gelu",
        eos_token_id=2 if flavour == "sd1" else eos_id, bos_token_id=eos_id - 1, pad_token_id=0)
    return perturb_(CLIPTextModel(config), seed=1)


def vae():
    from diffusers import AutoencoderKL

    return perturb_(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32), seed=2)


def unet(flavour: str, in_channels: int = 4):
    """SD1 style: conv proj_in/out, heads per level. SD2 style: linear proj, head dim 64, upcast_attention.
    in_channels=9 makes an inpainting UNet (latents + mask + masked-image latents)."""
    from diffusers import UNet2DConditionModel

    common = dict(in_channels=in_channels, out_channels=4, sample_size=16, norm_num_groups=8, cross_attention_dim=32,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    if flavour == "sd1":
        model = UNet2DConditionModel(block_out_channels=(32, 48, 64), layers_per_block=(1, 2, 1),
                                     attention_head_dim=(4, 4, 8), transformer_layers_per_block=(1, 2, 1), **common)
    else:
        model = UNet2DConditionModel(block_out_channels=(64, 128, 128), layers_per_block=1,
                                     attention_head_dim=(1, 2, 2), use_linear_projection=True,
                                     upcast_attention=True, **common)
    return perturb_(model, seed=3)


def save_pipeline(folder: str, flavour: str, inpainting: bool = False) -> dict:
    """Builds and saves a tiny SD1- or SD2-style StableDiffusionPipeline (with a 9-channel UNet as a
    StableDiffusionInpaintPipeline if `inpainting`) in folder/flavour; returns its torch components."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(folder, "_tok")
    vocab_size = write_tokenizer(tok_dir, "eos" if flavour == "sd1" else "!")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    components = dict(
        text_encoder=text_encoder(flavour, vocab_size, tokenizer.eos_token_id), vae=vae(),
        unet=unet(flavour, 9 if inpainting else 4),
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False))
    pipeline_cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = pipeline_cls(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(folder, flavour))
    return components


def text_encoder_2(vocab_size: int, eos_id: int, hidden: int = 40, projection: int = 24):
    """SDXL's second text encoder in small: exact gelu, real eos id, a text projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", eos_token_id=eos_id, bos_token_id=eos_id - 1, pad_token_id=0,
        projection_dim=projection)
    return perturb_(CLIPTextModelWithProjection(config), seed=4)


SDXL_TIME_DIM = 8  # addition_time_embed_dim of the tiny SDXL UNets


def sdxl_unet(cross_attention_dim: int, pooled_dim: int, time_ids: int, layers_per_block=(1, 2, 1)):
    """SDXL style: no attention at the first level, several transformer layers deeper, linear proj, head
    dim 16, added conditioning (pooled text + `time_ids` sinusoidal time ids). An int `layers_per_block`
    (as the real checkpoints have) suits converters that take one for every level."""
    from diffusers import UNet2DConditionModel

    return perturb_(UNet2DConditionModel(
        in_channels=4, out_channels=4, sample_size=16, norm_num_groups=8, block_out_channels=(32, 64, 64),
        layers_per_block=layers_per_block, attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=cross_attention_dim, use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=pooled_dim + time_ids * SDXL_TIME_DIM), seed=5)


def save_sdxl_pipeline(folder: str, kind: str) -> dict:
    """Builds and saves a tiny SDXL base ("base": both text encoders, 6 time ids) or refiner ("refiner":
    text_encoder_2 only, 5 time ids with the aesthetic score) in folder/kind; returns its torch components."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    write_tokenizer(os.path.join(folder, "_tok"), "eos")
    vocab_size = write_tokenizer(os.path.join(folder, "_tok2"), "!")
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok2"))
    encoder_2 = text_encoder_2(vocab_size, tokenizer_2.eos_token_id)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    components = dict(vae=vae(), text_encoder_2=encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler)
    if kind == "base":
        encoder = text_encoder("sd1", vocab_size, tokenizer.eos_token_id)
        components.update(text_encoder=encoder, tokenizer=tokenizer,
                          unet=sdxl_unet(32 + 40, 24, time_ids=6))
        pipe = StableDiffusionXLPipeline(**components)
    else:
        components.update(text_encoder=None, tokenizer=None, unet=sdxl_unet(40, 24, time_ids=5))
        pipe = StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=True)
    pipe.save_pretrained(os.path.join(folder, kind))
    return components
