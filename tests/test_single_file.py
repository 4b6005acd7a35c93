"""Single-file checkpoints (the original LDM layout): the key maps against diffusers' own LDM converters."""

import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

from sdjax.convert.ldm import VAE_CONV_ATTENTION, ldm_keys
from sdjax.models import UNetConfig, VAEConfig

_SD1 = dict(in_channels=4, out_channels=4, sample_size=16, norm_num_groups=8, cross_attention_dim=32,
            layers_per_block=2, block_out_channels=(32, 48, 64), attention_head_dim=(4, 4, 8),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
_SDXL = dict(_SD1, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
             transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
             addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8, cross_attention_dim=72)
# diffusers' LDM converter takes one layers_per_block for every level, as the original checkpoints have.
UNETS = {"sd1": _SD1, "sd2": dict(_SD1, use_linear_projection=True, layers_per_block=1), "sdxl": _SDXL,
         "inpainting": dict(_SD1, in_channels=9)}


@pytest.mark.parametrize("name", sorted(UNETS))
def test_unet_keys_are_the_inverse_of_diffusers_ldm_conversion(name):
    """Our diffusers -> LDM renaming, fed to diffusers' LDM -> diffusers converter, gives back every tensor
    under its own name: the two layouts are mapped one to one."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(**UNETS[name])
    state = unet.state_dict()
    mapping = ldm_keys("unet", UNetConfig.from_dict(dict(unet.config)), state.keys())
    assert len(set(mapping.values())) == len(state)
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + mapping[k]: v for k, v in state.items()},
                                       dict(unet.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_vae_keys_are_the_inverse_of_diffusers_ldm_conversion():
    """The same for the VAE, whose mid-block attention the LDM layout stores as 1x1 convolutions."""
    import builders
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = builders.vae()
    state = vae.state_dict()
    mapping = ldm_keys("vae", VAEConfig.from_dict(dict(vae.config)), state.keys())
    ldm = {}
    for key, value in state.items():
        name = "first_stage_model." + mapping[key]
        ldm[name] = value[:, :, None, None] if VAE_CONV_ATTENTION.search(name) else value
    assert sum(bool(VAE_CONV_ATTENTION.search(k)) for k in ldm) == 8  # q, k, v, proj_out of two mid blocks
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k].reshape(state[k].shape), state[k]) for k in state)
