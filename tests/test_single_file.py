"""Single-file checkpoints (the original LDM layout): key maps against diffusers' own LDM converters, and exports
that diffusers' from_single_file reads back bitwise."""

import os

import jax
import numpy as np
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


def _state_dicts_equal(ours, theirs) -> None:
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


# Tiny folder -> (pipeline class, the UNet config it gets: one layers_per_block for every level, which
# diffusers' LDM converter needs).
FAMILIES = {"sd1": ("StableDiffusionPipeline", UNETS["sd1"]), "sd2": ("StableDiffusionPipeline", UNETS["sd2"]),
            "inpainting": ("StableDiffusionInpaintPipeline", UNETS["inpainting"]),
            "sdxl": ("StableDiffusionXLPipeline", _SDXL),
            "refiner": ("StableDiffusionXLImg2ImgPipeline",
                        dict(_SDXL, cross_attention_dim=40, projection_class_embeddings_input_dim=24 + 5 * 8))}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_file_export_loads_in_diffusers_as_the_same_model(family, checkpoints, sdxl_checkpoints,
                                                                 inpaint_checkpoint, tmp_path):
    """sd.save(path, layout="single_file") writes the original layout of each family; diffusers'
    from_single_file (its own converters, configs from the folder) reads every network back bitwise, and
    so does sdjax.load(path, config=folder)."""
    import diffusers
    from diffusers import UNet2DConditionModel

    import sdjax
    from sdjax.convert.safetensors_io import read_safetensors

    cls_name, unet_config = FAMILIES[family]
    source = {**{k: v[0] for k, v in checkpoints.items()}, "sdxl": sdxl_checkpoints["base"][0],
              "refiner": sdxl_checkpoints["refiner"][0], "inpainting": inpaint_checkpoint}[family]
    cls = getattr(diffusers, cls_name)
    pipe = cls.from_pretrained(source)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**unet_config)
    folder = str(tmp_path / family)
    pipe.save_pretrained(folder)
    sd = sdjax.load(folder)
    path = tmp_path / "model.safetensors"
    sd.save(str(path), layout="single_file")
    loaded = cls.from_single_file(str(path), config=folder, local_files_only=True)
    for name in sd.params:
        _state_dicts_equal(getattr(loaded, name), getattr(pipe, name))
    back = sdjax.load(str(path), config=folder)
    for name in sd.params:
        _tree_equal(back.params[name], sd.params[name])
    tensors = read_safetensors(str(path))
    assert tensors["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # stored as a 1x1 conv
    prefixes = {".".join(k.split(".")[:3]) if k.startswith("conditioner") else k.split(".")[0] for k in tensors}
    assert prefixes == {"sd1": {"model", "first_stage_model", "cond_stage_model"},
                        "sd2": {"model", "first_stage_model", "cond_stage_model"},
                        "inpainting": {"model", "first_stage_model", "cond_stage_model"},
                        "sdxl": {"model", "first_stage_model", "conditioner.embedders.0", "conditioner.embedders.1"},
                        "refiner": {"model", "first_stage_model", "conditioner.embedders.0"}}[family]
    if family not in ("sd1", "inpainting"):  # OpenCLIP: fused q/k/v
        fused = [k for k in tensors if k.endswith("transformer.resblocks.0.attn.in_proj_weight")]
        assert len(fused) == 1 and tensors[fused[0]].shape[0] == 3 * tensors[fused[0]].shape[1]
    half = tmp_path / "half.safetensors"
    sd.save(str(half), dtype=np.float16, layout="single_file")
    assert {str(v.dtype) for v in read_safetensors(str(half)).values()} == {"float16"}
    with pytest.raises(sdjax.CheckpointError, match="already exists"):
        sd.save(str(path), layout="single_file")


def test_single_file_export_refuses_bad_layouts_and_paths(checkpoints, tmp_path):
    import sdjax

    sd = sdjax.load(checkpoints["sd1"][0])
    with pytest.raises(ValueError, match="layout: expected one of diffusers, single_file, got 'ckpt'"):
        sd.save(str(tmp_path / "y"), layout="ckpt")
    with pytest.raises(sdjax.CheckpointError, match="is a .safetensors file"):
        sd.save(str(tmp_path / "z.ckpt"), layout="single_file")
    assert os.listdir(tmp_path) == []  # nothing written


def _tree_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """The tiny sd1 model, its single-file export's tensors and the folder that configures it."""
    import sdjax
    from sdjax.convert.safetensors_io import read_safetensors

    folder = checkpoints["sd1"][0]
    sd = sdjax.load(folder)
    path = str(tmp_path_factory.mktemp("single") / "sd1.safetensors")
    sd.save(path, layout="single_file")
    return sd, folder, {k: np.array(v) for k, v in read_safetensors(path).items()}


def _write(tmp_path, tensors, name="model.safetensors") -> str:
    from sdjax.convert.safetensors_io import write_safetensors

    path = str(tmp_path / name)
    write_safetensors(path, tensors)
    return path


def test_single_file_with_ema_buffers_and_old_text_keys(exported, tmp_path):
    """What files in the wild hold beside the weights: the UNet's EMA copy (dots dropped from its keys),
    schedule buffers, the EMA's counters and CLIP's position ids, text keys without "text_model." (old
    transformers). The non-EMA weights are the default; ema=True takes the EMA copy."""
    import sdjax
    from sdjax.convert.single_file import SCHEDULE_BUFFERS, ema_key

    sd, folder, tensors = exported
    wild = {}
    for key, value in tensors.items():
        wild[key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")] = value
        if key.startswith("model.diffusion_model."):
            wild[ema_key(key)] = value + 1
    wild.update({name: np.linspace(0, 1, 1000, dtype=np.float32) for name in SCHEDULE_BUFFERS})
    wild.update({"model_ema.decay": np.float32(0.9999).reshape(()), "model_ema.num_updates": np.int32(7).reshape(()),
                 "cond_stage_model.transformer.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]})
    path = _write(tmp_path, wild)
    plain = sdjax.load(path, config=folder)
    _tree_equal(plain.params, sd.params)
    ema = sdjax.load(path, config=folder, ema=True)
    _tree_equal(ema.params["unet"], jax.tree.map(lambda p: p + 1, sd.params["unet"]))
    _tree_equal(ema.params["vae"], sd.params["vae"])


def test_bad_single_files_are_one_line_errors_naming_the_key(exported, tmp_path):
    import sdjax

    sd, folder, tensors = exported
    cases = [
        (dict(tensors, **{"model.diffusion_model.extra.weight": np.zeros(1, np.float32)}),
         "unexpected tensor(s) 'model.diffusion_model.extra.weight'"),
        ({k: v for k, v in tensors.items() if k != "model.diffusion_model.out.2.weight"},
         "missing tensor(s) 'model.diffusion_model.out.2.weight'"),
        (dict(tensors, **{"model.diffusion_model.out.2.weight": np.zeros((4, 32, 1, 1), np.float32)}),
         "tensor 'model.diffusion_model.out.2.weight' has shape (4, 32, 1, 1), which does not hold the "
         "(4, 32, 3, 3) of unet's 'conv_out.weight'"),
        (dict(tensors, **{"conditioner.embedders.1.model.ln_final.weight": np.zeros(4, np.float32)}),
         "unexpected tensor(s) 'conditioner.embedders.1.model.ln_final.weight'"),
    ]
    for i, (file_tensors, message) in enumerate(cases):
        path = _write(tmp_path, file_tensors, f"bad{i}.safetensors")
        with pytest.raises(sdjax.CheckpointError) as error:
            sdjax.load(path, config=folder)
        assert message in str(error.value) and "\n" not in str(error.value), (message, str(error.value))
    good = _write(tmp_path, tensors, "good.safetensors")
    with pytest.raises(sdjax.CheckpointError, match="ema=True, but the file holds no EMA weights"):
        sdjax.load(good, config=folder, ema=True)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(sdjax.CheckpointError, match="pickle weights are not read by default"):
        sdjax.load(str(ckpt), config=folder)


def test_sd2_files_keep_the_24th_block_and_projection_that_sd2_never_runs(checkpoints, tmp_path):
    """An original SD 2.x file holds one OpenCLIP block more than the text encoder SD 2.x runs (it takes
    the penultimate layer), a text_projection and logit_scale: read past, exactly those."""
    import sdjax
    from sdjax.convert.safetensors_io import read_safetensors

    folder = checkpoints["sd2"][0]
    sd = sdjax.load(folder)
    path = str(tmp_path / "sd2.safetensors")
    sd.save(path, layout="single_file")
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    layers = sd.model.networks["text_encoder"].config.num_hidden_layers
    prefix = "cond_stage_model.model."
    extra = {k.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}."): v for k, v in tensors.items()
             if k.startswith(f"{prefix}transformer.resblocks.{layers - 1}.")}
    width = tensors[f"{prefix}ln_final.weight"].shape[0]
    extra.update({f"{prefix}text_projection": np.ones((width, width), np.float32),
                  f"{prefix}logit_scale": np.float32(4.6).reshape(())})
    original = _write(tmp_path, {**tensors, **extra}, "original.safetensors")
    _tree_equal(sdjax.load(original, config=folder).params, sd.params)
    with pytest.raises(sdjax.CheckpointError, match=r"unexpected tensor\(s\) 'cond_stage_model.model.extra'"):
        sdjax.load(_write(tmp_path, {**tensors, f"{prefix}extra": np.zeros(1, np.float32)}, "x.safetensors"),
                   config=folder)


# (family, UNet input channels, prediction type) -> what diffusers' infer_diffusers_model_type calls it.
FULL_SIZE = {("sd1", 4, "epsilon"): "v1", ("sd1", 9, "epsilon"): "inpainting", ("sd2", 4, "v_prediction"): "v2",
             ("sd2", 9, "epsilon"): "inpainting_v2", ("sdxl", 4, "epsilon"): "xl_base",
             ("sdxl", 9, "epsilon"): "xl_inpaint", ("sdxl_refiner", 4, "epsilon"): "xl_refiner"}


@pytest.mark.slow
@pytest.mark.parametrize("family,channels,prediction", sorted(FULL_SIZE))
def test_shipped_families_at_full_size_are_what_diffusers_reads(family, channels, prediction):
    """For each family sdjax ships, the full-size file layout it reads and writes (keys and shapes, as
    meta tensors: nothing allocated) is detected back as that family, diffusers calls it the same model
    type, and diffusers' own LDM converters turn its UNet and VAE into exactly the keys and shapes of
    diffusers' full-size networks built from the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     infer_diffusers_model_type)

    from sdjax.convert.families import describe, detect
    from sdjax.convert.single_file import single_file_shapes
    from sdjax.models.presets import preset

    description = describe(family, channels, prediction)
    checkpoint = {k: torch.empty(shape, device="meta") for k, shape in single_file_shapes(description.configs).items()}
    assert detect("file", checkpoint) == (family, channels)
    assert infer_diffusers_model_type(checkpoint) == FULL_SIZE[family, channels, prediction]
    raw = preset({"sd1": "sd15", "sd2": "sd21"}.get(family, family))
    unet_config = dict(raw["unet"], in_channels=channels)
    unet_config.pop("_class_name")
    for convert, cls, config in ((convert_ldm_unet_checkpoint, UNet2DConditionModel, unet_config),
                                 (convert_ldm_vae_checkpoint, AutoencoderKL,
                                  {k: v for k, v in raw["vae"].items() if k != "_class_name"})):
        with torch.device("meta"):
            reference = cls(**config).state_dict()
        converted = convert(checkpoint, config)
        assert set(converted) == set(reference)
        # (diffusers' VAE converter may leave attention as 1x1 convs; its model loader squeezes them)
        assert all(tuple(converted[k].shape) in (tuple(reference[k].shape), (*reference[k].shape, 1, 1))
                   for k in reference)
    assert description.scheduler_config["prediction_type"] == prediction
    assert set(description.tokenizers) == {n.replace("text_encoder", "tokenizer") for n in description.configs
                                           if n.startswith("text_encoder")}


def test_shipped_clip_tokenizer_gives_clips_ids():
    """The CLIP vocabulary shipped for single files: CLIP's 49,408 tokens and its well-known ids, padded with
    the end token (OpenAI CLIP) or "!" = 0 (OpenCLIP)."""
    from sdjax.tokenizer import clip_tokenizer, tokenize

    eos, bang = clip_tokenizer("eos"), clip_tokenizer("!")
    assert len(eos) == len(bang) == 49408
    np.testing.assert_array_equal(tokenize(eos, ["a photo of a cat"], 9)[0],
                                  [49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407])
    np.testing.assert_array_equal(tokenize(bang, ["a photo of a cat"], 9)[0],
                                  [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0])


def test_single_file_families_are_told_apart_and_unknown_files_refused(tmp_path):
    """detect() on key/shape tables: the first signature key decides the family, the UNet's input
    convolution the channels; files of no known family, without a UNet, of unsupported input channels or of
    a refused model are one-line errors naming what was looked for."""
    import sdjax
    from sdjax.convert.families import SIGNATURES, describe_file, detect

    conv = "model.diffusion_model.input_blocks.0.0.weight"
    shape = lambda *s: np.broadcast_to(np.float32(0), s)
    for family, key in SIGNATURES:
        assert detect("f", {key: shape(4), conv: shape(320, 4, 3, 3)}) == (family, 4)
    sd2 = {SIGNATURES[2][1]: shape(4), conv: shape(320, 4, 3, 3)}
    assert describe_file("f", sd2).scheduler_config["prediction_type"] == "v_prediction"  # SD 2.x default
    assert describe_file("f", sd2, "epsilon").configs["unet"].sample_size == 64  # SD 2 base: 512²
    marked = describe_file("f", {SIGNATURES[3][1]: shape(4), conv: shape(320, 4, 3, 3), "v_pred": shape(0),
                                 "ztsnr": shape(0)})
    assert marked.scheduler_config["prediction_type"] == "v_prediction"
    assert marked.scheduler_config["rescale_betas_zero_snr"]
    assert marked.scheduler_config["timestep_spacing"] == "trailing"
    cases = [({"model.diffusion_model.out.2.weight": shape(4)}, "holds none of the keys that tell the families "
              "apart (conditioner.embedders.1.model.ln_final.weight, "),
             ({SIGNATURES[3][1]: shape(4)}, "sd1 text encoder found but no UNet (no tensor "
              "'model.diffusion_model.input_blocks.0.0.weight')"),
             ({SIGNATURES[3][1]: shape(4), conv: shape(320, 8, 3, 3)}, "has shape (320, 8, 3, 3): a UNet of 8 input "
              "channels; sdjax reads sd1 files with 4 or 9"),
             ({SIGNATURES[1][1]: shape(4), conv: shape(384, 9, 3, 3)}, "sdjax reads sdxl_refiner files with 4"),
             ({SIGNATURES[0][1]: shape(4), conv: shape(320, 4, 3, 3), "edm_mean": shape(4)},
              "a Playground v2.5 (an EDM model with SDXL's networks) checkpoint, which sdjax does not run")]
    for tensors, message in cases:
        with pytest.raises(sdjax.CheckpointError) as error:
            detect("f.safetensors", tensors)
        assert str(error.value).startswith("f.safetensors: ") and message in str(error.value), str(error.value)
    with pytest.raises(ValueError, match="prediction_type: expected one of epsilon, v_prediction, got 'v'"):
        describe_file("f", sd2, "v")


@pytest.mark.slow
def test_full_size_sd15_file_loads_and_samples_without_a_config_folder(tmp_path):
    """A full-size SD 1.5 single file (float16, random weights, schedule buffers and position ids as real files
    have them) loads with no config folder: detected as SD 1.x, the shipped configs fit every tensor, the
    weights read are the file's bitwise, and sample.py draws from it with the shipped tokenizer and scheduler."""
    import jax.numpy as jnp

    import sdjax
    from sdjax.convert.families import describe
    from sdjax.convert.safetensors_io import read_safetensors, write_safetensors
    from sdjax.convert.single_file import SCHEDULE_BUFFERS, single_file_shapes, single_file_state
    from sdjax.png_info import parse_parameters, read_parameters

    shapes = single_file_shapes(describe("sd1", 4, "epsilon").configs)
    pool = (np.random.default_rng(0).standard_normal(1 << 20) * 0.05).astype(np.float16)
    tensors = {key: np.resize(pool[i % 1000:], shape) for i, (key, shape) in enumerate(shapes.items())}
    tensors.update({name: np.linspace(1, 0, 1000, dtype=np.float32) for name in SCHEDULE_BUFFERS})
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    path = str(tmp_path / "sd15-like.safetensors")
    write_safetensors(path, tensors)
    del tensors
    sd = sdjax.load(path, param_dtype=jnp.float16, to_device=False)
    assert sd.model.scheduler_config["_class_name"] == "PNDMScheduler"
    assert len(sd.model.tokenizers["tokenizer"]) == 49408
    stored = read_safetensors(path)
    state = single_file_state(sd.model.configs, sd.params)
    assert set(state) == set(stored) - set(SCHEDULE_BUFFERS) - {"cond_stage_model.transformer.text_model."
                                                                 "embeddings.position_ids"}
    for key, value in state.items():
        np.testing.assert_array_equal(value, stored[key], err_msg=key)
    del sd, state, stored
    out = tmp_path / "out"
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "sample.py"), "--model", path, "--prompt",
                             "a photo of a cat", "--steps", "2", "--size", "64", "--num-images", "1",
                             "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    _, _, parameters = parse_parameters(read_parameters(str(out / "00000-0.png")))
    assert parameters["Model"] == "sd15-like" and parameters["Sampler"] == "PLMS"  # A1111's name for PNDM
