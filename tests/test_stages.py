"""The from-scratch stages: tokenizer, VAE, CLIP and UNet trained in order by configs/shapes_model.py,
and the pieces they are made of (contrastive loss, retrieval accuracy, PSNR, KL, crops)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models.clip import MAX_LOGIT_SCALE, contrastive_loss
from sdjax.train.objectives import kl_to_standard_normal, random_crops
from sdjax.train.tasks.clip import retrieval_accuracy
from sdjax.train.tasks.vae import psnr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.compat
def test_contrastive_loss_matches_reference_and_rewards_alignment():
    rng = np.random.default_rng(0)
    image, text = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
    scale = np.log(10.0)
    logits = 10.0 * image @ text.T

    def log_softmax(x, axis):
        x = x - x.max(axis=axis, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))

    expected = -(np.mean(np.diag(log_softmax(logits, 1))) + np.mean(np.diag(log_softmax(logits, 0)))) / 2
    got = contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.asarray(scale))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # Matching pairs with a sharp temperature give a loss near 0; shuffled pairs do not.
    aligned = float(contrastive_loss(jnp.asarray(image), jnp.asarray(image), jnp.asarray(MAX_LOGIT_SCALE)))
    shuffled = float(contrastive_loss(jnp.asarray(image), jnp.asarray(image[::-1]), jnp.asarray(MAX_LOGIT_SCALE)))
    assert aligned < 0.05 < 5.0 < shuffled
    # The scale is clamped at CLIP's 100: beyond it the loss does not change.
    beyond = float(contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.asarray(MAX_LOGIT_SCALE + 3)))
    at = float(contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.asarray(MAX_LOGIT_SCALE)))
    assert beyond == pytest.approx(at)


@pytest.mark.compat
def test_retrieval_accuracy_counts_top_one_matches():
    texts = ["a", "b", "c"]
    text_emb = np.eye(3)
    # Images 0, 1 match their captions; image 2 (caption "c") looks like "a".
    image_emb = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.9, 0, 0.1]])
    scores = retrieval_accuracy(image_emb, text_emb, ["a", "b", "c"], texts)
    assert scores["image_to_text"] == pytest.approx(2 / 3)
    # Text "a" retrieves image 0, "b" image 1, "c" image 2 (0.1 beats 0 and 0): all right.
    assert scores["text_to_image"] == pytest.approx(1.0)


@pytest.mark.compat
def test_psnr_kl_and_crops():
    target = np.zeros((2, 4, 4, 3), np.float32)
    noisy = target + np.float32(0.2)  # 0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    np.testing.assert_allclose(psnr(noisy, target), [20.0, 20.0], rtol=1e-5)
    assert psnr(target, target)[0] >= 99
    mean, logvar = jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 4))
    assert float(kl_to_standard_normal(mean, logvar)) == pytest.approx(0.0)
    # KL of N(1, e) to N(0, 1) per element: (1 + e - 1 - 1) / 2 = (e - 1) / 2, summed over 36 elements.
    kl = float(kl_to_standard_normal(mean + 1, logvar + 1))
    assert kl == pytest.approx(36 * (np.e - 1) / 2, rel=1e-5)
    pixels = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    crops = random_crops(pixels, jnp.asarray([[0, 4], [2, 2]]), 4)
    np.testing.assert_array_equal(crops[0], pixels[0, 0:4, 4:8])
    np.testing.assert_array_equal(crops[1], pixels[1, 2:6, 2:6])


# --- the four stages, end to end on a tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """configs/shapes_model.py:tiny through train.py: tokenizer, vae, clip, unet."""
    workdir = str(tmp_path_factory.mktemp("shapes"))
    env = dict(os.environ, SDJAX_DATA_DIR=str(tmp_path_factory.mktemp("data")))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                             f"--config={ROOT}/configs/shapes_model.py:tiny", f"--workdir={workdir}"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, env


def _metrics(workdir, stage):
    with open(os.path.join(workdir, stage, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("stage", ["vae", "clip", "unet"])
def test_each_stage_trains_and_its_loss_falls(pipeline_run, stage):
    workdir, _ = pipeline_run
    losses = [m["loss"] for m in _metrics(workdir, stage) if "loss" in m]
    assert len(losses) >= 6 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_stage_outputs_are_wired_into_the_model(pipeline_run):
    import sdjax
    from sdjax.convert.diffusers import load_component
    from sdjax.tokenizer import load_tokenizer

    workdir, _ = pipeline_run
    # Tokenizer: every caption word of the shapes dataset became one token.
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer", "export"))
    ids = tokenizer("a large green triangle on a white background")["input_ids"]
    assert len(ids) == 2 + 8
    # VAE: held-out PSNR logged; the exported scaling factor makes the latents unit-variance.
    vae_eval = _metrics(workdir, "vae")[-1]
    assert vae_eval["eval/psnr"] > 5 and vae_eval["eval/latent_std"] > 0
    vae_config, vae_params = load_component(os.path.join(workdir, "vae", "export"), "vae")
    assert vae_config.scaling_factor == pytest.approx(1 / vae_eval["eval/latent_std"], rel=1e-4)
    # CLIP: retrieval accuracy logged; the dual encoder is saved beside the text tower.
    clip_eval = _metrics(workdir, "clip")[-1]
    assert 0 <= clip_eval["eval/image_to_text"] <= 1 and clip_eval["eval/eval_images"] > 0
    assert os.path.isfile(os.path.join(workdir, "clip", "export", "clip", "model.safetensors"))
    # The UNet's model carries the VAE and the text tower of the earlier stages unchanged.
    sd = sdjax.load(os.path.join(workdir, "unet", "export"))
    for name, folder in (("vae", "vae"), ("text_encoder", "clip")):
        _, stage_params = load_component(os.path.join(workdir, folder, "export"), name)
        for a, b in zip(jax.tree.leaves(stage_params), jax.tree.leaves(sd.params[name])):
            np.testing.assert_array_equal(a, np.asarray(b))
    # ...and the tokenizer the stages learnt.
    assert list(sd.tokenize(["a large green triangle on a white background"])["input_ids"][0, :10]) == ids
    images = sd.generate(["a small red circle on a blue background"], num_steps=2, guidance_scale=3.0)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_rerun_of_a_finished_stage_takes_no_steps_and_stage_names_are_checked(pipeline_run):
    workdir, env = pipeline_run
    before = {s: _metrics(workdir, s) for s in ("vae", "clip", "unet")}
    command = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/shapes_model.py:tiny",
               f"--workdir={workdir}"]
    again = subprocess.run(command + ["--stage=clip"], capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {s: _metrics(workdir, s) for s in ("vae", "clip", "unet")}
    assert after["vae"] == before["vae"] and after["unet"] == before["unet"]
    new = after["clip"][len(before["clip"]):]
    assert new and all("loss" not in m for m in new)  # only the held-out scores, logged again
    bad = subprocess.run(command + ["--stage=nope"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "--stage 'nope': expected one of tokenizer, vae, clip, unet" in bad.stderr
