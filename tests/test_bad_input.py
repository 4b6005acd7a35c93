"""Broken checkpoints and configs fail with one clear error naming the file and the problem."""

import json
import os
import shutil

import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

import sdjax
from sdjax import CheckpointError
from sdjax.convert.safetensors_io import read_safetensors, write_safetensors


@pytest.fixture
def copy(checkpoints, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(checkpoints["sd1"][0], folder)
    return folder


def _edit_json(path, **changes):
    with open(path) as f:
        value = json.load(f)
    value.update(changes)
    with open(path, "w") as f:
        json.dump(value, f)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json not found"):
        sdjax.load(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a directory"):
        sdjax.load(str(tmp_path / "nowhere"))


def test_missing_component(copy):
    shutil.rmtree(os.path.join(copy, "vae"))
    with pytest.raises(CheckpointError, match=r"vae: component folder not found"):
        sdjax.load(copy)


def test_missing_component_in_index(copy):
    _edit_json(os.path.join(copy, "model_index.json"), unet=[None, None])
    with pytest.raises(CheckpointError, match=r"model_index.json: component 'unet' is missing"):
        sdjax.load(copy)


def test_unknown_pipeline_or_component_class(copy):
    index = os.path.join(copy, "model_index.json")
    _edit_json(index, _class_name="KandinskyPipeline")
    with pytest.raises(CheckpointError, match=r"model_index.json: pipeline 'KandinskyPipeline' is not one sdjax "
                                              r"reads \(known: StableDiffusionPipeline, "):
        sdjax.load(copy)
    _edit_json(index, _class_name="StableDiffusionPipeline", text_encoder=["transformers", "T5EncoderModel"])
    with pytest.raises(CheckpointError, match=r"component 'text_encoder' has class 'T5EncoderModel'; sdjax reads "
                                              r"CLIPTextModel"):
        sdjax.load(copy)


def test_loaded_model_is_immutable(copy):
    """Sharding gives a new StableDiffusion; the Model's mappings cannot be changed in place."""
    import dataclasses

    from sdjax import parallel

    sd = sdjax.load(copy)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sd.params = {}
    with pytest.raises(TypeError):
        sd.model.networks["unet"] = None
    with pytest.raises(TypeError):
        sd.model.scheduler_config["prediction_type"] = "v_prediction"
    mesh = parallel.make_mesh(parallel.mesh_config())
    sharded = sd.shard(mesh)
    assert sharded is not sd and sharded.mesh is mesh and sd.mesh is None and sharded.model is sd.model
    remat = sd.model.with_networks(unet=sd.model.unet.clone(remat=True))
    assert remat.unet.remat and not sd.model.unet.remat
    with pytest.raises(ValueError, match="no network named text_encoder_2"):
        sd.model.with_networks(text_encoder_2=sd.model.unet)


def test_truncated_safetensors(copy):
    path = os.path.join(copy, "unet", "diffusion_pytorch_model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: truncated safetensors file: "
                                              r"tensor '.*' ends at byte"):
        sdjax.load(copy)


def test_corrupt_safetensors_header(copy):
    path = os.path.join(copy, "vae", "diffusion_pytorch_model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors: corrupt safetensors header"):
        sdjax.load(copy)


def test_unknown_block_type(copy):
    _edit_json(os.path.join(copy, "unet", "config.json"), down_block_types=["CrossAttnDownBlock2D", "FancyBlock", "DownBlock2D"])
    with pytest.raises(CheckpointError, match=r"unet/config.json: down_block_types has unknown block type 'FancyBlock'"):
        sdjax.load(copy)


def test_unknown_activation(copy):
    _edit_json(os.path.join(copy, "text_encoder", "config.json"), hidden_act="swishy")
    with pytest.raises(CheckpointError, match=r"text_encoder/config.json: hidden_act: unknown activation 'swishy'"):
        sdjax.load(copy)


def test_unsupported_option_is_not_ignored(copy):
    _edit_json(os.path.join(copy, "unet", "config.json"), class_embed_type="timestep")
    with pytest.raises(CheckpointError, match=r"unet/config.json: class_embed_type='timestep' is not supported"):
        sdjax.load(copy)


def test_shape_mismatch_names_key_and_shapes(copy):
    _edit_json(os.path.join(copy, "unet", "config.json"), cross_attention_dim=64)
    with pytest.raises(CheckpointError, match=r"tensor 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight' "
                                              r"has shape \(32, 32\); the model config expects \(32, 64\)"):
        sdjax.load(copy)


def test_unexpected_and_missing_tensors(copy):
    path = os.path.join(copy, "vae", "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    tensors["extra.weight"] = np.zeros(3, np.float32)
    write_safetensors(path, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) 'extra.weight'"):
        sdjax.load(copy)
    del tensors["extra.weight"], tensors["decoder.conv_out.bias"]
    write_safetensors(path, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) 'decoder.conv_out.bias'"):
        sdjax.load(copy)


def test_pickle_needs_opt_in(copy):
    path = os.path.join(copy, "vae", "diffusion_pytorch_model.safetensors")
    state = {k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(path).items()}
    os.remove(path)
    torch.save(state, os.path.join(copy, "vae", "diffusion_pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin: pickle weights are not read by default.*allow_pickle=True"):
        sdjax.load(copy)
    sd = sdjax.load(copy, allow_pickle=True)
    np.testing.assert_array_equal(sd.params["vae"]["decoder"]["conv_out"]["bias"], state["decoder.conv_out.bias"].numpy())


def test_safetensors_roundtrip_bfloat16(tmp_path):
    import ml_dtypes

    path = str(tmp_path / "t.safetensors")
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16),
               "b": np.array([1, 2], np.int64), "empty": np.zeros((0, 4), np.float16)}
    write_safetensors(path, tensors)
    back = read_safetensors(path)
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and back[k].shape == tensors[k].shape
        np.testing.assert_array_equal(back[k], tensors[k])
    from safetensors.torch import load_file  # the reference reader agrees
    assert torch.equal(load_file(path)["a"], torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))
