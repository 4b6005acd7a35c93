"""The original (CompVis / Stability "LDM") key layout of single-file checkpoints, as a renaming of the
diffusers keys of each network.

A network's map is built from its own config (levels, layers per level, which levels attend), so one
function serves SD 1.x, 2.x and SDXL alike:

    UNet  conv_in -> input_blocks.0.0, down_blocks.i.resnets.j -> input_blocks.k.0 (+ .1 its attention),
          down_blocks.i.downsamplers.0.conv -> input_blocks.k.0.op, mid_block -> middle_block.0/1/2,
          up_blocks.i.* -> output_blocks.k.*, time / added embeddings -> time_embed / label_emb,
          conv_norm_out / conv_out -> out.0 / out.2; inside a resnet norm1 -> in_layers.0, conv1 ->
          in_layers.2, time_emb_proj -> emb_layers.1, norm2 -> out_layers.0, conv2 -> out_layers.3,
          conv_shortcut -> skip_connection. Attention blocks keep their names.
    VAE   down_blocks.i.resnets.j -> down.i.block.j, up_blocks.i -> up.(L-1-i) (the decoder's levels are
          numbered from the bottom), mid_block -> mid.block_1 / attn_1 / block_2, conv_norm_out ->
          norm_out, conv_shortcut -> nin_shortcut; attention group_norm / to_q / to_k / to_v / to_out.0 ->
          norm / q / k / v / proj_out, stored as 1x1 convolutions.
    CLIP  (SD 1.x, SDXL's first encoder) transformers' own keys under a prefix.

`ldm_keys(kind, config, keys)` maps every diffusers key of a network to its LDM key; the reader inverts it,
so a file is read strictly (every tensor of the network used, every parameter found).
"""

from __future__ import annotations

import re
from typing import Iterable

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# VAE attention projections the LDM layout stores as (C, C, 1, 1) convolutions.
VAE_CONV_ATTENTION = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _attends(block_types: Iterable[str]) -> list[bool]:
    return [name.startswith("CrossAttn") for name in block_types]


def unet_modules(config) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix of a UNet (sdjax.models.UNetConfig)."""
    levels = len(config.block_out_channels)
    layers = list(config.layers_per_block)
    modules = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
               "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
               "mid_block.resnets.1": "middle_block.2"}
    if config.addition_embed_type == "text_time":
        modules.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    index = 1
    for level, attends in enumerate(_attends(config.down_block_types)):
        for j in range(layers[level]):
            modules[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{index}.0"
            if attends:
                modules[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    for level, attends in enumerate(_attends(config.up_block_types)):
        count = layers[levels - 1 - level] + 1
        for j in range(count):
            modules[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attends:
                modules[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == count - 1 and level < levels - 1:
                modules[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attends else 1}.conv"
            index += 1
    return modules


def vae_modules(config) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix of a VAE (sdjax.models.VAEConfig)."""
    levels = len(config.block_out_channels)
    modules = {}
    for part in ("encoder", "decoder"):
        modules.update({f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
                        f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1",
                        f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
                        f"{part}.conv_norm_out": f"{part}.norm_out"})
    for level in range(levels):
        for j in range(config.layers_per_block):
            modules[f"encoder.down_blocks.{level}.resnets.{j}"] = f"encoder.down.{level}.block.{j}"
        if level < levels - 1:
            modules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
        up = levels - 1 - level
        for j in range(config.layers_per_block + 1):
            modules[f"decoder.up_blocks.{level}.resnets.{j}"] = f"decoder.up.{up}.block.{j}"
        if level < levels - 1:
            modules[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    return modules


def _rename(key: str, modules: dict[str, str], inner: dict[str, dict[str, str]]) -> str:
    """`key` with its longest module prefix in `modules` replaced, and the names inside that module renamed
    by inner[kind] where the module is of that kind (its diffusers prefix contains the kind)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules:
            rest = ".".join(parts[cut:])
            for kind, names in inner.items():
                if f".{kind}." in f".{prefix}.":
                    for old, new in names.items():
                        if rest.startswith(old + "."):
                            rest = new + rest[len(old):]
                            break
            return f"{modules[prefix]}.{rest}"
    return key  # a key outside the listed modules keeps its name (attention internals, quant_conv, ...)


def ldm_keys(kind: str, config, keys: Iterable[str]) -> dict[str, str]:
    """diffusers key -> LDM key (without the file's component prefix) of each of `keys`, the diffusers
    state-dict keys of network `kind` ("unet", "vae", or a CLIP text encoder) with this config."""
    if kind == "unet":
        modules, inner = unet_modules(config), {"resnets": _UNET_RESNET}
    elif kind == "vae":
        modules, inner = vae_modules(config), {"resnets": _VAE_RESNET, "attentions": _VAE_ATTENTION}
    else:
        return {key: key for key in keys}
    return {key: _rename(key, modules, inner) for key in keys}
