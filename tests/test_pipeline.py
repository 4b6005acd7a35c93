"""sdjax's sampler against diffusers' StableDiffusionPipeline (PyTorch) on the same tiny checkpoint."""

import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

import sdjax
from sdjax.pipeline import initial_noise

TOL = 2e-3  # max abs difference of images in [0, 1]
PROMPTS = ["a red circle on a blue background", "ciron"]
NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def sd1(checkpoints):
    folder, _ = checkpoints["sd1"]
    return folder, sdjax.load(folder)


def _reference_pipe(folder, scheduler_cls):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler"}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_txt2img_matches_diffusers(sd1, name):
    import diffusers

    folder, sd = sd1
    noise = initial_noise([11, 12], (16, 16, 4))
    ours = sd.generate(PROMPTS, NEGATIVE, num_steps=6, guidance_scale=7.5, scheduler=name, height=32, width=32,
                       seed=11, latents=noise)
    pipe = _reference_pipe(folder, getattr(diffusers, SCHEDULERS[name]))
    ref = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, height=32, width=32,
               latents=_nchw(noise), output_type="np").images
    assert ours.shape == ref.shape == (2, 32, 32, 3)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() < TOL


def test_seed_gives_same_image_in_any_batch(sd1):
    _, sd = sd1
    both = sd.generate(PROMPTS, num_steps=3, scheduler="ddim", height=32, width=32, seed=[5, 9])
    alone = sd.generate(PROMPTS[1:], num_steps=3, scheduler="ddim", height=32, width=32, seed=[9])
    np.testing.assert_allclose(both[1], alone[0], atol=1e-4)  # float reassociation across batch sizes only
    assert np.abs(both[0] - both[1]).max() > 1e-3


def test_one_scanned_program_per_shape(sd1):
    """New prompts, seeds and guidance reuse the compiled program; the loop is a lax.scan, not unrolled."""
    import jax

    from sdjax.pipeline import _PROGRAMS

    _, loaded = sd1
    sd = sdjax.StableDiffusion(loaded.model.replace(), loaded.params)  # a Model of its own: an empty cache
    kwargs = dict(num_steps=3, scheduler="ddim", height=32, width=32)
    sd.generate(["a red circle", "b"], seed=1, guidance_scale=7.5, **kwargs)
    programs = _PROGRAMS[sd.model]
    ((plan, _, _), program), = programs.items()
    assert program._cache_size() == 1
    sd.generate(["another prompt", "c"], ["neg", "x"], seed=[40, 2], guidance_scale=3.0, **kwargs)
    sd.generate(["third"] * 2, seed=99, guidance_scale=12.0, **kwargs)
    assert len(programs) == 1 and program._cache_size() == 1

    def convs(steps):
        sd.generate(["a", "b"], num_steps=steps, scheduler="ddim", height=32, width=32)
        key = next(k for k in programs if k[0].num_steps == steps)
        ids = sd.tokenize(["a", "b"])
        inputs = {"ids": ids, "neg_ids": ids, "keys": jax.numpy.stack([jax.random.key(0)] * 2),
                  "noise": np.zeros((2, 16, 16, 4), np.float32)}
        args = (dict(sd.params), 7.5, inputs)
        text = str(jax.make_jaxpr(programs[key])(*args))
        return text.count("conv_general_dilated"), "scan" in text

    assert convs(2) == convs(5)
    assert convs(2)[1]


IMG2IMG = ["ddim"]


@pytest.mark.parametrize("name", IMG2IMG)
def test_img2img_matches_diffusers(sd1, name, monkeypatch):
    import diffusers
    from diffusers.models.autoencoders import vae as diffusers_vae
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module

    folder, sd = sd1
    seeds = [3, 4]
    init = np.random.default_rng(5).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    noise = initial_noise(seeds, (16, 16, 4))
    posterior = initial_noise(seeds, (16, 16, 4), "posterior")
    ours = sd.generate(PROMPTS, NEGATIVE, num_steps=10, guidance_scale=7.5, scheduler=name, height=32, width=32,
                       seed=seeds, init_image=init, strength=0.6)
    # The reference draws its posterior sample and its added noise from torch; give it ours.
    monkeypatch.setattr(diffusers_vae.DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean + self.std * _nchw(posterior))
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **kw: _nchw(noise))
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, image=_nchw(init), negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5,
               strength=0.6, output_type="np").images
    assert np.abs(ours - ref).max() < TOL


def _inpaint_inputs():
    rng = np.random.default_rng(7)
    init = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((2, 32, 32), np.float32)
    mask[0, 8:24, 4:20] = 1
    mask[1, :16] = 0.7  # binarised to 1
    return init, mask


def _reference_inpaint(folder, name, init, mask, noise, posteriors, monkeypatch, strength):
    """diffusers' StableDiffusionInpaintPipeline, fed our noise and posterior draws (in its call order)."""
    import diffusers
    from diffusers.models.autoencoders import vae as diffusers_vae
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module

    draws = iter(posteriors)
    monkeypatch.setattr(diffusers_vae.DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean + self.std * _nchw(next(draws)))
    monkeypatch.setattr(inpaint_module, "randn_tensor", lambda shape, **kw: _nchw(noise))
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, image=_nchw(init), mask_image=torch.from_numpy(mask[:, None]), negative_prompt=NEGATIVE,
               num_inference_steps=8, guidance_scale=7.5, strength=strength, height=32, width=32,
               output_type="np").images
    assert next(draws, None) is None, "the reference drew fewer posterior samples than expected"
    return ref


