"""Sharding over meshes: partition specs by rule, and the same training and sampling results on one
device and on 8 (XLA's forced host devices) under data, fsdp and tensor parallelism."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sdjax import parallel
from sdjax.models import UNet2DConditionModel, UNetConfig, CLIPTextModel, CLIPTextConfig, AutoencoderKL, VAEConfig
from sdjax.models.params import abstract_params, logical_axes
from sdjax.models.presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(**sizes):
    """Only the axis sizes matter to spec_for."""
    return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1} | sizes)


def _spec(module, path, mesh):
    logical, shapes = logical_axes(module), abstract_params(module)
    for key in path:
        logical, shapes = logical[key], shapes[key]
    return parallel.spec_for(logical, shapes.shape, mesh, parallel.DEFAULT_RULES)


@pytest.fixture(scope="module")
def sd15():
    preset = PRESETS["sd15"]
    return (UNet2DConditionModel(UNetConfig.from_dict(preset["unet"])),
            AutoencoderKL(VAEConfig.from_dict(preset["vae"])),
            CLIPTextModel(CLIPTextConfig.from_dict(preset["text_encoder"])))


@pytest.mark.compat
def test_partition_specs_of_full_size_weights(sd15):
    unet, vae, clip = sd15
    attn = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1")
    fsdp, tensor = _mesh(fsdp=8), _mesh(tensor=4)
    assert _spec(unet, ("down_blocks_0", "resnets_0", "conv1", "kernel"), fsdp) == P(None, None, None, "fsdp")
    assert _spec(unet, attn + ("to_q", "kernel"), fsdp) == P("fsdp", None)
    assert _spec(unet, attn + ("to_q", "kernel"), tensor) == P(None, "tensor")
    assert _spec(unet, attn + ("to_out_0", "kernel"), tensor) == P("tensor", None)
    ff = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "ff")
    assert _spec(unet, ff + ("net_0", "proj", "kernel"), _mesh(fsdp=2, tensor=2)) == P("fsdp", "tensor")
    assert _spec(unet, ("down_blocks_0", "resnets_0", "norm1", "scale"), fsdp) == P(None)  # replicated
    assert _spec(vae, ("decoder", "conv_out", "kernel"), fsdp) == P(None, None, None, None)  # 3 RGB channels
    assert _spec(vae, ("encoder", "conv_in", "kernel"), fsdp) == P(None, None, None, "fsdp")
    layer = ("text_model", "encoder", "layers_0") if "text_model" in logical_axes(clip) else ("encoder", "layers_0")
    assert _spec(clip, layer + ("mlp", "fc1", "kernel"), tensor) == P(None, "tensor")
    assert _spec(clip, layer + ("self_attn", "q_proj", "kernel"), fsdp) == P("fsdp", None)


@pytest.mark.compat
def test_mesh_and_rule_errors():
    cfg = parallel.mesh_config()
    cfg.data, cfg.fsdp = 3, 1
    with pytest.raises(ValueError, match="do not divide the 1 devices"):
        parallel.make_mesh(cfg)
    cfg.data, cfg.fsdp = -1, -1
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        parallel.make_mesh(cfg)
    with pytest.raises(ValueError, match="'heads' -> 'model': unknown mesh axis"):
        parallel.check_rules((("batch", "data"), ("heads", "model")))


def _run(*args, devices=8, **env):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets"))


def _train(workdir, data_dir, devices, *mesh):
    result = _run(os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
                  "--config.total_steps=3", "--config.batch_size=8", "--config.log.every_steps=1",
                  "--config.log.progress_bar=False", "--config.log.preview_every_steps=0",
                  "--config.export.at_end=False", *mesh, devices=devices, SDJAX_DATA_DIR=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "logs", "metrics.jsonl")) as f:
        losses = [m["loss"] for m in map(json.loads, f) if "loss" in m]  # vae / clip runs end with eval scores
    import jax

    from sdjax.train.checkpoint import read_state

    return losses, [np.asarray(x) for x in jax.tree.leaves(read_state(workdir, 3)["params"])]


MESHES = {"data8": ["--config.mesh.data=8"],
          "fsdp8": ["--config.mesh.data=1", "--config.mesh.fsdp=8"],
          "d2f2t2": ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]}


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, data_dir):
    return _train(str(tmp_path_factory.mktemp("one")), data_dir, 1)


# Pure data parallelism is in d2f2t2's data axis, the contrastive test's data8 and the two-process run;
# a data8 case here would add 4 minutes of CI for no path the others leave out.
@pytest.mark.parametrize("name", ["d2f2t2", "fsdp8"])
def test_three_train_steps_match_one_device(tmp_path, data_dir, single_device_run, name):
    ref_losses, ref_params = single_device_run
    losses, params = _train(str(tmp_path), data_dir, 8, *MESHES[name])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(params, ref_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.fixture(scope="module")
def single_device_clip_run(tmp_path_factory, data_dir):
    return _train(str(tmp_path_factory.mktemp("clip_one")), data_dir, 1, "--config.task=clip")


@pytest.mark.parametrize("name", ["data8", "fsdp8"])
def test_contrastive_loss_spans_the_whole_sharded_batch(tmp_path, data_dir, single_device_clip_run, name):
    """With 8 examples on 8 devices, each device holds one pair: a per-device loss would be 0, the
    global one (every image against all 8 captions) is ~log 8 at the start and equals one device's."""
    ref_losses, ref_params = single_device_clip_run
    losses, params = _train(str(tmp_path), data_dir, 8, "--config.task=clip", *MESHES[name])
    assert losses[0] > 1.0
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(params, ref_params):
        # Attention key biases have an exactly zero gradient (softmax ignores a shift shared by all
        # keys); Adam turns its rounding noise into +-lr steps of either sign, so such leaves, still
        # within a few lr-sized steps of their zero init, are compared at that scale.
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale if scale > 1e-3 else 5e-5)


