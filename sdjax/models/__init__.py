"""The three networks of Stable Diffusion as Flax linen modules, configured from diffusers/transformers configs.

Logical axis names used on parameters (mapped onto mesh axes by a rules table):
  embed, embed_out  channel width of token/time features      heads    attention projections
  mlp               feed-forward hidden width                 vocab    token embedding rows
  conv_in, conv_out convolution input/output channels         norm     norm scales and biases
"""

from sdjax.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdjax.models.params import abstract_params, count_params, init_params, logical_axes
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "CLIPTextConfig", "CLIPTextModel", "UNetConfig", "UNet2DConditionModel", "VAEConfig", "AutoencoderKL",
    "abstract_params", "count_params", "init_params", "logical_axes",
]