@pytest.mark.parametrize("name,strength", [("ddim", 1.0), ("euler", 0.75)])
def test_inpaint_blending_matches_diffusers(sd1, name, strength, monkeypatch):
    """Regular 4-channel UNet: the kept region is re-noised and blended back after every step."""
    folder, sd = sd1
    seeds = [21, 22]
    init, mask = _inpaint_inputs()
    noise = initial_noise(seeds, (16, 16, 4))
    ours = sd.generate(PROMPTS, NEGATIVE, num_steps=8, guidance_scale=7.5, scheduler=name, height=32, width=32,
                       seed=seeds, init_image=init, mask=mask, strength=strength)
    # The reference encodes the init image, then the masked image (whose latents a 4-channel UNet ignores).
    posterior = initial_noise(seeds, (16, 16, 4), "posterior")
    ref = _reference_inpaint(folder, name, init, mask, noise, [posterior, posterior], monkeypatch, strength)
    assert np.abs(ours - ref).max() < TOL


@pytest.mark.parametrize("name,strength", [("ddim", 1.0), ("dpmpp_2m", 0.75)])
def test_inpaint_9_channel_unet_matches_diffusers(inpaint_checkpoint, name, strength, monkeypatch):
    sd = sdjax.load(inpaint_checkpoint)
    seeds = [31, 32]
    init, mask = _inpaint_inputs()
    noise = initial_noise(seeds, (16, 16, 4))
    ours = sd.generate(PROMPTS, NEGATIVE, num_steps=8, guidance_scale=7.5, scheduler=name, height=32, width=32,
                       seed=seeds, init_image=init, mask=mask[..., None], strength=strength)
    masked = initial_noise(seeds, (16, 16, 4), "masked_posterior")
    # strength < 1 encodes the init image first (to noise it); the masked image always.
    draws = [masked] if strength == 1.0 else [initial_noise(seeds, (16, 16, 4), "posterior"), masked]
    ref = _reference_inpaint(inpaint_checkpoint, name, init, mask, noise, draws, monkeypatch, strength)
    assert np.abs(ours - ref).max() < TOL


def test_inpaint_extreme_masks(sd1):
    """Blending with an all-keep mask ends on the init image's latents whatever the prompt; an
    all-repaint mask at strength 1 is exactly txt2img. (The VAE's attention spreads any latent change
    over the whole image, so partial masks are checked by the parity tests above.)"""
    _, sd = sd1
    init, _ = _inpaint_inputs()
    kw = dict(num_steps=4, scheduler="ddim", height=32, width=32, seed=1, init_image=init)
    keep_a = sd.generate(PROMPTS, mask=np.zeros((2, 32, 32)), **kw)
    keep_b = sd.generate(["something else", "x"], mask=np.zeros((2, 32, 32)), **kw)
    np.testing.assert_allclose(keep_a, keep_b, atol=1e-5)
    repaint = sd.generate(PROMPTS, mask=np.ones((2, 32, 32)), **kw)
    del kw["init_image"]
    np.testing.assert_allclose(repaint, sd.generate(PROMPTS, **kw), atol=1e-5)
    assert np.abs(repaint - keep_a).max() > 0.05


def test_guidance_rescale_changes_output_by_its_formula(sd1, monkeypatch):
    """guidance_rescale=1 makes each guided prediction's std equal the conditional one's."""
    from sdjax import pipeline

    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    out = jnp.asarray(rng.normal(size=(4, 8, 8, 4)).astype(np.float32))
    out = out.at[2:].multiply(3.0)  # conditional half with a different scale
    fn = pipeline.guided(lambda x, t, ctx: out, jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)), 7.5, 1.0)
    res = np.asarray(fn(jnp.zeros((2, 8, 8, 4)), 0))
    cond = np.asarray(out[2:])
    np.testing.assert_allclose(res.std(axis=(1, 2, 3)), cond.std(axis=(1, 2, 3)), rtol=1e-5)
    half = np.asarray(pipeline.guided(lambda x, t, ctx: out, jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)), 7.5,
                                      0.5)(jnp.zeros((2, 8, 8, 4)), 0))
    plain = np.asarray(pipeline.guided(lambda x, t, ctx: out, jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)), 7.5,
                                       0.0)(jnp.zeros((2, 8, 8, 4)), 0))
    np.testing.assert_allclose(half, 0.5 * res + 0.5 * plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,decoder_dtype", [("float16", "float32"), ("bfloat16", "bfloat16")])
def test_float16_vae_decodes_in_float32(checkpoints, dtype, decoder_dtype):
    """diffusers' force_upcast rule: a float16 VAE whose config sets it (SD's and SDXL's do) encodes and
    decodes in float32; bfloat16 (float32's range) is left as is. Read off the program: the dtype of the
    decoder's last convolution."""
    import jax
    import jax.numpy as jnp

    from sdjax.pipeline import Plan, build_program
    from sdjax.schedulers import make_scheduler

    sd = sdjax.load(checkpoints["sd1"][0], dtype=getattr(jnp, dtype))
    assert sd.model.vae.config.force_upcast
    sched = make_scheduler("ddim", sd.model.scheduler_config, 2)
    program = build_program(sd.model, Plan("ddim", 2, (), 1, (16, 16), False, 0.0, 0, "txt2img"), sched)
    inputs = {"ids": sd.tokenize(["a"]), "neg_ids": sd.tokenize([""]), "keys": jax.numpy.stack([jax.random.key(0)]),
              "noise": np.zeros((1, 16, 16, 4), np.float32)}
    jaxpr = jax.make_jaxpr(program)(dict(sd.params), 1.0, inputs)
    convs = [e for e in jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "conv_general_dilated"]
    assert str(convs[-1].outvars[0].aval.dtype) == decoder_dtype