def test_sampling_matches_one_device(tmp_path, checkpoints):
    folder, _ = checkpoints["sd1"]
    script = tmp_path / "sample.py"
    script.write_text(
        "import sys, numpy as np, jax, sdjax\n"
        "from sdjax import parallel\n"
        "sd = sdjax.load(sys.argv[1])\n"
        "if jax.device_count() > 1:\n"
        "    c = parallel.mesh_config(); c.data = 4; c.fsdp = 2\n"
        "    sd = sd.shard(parallel.make_mesh(c))\n"
        "    assert sd.params['unet']['conv_in']['kernel'].sharding.spec[-1] == 'fsdp'\n"
        "imgs = sd.generate([f'prompt {i}' for i in range(8)], num_steps=3, scheduler='euler_ancestral',\n"
        "                   height=32, width=32, seed=3)\n"
        "np.save(sys.argv[2], imgs)\n")
    for devices in (1, 8):
        result = _run(str(script), folder, str(tmp_path / f"{devices}.npy"), devices=devices)
        assert result.returncode == 0, result.stderr[-3000:]
    one, eight = np.load(tmp_path / "1.npy"), np.load(tmp_path / "8.npy")
    assert np.abs(one - eight).max() < 1e-4


def test_two_processes_on_a_bucket_match_one_and_restore_in_one(tmp_path, data_dir, single_device_run, gcs):
    """2 processes x 2 CPU devices (jax.distributed on localhost, gloo collectives), each reading its
    own rows of every global batch and writing one checkpoint together into a bucket (gs://, a local
    GCS emulator): the same losses and params as one device, and the checkpoint restores in this single
    process."""
    import socket

    from sdjax import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = gcs.bucket("multihost") + "/run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", SDJAX_DATA_DIR=data_dir)
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
         "--config.total_steps=3", "--config.batch_size=8", "--config.log.every_steps=1",
         "--config.log.progress_bar=False", "--config.log.preview_every_steps=0", "--config.export.at_end=False",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    import jax

    from sdjax.train.checkpoint import read_state

    metrics = map(json.loads, storage.read_text(f"{workdir}/logs/metrics.jsonl").splitlines())
    losses = [m["loss"] for m in metrics if "loss" in m]
    params = [np.asarray(x) for x in jax.tree.leaves(read_state(workdir, 3)["params"])]
    ref_losses, ref_params = single_device_run
    assert len(losses) == 3
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(params, ref_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    assert not os.path.exists(tmp_path / "gs:")  # nothing went to a local folder named after the URL
