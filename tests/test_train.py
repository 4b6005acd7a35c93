"""train.py end to end on CPU: the tiny config trains, logs, checkpoints, exports, and resumes exactly."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import sdjax
from sdjax.convert.safetensors_io import read_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.log.progress_bar=False", "--config.log.every_steps=2", "--config.checkpoint.every_steps=4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets"))


def run_train(workdir, data_dir, *flags, fault=None, config="configs/tiny.py"):
    env = dict(os.environ, SDJAX_DATA_DIR=data_dir)
    env.pop("SDJAX_FAULT", None)
    if fault:
        env["SDJAX_FAULT"] = fault
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={os.path.join(ROOT, config)}",
                           f"--workdir={workdir}", *FAST, *flags], capture_output=True, text=True, env=env,
                          timeout=900)


def test_tiny_run_trains_logs_checkpoints_and_exports(tmp_path, data_dir):
    workdir = tmp_path / "run"
    result = run_train(workdir, data_dir, "--config.total_steps=40", "--config.log.preview_every_steps=20")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "logs" / "metrics.jsonl") as f:
        logs = [json.loads(line) for line in f]
    assert [r["step"] for r in logs] == list(range(2, 41, 2))
    losses = [r["loss"] for r in logs]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    for key in ("grad_norm", "lr", "step_time", "images_per_second", "mfu"):
        assert all(np.isfinite(r[key]) and r[key] >= 0 for r in logs), key
    assert 0 < logs[-1]["mfu"] < 1
    events = [n for n in os.listdir(workdir / "logs") if n.startswith("events.out.tfevents")]
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir / "logs"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(2, 41, 2))
    assert [e.step for e in acc.Images("preview")] == [20, 40]
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [32, 36, 40]  # keep_last 3
    sd = sdjax.load(str(workdir / "export"))
    images = sd.generate(["a small red circle on a blue background"], num_steps=3, height=32, width=32)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def _final(workdir):
    unet = read_safetensors(os.path.join(workdir, "export", "unet", "diffusion_pytorch_model.safetensors"))
    return unet


@pytest.mark.compat
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, data_dir):
    steps = ["--config.total_steps=12"]
    straight = tmp_path / "straight"
    assert run_train(straight, data_dir, *steps).returncode == 0
    killed = tmp_path / "killed"
    first = run_train(killed, data_dir, *steps, fault="step:6")  # mid-step, after the step-4 checkpoint
    assert first.returncode == -9, first.stderr[-2000:]
    second = run_train(killed, data_dir, *steps, fault="save:8")  # mid-save (async write under way)
    assert second.returncode == -9, second.stderr[-2000:]
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    third = run_train(killed, data_dir, *steps)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from" in third.stdout
    assert_same_final_state(straight, killed, 12)


def assert_same_final_state(straight, resumed, step):
    """The exported UNet and the checkpointed params and optimizer state at `step` are bitwise equal."""
    a, b = _final(straight), _final(resumed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    from sdjax.train.checkpoint import read_state

    sa, sb = read_state(straight, step), read_state(resumed, step)
    for x, y in zip(*(jax_leaves(t["params"]) for t in (sa, sb))):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(*(jax_leaves(t["opt_state"]) for t in (sa, sb))):
        np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("flags,message", [
    (["--config.model.nonsense=1"], "nonsense"),
    (["--config.batch_size=3", "--config.grad_accum_steps=2"], "batch_size 3 is not divisible by grad_accum_steps 2"),
    (["--config.data.source=tfds", "--config.data.name=no_such_dataset"], "no_such_dataset"),
    (["--config.data.caption_key=text"], "text"),
    (["--config.model.architecture=huge"], "model.architecture 'huge' is unknown"),
    (["--config.data.cache_latents=True", "--config.task=vae"], "data.cache_latents: only task 'unet'"),
    (["--config.data.cache_latents=True", "--config.data.crop=random"], "data.cache_latents: a cache holds one crop"),
    (["--config.data.cache_latents=True", "--config.data.flip=True"], "data.cache_latents: a cache holds one orien"),
])
def test_bad_config_fails_before_compute(tmp_path, data_dir, flags, message):
    result = run_train(tmp_path / "run", data_dir, "--config.total_steps=2", *flags)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


def test_nan_learning_rate_is_refused_in_one_line_writing_nothing(tmp_path, data_dir):
    # In-process, tests/test_train_nonfinite.py shows this error comes before anything is compiled.
    workdir = tmp_path / "run"
    result = run_train(workdir, data_dir, "--config.total_steps=4", "--config.optimizer.learning_rate=nan")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "train.py: error: optimizer.learning_rate must be a finite number > 0, got nan"]
    assert not workdir.exists()


def test_nan_in_the_params_mid_run_is_never_checkpointed_or_exported(tmp_path, data_dir):
    """A NaN put into the params after step 6 (as a diverging update would): the step-8 save is refused
    with one line naming them, nothing is exported, and the step-4 checkpoint stays restorable."""
    workdir = tmp_path / "run"
    result = run_train(workdir, data_dir, "--config.total_steps=12", fault="nan:6")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]  # not the dataset build's log
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(r"train\.py: error: step 8: non-finite params of unet \(first at unet/[\w/]+\): not saved; "
                        r"the last checkpoint \(step 4\) is intact", errors[0]), errors
    assert not (workdir / "export").exists()
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [4]
    from sdjax.train.checkpoint import read_state

    state = read_state(workdir, 4)
    assert int(state["step"]) == 4 and int(state["opt_state"]["count"]) == 4
    trained = jax_leaves([state["params"], state["ema"], state["opt_state"]])
    assert len(trained) > 3 and all(np.isfinite(x).all() for x in trained)


CACHED = ["--config.data.cache_latents=True"]


def _losses(workdir):
    with open(os.path.join(workdir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_cached_latents_train_as_pixels_do_and_resume_exactly(tmp_path, data_dir):
    """data.cache_latents: the first loss is the pixel run's (same seed, same draws; the encode is only
    batched differently), and a run killed mid-way reuses its cache and ends bitwise where an
    uninterrupted one does."""
    steps = ["--config.total_steps=12", "--config.log.every_steps=1"]
    pixels = run_train(tmp_path / "pixels", data_dir, "--config.total_steps=1", "--config.export.at_end=False")
    assert pixels.returncode == 0, pixels.stderr[-3000:]
    straight = tmp_path / "straight"
    result = run_train(straight, data_dir, *steps, *CACHED)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "latent cache: encoding the 256 images" in result.stdout
    np.testing.assert_allclose(_losses(straight)[0], _losses(tmp_path / "pixels")[0], rtol=1e-4)
    killed = tmp_path / "killed"
    first = run_train(killed, data_dir, *steps, *CACHED, fault="step:6")
    assert first.returncode == -9, first.stderr[-2000:]
    second = run_train(killed, data_dir, *steps, *CACHED)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "latent cache: reusing" in second.stdout and "at step 4" in second.stdout
    assert_same_final_state(straight, killed, 12)


def test_latent_cache_follows_the_vae(tmp_path, data_dir, capsys):
    """The cache holds the frozen VAE's posterior of each image, is reused while that VAE is the same
    and rebuilt when its weights change."""
    import jax

    from sdjax.data.source import held_out
    from sdjax.models import AutoencoderKL, VAEConfig
    from sdjax.models.presets import preset
    from sdjax.train.build import initial_params
    from sdjax.train.config import base_config
    from sdjax.train.tasks.unet import cache_latents

    config = base_config()
    config.data.update(data_dir=data_dir, resolution=32, shapes={"num_examples": 64, "num_test_examples": 8, "seed": 0})
    config.log.progress_bar = False
    vae = AutoencoderKL(VAEConfig.from_dict(preset("tiny")["vae"], "preset"))
    params = [jax.device_get(initial_params({"vae": vae}, seed)["vae"]) for seed in (0, 1)]
    folder = str(tmp_path / "latent_cache")
    cache_latents(config, folder, vae, params[0])
    cache_latents(config, folder, vae, params[0])
    assert "latent cache: reusing" in capsys.readouterr().out
    first = held_out(config.data, config.data.split, 1)["pixels"]  # example 0 of the split
    mean, logvar = vae.apply({"params": params[0]}, first, method="encode")
    # The cache encodes a chunk of images at once, the reference one image alone: float32 sums in another
    # order (jax 0.12's CPU convolutions differed by 1.7e-6 on values ~0.03).
    np.testing.assert_allclose(np.load(os.path.join(folder, "mean.npy"))[0], mean[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(os.path.join(folder, "logvar.npy"))[0], logvar[0], rtol=1e-5, atol=1e-5)
    cache_latents(config, folder, vae, params[1])
    assert "out of date (vae_params_sha256 changed); rebuilding" in capsys.readouterr().out
    assert not np.allclose(np.load(os.path.join(folder, "mean.npy"))[0], mean[0])


def test_workdir_of_a_different_model_is_refused(tmp_path, data_dir):
    workdir = tmp_path / "run"
    assert run_train(workdir, data_dir, "--config.total_steps=4").returncode == 0
    before = sorted(os.listdir(workdir / "checkpoints"))
    result = run_train(workdir, data_dir, "--config.total_steps=8", "--config.model.train_text_encoder=True")
    assert result.returncode == 2
    assert "holds a checkpoint of a different model (trained" in result.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_checkpoint_of_another_state_structure_is_refused_in_one_line(tmp_path):
    # A state saved with optax's tuple opt_state (before the fused AdamW) must not half-restore.
    from sdjax.train.checkpoint import Checkpoints
    from sdjax.train.config import base_config
    from sdjax.train.optimizer import AdamWState
    from sdjax.train.step import TrainState

    params = {"unet": {"w": jnp.ones(3)}}
    old = TrainState(step=jnp.int32(5), params=params, opt_state=({"mu": params},), ema=params,
                     rng=jnp.zeros(2, jnp.uint32), bad_steps=jnp.int32(0))
    checkpoints = Checkpoints(str(tmp_path), base_config().checkpoint)
    checkpoints.save(old, {"position": 1}, {"model": 1})
    checkpoints.wait()
    current = old.replace(opt_state=AdamWState(count=jnp.int32(0), mu=params, nu=params))
    with pytest.raises(ValueError, match=r"checkpoints/5: the saved training state \(opt_state\) has another "
                                         r"structure than this run's") as info:
        checkpoints.restore(5, current)
    assert "\n" not in str(info.value)
    checkpoints.close()


def test_sweep_lists_and_runs_a_point(tmp_path, data_dir):
    result = run_train(tmp_path / "s", data_dir, "--sweep=list")
    assert result.returncode == 0
    assert "0: {'optimizer.learning_rate': 0.0003}" in result.stdout
    result = run_train(tmp_path / "s", data_dir, "--sweep=1", "--config.total_steps=2", "--config.export.at_end=False")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "s" / "sweep_1" / "config.json").read_text())
    assert config["optimizer"]["learning_rate"] == 1e-3
    assert run_train(tmp_path / "s", data_dir, "--sweep=7").returncode == 2


CONFIGS = sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_and_its_tiny_variant_is_valid(name):
    import importlib.util

    from sdjax.train.config import apply_overrides, check_keys, sweep_points
    from sdjax.train.loop import check_numbers

    def check_keys_and_numbers(config):
        check_keys(config)
        check_numbers(config)

    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    full, tiny = module.get_config(), module.get_config("tiny")
    check_keys_and_numbers(full)
    check_keys_and_numbers(tiny)
    if name == "textual_inversion.py":  # a real lesson on the shipped 64 px model (~1.5 min), not a smoke run
        assert tiny.total_steps <= 300 and tiny.batch_size <= 16 and tiny.data.resolution <= 64
    else:
        assert tiny.total_steps <= 60 and tiny.batch_size <= 4 and tiny.data.resolution <= 32
    for point in sweep_points(module):
        check_keys_and_numbers(apply_overrides(full, point))
    for base in (full, tiny):  # a staged file: every stage's config is valid too
        for _, stage in getattr(module, "stages", lambda c, w: [])(base, "/tmp/workdir"):
            check_keys_and_numbers(stage)


def test_finetune_tiny_variant_on_a_diffusers_folder(tmp_path, data_dir, checkpoints):
    folder, _ = checkpoints["sd1"]
    workdir = tmp_path / "ft"
    result = run_train(workdir, data_dir, f"--config.model.pretrained={folder}",
                       config="configs/sd15_finetune.py:tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    exported, base = sdjax.load(str(workdir / "export")), sdjax.load(folder)
    assert exported.model.configs == base.model.configs
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax_leaves(exported.params["unet"]), jax_leaves(base.params["unet"]))]
    assert max(moved) > 0  # the UNet was trained
    for a, b in zip(jax_leaves(exported.params["vae"]), jax_leaves(base.params["vae"])):
        np.testing.assert_array_equal(a, b)  # the VAE stayed frozen
    result = run_train(tmp_path / "none", data_dir, config="configs/sd15_finetune.py:tiny")
    assert result.returncode == 2 and "model.pretrained is empty" in result.stderr
