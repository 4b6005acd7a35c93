"""Step-by-step previews from the sampling scan: the noisy latents equal diffusers' callback_on_step_end
latents, the predicted clean latents equal its schedulers' pred_original_sample, both decoded the same
way; previews leave the image bitwise unchanged; sample.py --save-steps writes them."""

import os

import numpy as np
import pytest

import sdjax
from sdjax.pipeline import initial_noise

pytestmark = pytest.mark.compat  # the torch references skip themselves in a torch-free run

TOL = 2e-3  # max abs difference of images in [0, 1], as the txt2img parity tests
PROMPTS = ["a red circle on a blue background", "ciron"]
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}


def _reference(folder, name, noise, every):
    """diffusers' images, and per preview step its latents after the step and the step's predicted x0,
    each decoded by its VAE as the pipeline decodes."""
    torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents, predicted = [], []
    step = pipe.scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        predicted.append(out[1] if isinstance(out, tuple) else out.pred_original_sample)  # return_dict=False: a pair
        return out

    pipe.scheduler.step = recording_step

    def callback(pipeline, i, t, tensors):
        latents.append(tensors["latents"])
        return tensors

    images = pipe(PROMPTS, num_inference_steps=6, guidance_scale=7.5, height=32, width=32, output_type="np",
                  latents=torch.from_numpy(np.ascontiguousarray(np.transpose(noise, (0, 3, 1, 2)))),
                  callback_on_step_end=callback).images

    def decode(z):
        with torch.no_grad():
            x = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
        return np.clip((x.permute(0, 2, 3, 1).numpy() + 1) / 2, 0, 1)

    picked = range(every - 1, 6, every)
    return (images, np.stack([decode(latents[k]) for k in picked], 1),
            np.stack([decode(predicted[k]) for k in picked], 1))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_previews_match_diffusers(checkpoints, name):
    folder = checkpoints["sd1"][0]
    sd = sdjax.load(folder)
    noise = initial_noise([3, 4], (16, 16, 4))
    kw = dict(num_steps=6, guidance_scale=7.5, scheduler=name, height=32, width=32, latents=noise, preview_every=2)
    images, noisy = sd.generate(PROMPTS, preview="latents", **kw)
    _, clean = sd.generate(PROMPTS, preview="x0", **kw)
    ref_images, ref_noisy, ref_clean = _reference(folder, name, noise, 2)
    assert noisy.shape == clean.shape == (2, 3, 32, 32, 3)
    assert np.abs(images - ref_images).max() < TOL
    assert np.abs(noisy - ref_noisy).max() < TOL
    assert np.abs(clean - ref_clean).max() < TOL
    assert np.abs(clean[:, 0] - noisy[:, 0]).max() > 0.05  # the two kinds differ early on


@pytest.fixture(scope="module")
def shipped():
    return sdjax.load(sdjax.DEFAULT_MODEL)


def test_previews_leave_the_image_unchanged(shipped):
    kw = dict(num_steps=6, seed=7)
    plain = shipped.generate(PROMPTS, **kw)
    images, previews = shipped.generate(PROMPTS, preview_every=3, preview="latents", **kw)
    np.testing.assert_array_equal(images, plain)
    assert previews.shape == (2, 2, 64, 64, 3)
    np.testing.assert_array_equal(previews[:, -1], plain)  # the last step's latents are the image's
    _, approx = shipped.generate(PROMPTS, preview_every=2, preview_decoder="approx", **kw)
    assert approx.shape == (2, 3, 64, 64, 3) and 0 <= approx.min() and approx.max() <= 1
    # One colour per 8 x 8 latent pixel, close to the image at the end.
    assert np.all(approx[:, :, ::8, ::8] == approx[:, :, 7::8, 7::8])
    assert np.abs(approx[:, -1] - plain).mean() < 0.25


@pytest.mark.parametrize("kw,message", [
    (dict(preview_every=0), r"preview_every must be an integer in \[1, 4\]"),
    (dict(preview_every=5), r"preview_every must be an integer in \[1, 4\] \(the steps this call runs\), got 5"),
    (dict(preview_every=2, preview="noise"), "preview 'noise' is unknown; known: x0, latents"),
    (dict(preview_every=2, preview_decoder="taesd"), "preview_decoder 'taesd' is unknown; known: vae, approx"),
])
def test_bad_preview_settings(shipped, kw, message):
    with pytest.raises(ValueError, match=message):
        shipped.generate(PROMPTS[:1], num_steps=4, **kw)


def test_sample_cli_save_steps(tmp_path, capsys):
    import sample
    from cli_checks import assert_one_line_exit_2
    from PIL import Image

    out = tmp_path / "out"
    assert sample.main(["--prompt", "a large green triangle on a white background", "--steps", "6",
                        "--save-steps", "2", "--num-images", "2", "--out", str(out)]) == 0
    names = sorted(os.listdir(out))
    assert names == ["00000-0.png", "00000-0.step002.png", "00000-0.step004.png", "00000-0.step006.png",
                     "00000-0.steps.png", "00001-1.png", "00001-1.step002.png", "00001-1.step004.png",
                     "00001-1.step006.png", "00001-1.steps.png"]
    with Image.open(out / "00000-0.steps.png") as strip:
        assert strip.size == (4 * 64, 64)  # three previews and the image
    final = np.asarray(Image.open(out / "00000-0.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00000-0.steps.png"))[:, 192:], final)
    capsys.readouterr()
    bad = tmp_path / "bad"
    for flags, message in ((["--save-steps", "0"], "--save-steps must be in [1, 6] (the model calls of 6 ddim steps), "
                                                   "got 0"),
                           (["--save-steps", "7"], "--save-steps must be in [1, 6] (the model calls of 6 ddim steps), "
                                                   "got 7"),
                           (["--save-steps", "12", "--scheduler", "heun"], "--save-steps must be in [1, 11] (the "
                                                                            "model calls of 6 heun steps), got 12"),
                           (["--preview", "latents"], "--preview / --preview-decoder: only with --save-steps")):
        assert_one_line_exit_2(sample.main, ["--prompt", "a", "--steps", "6", *flags, "--out", str(bad)], message,
                               capsys)
    assert not bad.exists()
