"""Full-size SD 1.5 / 2.1 / SDXL structure without allocating: parameter counts and the complete key mapping."""

import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

from sdjax.convert.diffusers import COMPONENTS
from sdjax.convert.state_dict import torch_key, torch_shape
from sdjax.models import abstract_params, count_params
from sdjax.models.presets import PRESETS

import flax

EXPECTED = {
    ("sd15", "unet"): 859_520_964, ("sd15", "vae"): 83_653_863, ("sd15", "text_encoder"): 123_060_480,
    ("sd21", "unet"): 865_910_724, ("sd21", "vae"): 83_653_863, ("sd21", "text_encoder"): 340_387_840,
    ("sdxl", "unet"): 2_567_463_684, ("sdxl", "text_encoder"): 123_060_480, ("sdxl", "text_encoder_2"): 694_659_840,
    ("sdxl", "vae"): 83_653_863, ("sdxl_refiner", "unet"): 2_259_526_660,
}
CONFIGS = PRESETS


def _module(preset: str, name: str):
    component = COMPONENTS[name]
    return component.module_cls(component.config_cls.from_dict(CONFIGS[preset][name], f"{preset}/{name}"))


@pytest.mark.parametrize("preset,name", sorted(EXPECTED))
def test_parameter_counts(preset, name):
    assert count_params(abstract_params(_module(preset, name))) == EXPECTED[(preset, name)]


def _reference_shapes(preset: str, name: str) -> dict[str, tuple]:
    """Key -> shape of the PyTorch reference, built on the meta device (no memory)."""
    config = {k: v for k, v in CONFIGS[preset][name].items() if not k.startswith("_") and k != "architectures"}
    with torch.device("meta"):
        if name == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel
            model = CLIPTextModel(CLIPTextConfig(**config))
        elif name == "text_encoder_2":
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection
            model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
        elif name == "vae":
            from diffusers import AutoencoderKL
            model = AutoencoderKL(**config)
        else:
            from diffusers import UNet2DConditionModel
            model = UNet2DConditionModel(**config)
    normalize = COMPONENTS[name].normalize_key
    return {normalize(k): tuple(v.shape) for k, v in model.state_dict().items() if normalize(k) is not None}


@pytest.mark.slow
@pytest.mark.parametrize("preset,name", sorted(EXPECTED))
def test_every_reference_key_maps_onto_our_tree(preset, name):
    ours = {torch_key(path): torch_shape(path, tuple(leaf.shape)) for path, leaf in
            flax.traverse_util.flatten_dict(abstract_params(_module(preset, name))).items()}
    reference = _reference_shapes(preset, name)
    assert sorted(set(reference) - set(ours)) == [], "reference keys we cannot hold"
    assert sorted(set(ours) - set(reference)) == [], "our keys the reference lacks"
    assert {k: ours[k] for k in reference} == reference
