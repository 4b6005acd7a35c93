"""SDXL base and refiner networks against diffusers/transformers (PyTorch) on tiny random checkpoints: both text
encoders, the prompt embeddings as diffusers assembles them, the UNet with added conditioning, export."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

import sdjax
from sdjax import CheckpointError
from sdjax.conditioning import Conditioning, encode_text, unet_call

PROMPTS = ["a red circle", "ciron ed on a blue square, with a long tail of words"]
KINDS = ("base", "refiner")


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _pipeline(folder: str, kind: str):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if kind == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
    return cls.from_pretrained(folder)


@pytest.fixture(scope="module")
def loaded(sdxl_checkpoints):
    return {kind: sdjax.load(folder) for kind, (folder, _) in sdxl_checkpoints.items()}


def test_components_come_from_model_index(loaded):
    assert set(loaded["base"].model.networks) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    assert set(loaded["base"].model.tokenizers) == {"tokenizer", "tokenizer_2"}
    assert set(loaded["refiner"].model.networks) == {"text_encoder_2", "unet", "vae"}
    assert [e.encoder for e in loaded["refiner"].model.text] == ["text_encoder_2"]


def test_text_encoders_match_transformers(sdxl_checkpoints, loaded):
    """Every hidden state SDXL uses (the penultimate) and the projected pooled output, to 1e-4."""
    ref = sdxl_checkpoints["base"][1]
    sd = loaded["base"]
    ids = sd.tokenize(PROMPTS)
    for name, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2")):
        with torch.no_grad():
            out = ref[name](torch.from_numpy(ids[key]).long(), output_hidden_states=True)
        module, params = sd.model.networks[name], {"params": sd.params[name]}
        hidden, pooled = jax.jit(module.apply, static_argnums=2)(params, ids[key], -2)
        assert _rel(hidden, out.hidden_states[-2]) <= 1e-4, name
        last, _ = jax.jit(module.apply)(params, ids[key])
        assert _rel(last, out.last_hidden_state) <= 1e-4, name
        if name == "text_encoder_2":
            assert pooled.shape == (2, 24)
            assert _rel(pooled, out.text_embeds) <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_embeddings_match_diffusers(sdxl_checkpoints, loaded, kind):
    """sdjax.conditioning gives diffusers' encode_prompt: both tokenizers' padding, the penultimate layers
    concatenated (base) or alone (refiner), the pooled embedding of text_encoder_2."""
    pipe = _pipeline(sdxl_checkpoints[kind][0], kind)
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    sd = loaded[kind]
    cond = jax.jit(lambda p, ids: encode_text(sd.model, p, ids))(dict(sd.params), sd.tokenize(PROMPTS))
    assert cond.context.shape == tuple(context.shape) == (2, 77, 72 if kind == "base" else 40)
    assert _rel(cond.context, context) <= 1e-4
    assert _rel(cond.pooled, pooled) <= 1e-4


def test_a1111_long_prompt_weighs_each_encoder_and_pools_the_first_window(loaded):
    """SDXL in A1111's syntax: each text encoder's windows are weighted alone and concatenated; the pooled
    embedding is the first window's, as A1111 takes it."""
    from sdjax.conditioning import emphasize, tokenize_prompts

    sd = loaded["base"]
    prompt = "a (red:1.3) circle " * 15 + "BREAK [blue] square"  # 6 tokens per phrase here
    inputs = tokenize_prompts(sd.model, [prompt], "a1111")
    assert inputs["input_ids"].shape == inputs["input_ids_2"].shape == (1, 3 * 77)
    cond = encode_text(sd.model, sd.params, inputs)
    assert cond.context.shape == (1, 3 * 77, 72)
    per_window = encode_text(sd.model, sd.params, {k: inputs[k].reshape(3, 77) for k in ("input_ids", "input_ids_2")})
    np.testing.assert_allclose(cond.pooled[0], per_window.pooled[0], rtol=1e-6, atol=1e-6)
    for k, (key, columns) in enumerate((("token_weights", slice(0, 32)), ("token_weights_2", slice(32, 72)))):
        expected = emphasize(per_window.context[:, :, columns], inputs[key].reshape(3, 77))
        np.testing.assert_allclose(cond.context[0, :, columns], np.asarray(expected).reshape(3 * 77, -1), rtol=1e-5,
                                   atol=1e-6)
    assert inputs["token_weights"].max() == np.float32(1.3) and inputs["token_weights"].min() == np.float32(1 / 1.1)


def _unet_inputs(kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    width, ids = (72, 6) if kind == "base" else (40, 5)
    latents = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, width)).astype(np.float32)
    pooled = rng.standard_normal((2, 24)).astype(np.float32)
    # Not diffusers' defaults: original size, crop corner, target size (base) or aesthetic score (refiner).
    time_ids = (np.asarray([[768, 512, 16, 48, 1024, 896], [300, 1000, 0, 8, 512, 512]], np.float32) if kind == "base"
                else np.asarray([[768, 512, 16, 48, 6.0], [300, 1000, 0, 8, 2.5]], np.float32))
    return latents, np.asarray([999, 37]), context, pooled, time_ids


def _reference_unet(unet, latents, t, context, pooled, time_ids) -> np.ndarray:
    with torch.no_grad():
        out = unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(t),
                   encoder_hidden_states=torch.from_numpy(context),
                   added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)})
    return out.sample.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_unet_with_added_conditioning_matches_diffusers(sdxl_checkpoints, loaded, kind):
    sd, ref = loaded[kind], sdxl_checkpoints[kind][1]["unet"]
    latents, t, context, pooled, time_ids = _unet_inputs(kind)
    ours = jax.jit(lambda p, x, t, c: unet_call(sd.model, p)(x, t, c))(
        dict(sd.params), latents, t, Conditioning(context, pooled, time_ids))
    expected = _reference_unet(ref, latents, t, context, pooled, time_ids)
    assert _rel(ours, expected) <= 1e-4
    # The tiny random UNet is not blind to the added conditioning: changing the time ids or the pooled
    # embedding moves diffusers' own output by far more than the tolerance.
    moved_ids = _reference_unet(ref, latents, t, context, pooled, time_ids * 0.5)
    moved_pooled = _reference_unet(ref, latents, t, context, -pooled, time_ids)
    assert _rel(moved_ids, expected) > 100 * 1e-4 and _rel(moved_pooled, expected) > 100 * 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_export_reimports_bit_for_bit_and_loads_in_diffusers(sdxl_checkpoints, loaded, kind, tmp_path):
    sd, ref = loaded[kind], sdxl_checkpoints[kind][1]
    out = str(tmp_path / kind)
    sd.save(out)
    again = sdjax.load(out)
    assert set(again.params) == set(sd.params)
    for a, b in zip(jax.tree.leaves(dict(sd.params)), jax.tree.leaves(dict(again.params))):
        np.testing.assert_array_equal(a, b)
    pipe = _pipeline(out, kind)
    for name in ("unet", "vae", "text_encoder_2") + (("text_encoder",) if kind == "base" else ()):
        got, want = getattr(pipe, name).state_dict(), ref[name].state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert pipe.tokenizer_2("a red circle")["input_ids"] == ref["tokenizer_2"]("a red circle")["input_ids"]


def test_sdxl_folder_without_text_encoder_2_is_refused(sdxl_checkpoints, tmp_path):
    folder = str(tmp_path / "broken")
    shutil.copytree(sdxl_checkpoints["base"][0], folder)
    index = os.path.join(folder, "model_index.json")
    with open(index) as f:
        value = json.load(f)
    value["text_encoder_2"] = [None, None]
    with open(index, "w") as f:
        json.dump(value, f)
    with pytest.raises(CheckpointError, match=r"model_index.json: component 'text_encoder_2' is missing"):
        sdjax.load(folder)


# --- sampling -----------------------------------------------------------------------------------------------------

TOL = 2e-3  # max abs difference of images in [0, 1]
NEGATIVE = ["blurry", "ciron"]
SCHEDULERS = {"euler": ("EulerDiscreteScheduler", {}),
              "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
              "ddim": ("DDIMScheduler", {})}


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _reference(folder: str, kind: str, scheduler: str | None = None):
    import diffusers

    pipe = _pipeline(folder, kind)
    if scheduler is not None:
        cls, options = SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_txt2img_matches_diffusers(sdxl_checkpoints, loaded, name):
    """Base model, guidance 5, a negative prompt, non-default size and crop conditioning."""
    from sdjax.conditioning import MicroConditioning
    from sdjax.pipeline import initial_noise

    folder = sdxl_checkpoints["base"][0]
    noise = initial_noise([21, 22], (16, 16, 4))
    micro = MicroConditioning(original_size=(96, 64), crops_coords_top_left=(8, 0), target_size=(32, 40))
    options = {"dpmpp_2m": {"use_karras_sigmas": True}}.get(name)
    ours = loaded["base"].generate(PROMPTS, NEGATIVE, num_steps=6, guidance_scale=5.0, scheduler=name,
                                   scheduler_options=options, height=32, width=32, seed=21, latents=noise,
                                   micro=micro)
    ref = _reference(folder, "base", name)(
        PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=5.0, height=32, width=32,
        latents=_nchw(noise), original_size=(96, 64), crops_coords_top_left=(8, 0), target_size=(32, 40),
        output_type="np").images
    assert ours.shape == ref.shape == (2, 32, 32, 3)
    assert np.abs(ours - ref).max() < TOL
    # The size conditioning reaches the images: diffusers' own output moves far more than the tolerance.
    default = _reference(folder, "base", name)(
        PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=5.0, height=32, width=32,
        latents=_nchw(noise), output_type="np").images
    assert np.abs(default - ref).max() > 10 * TOL


def test_no_negative_prompt_gives_zero_embeddings_as_diffusers(sdxl_checkpoints, loaded):
    """force_zeros_for_empty_prompt: negative_prompts=None zeroes the unconditional side; "" encodes."""
    from sdjax.pipeline import initial_noise

    folder = sdxl_checkpoints["base"][0]
    noise = initial_noise([5, 6], (16, 16, 4))
    kwargs = dict(num_steps=4, guidance_scale=5.0, height=32, width=32, latents=noise)
    zeros = loaded["base"].generate(PROMPTS, **kwargs)
    empty = loaded["base"].generate(PROMPTS, ["", ""], **kwargs)
    pipe = _reference(folder, "base")
    ref_kwargs = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32, latents=_nchw(noise),
                      output_type="np")
    ref_zeros = pipe(PROMPTS, **ref_kwargs).images
    ref_empty = pipe(PROMPTS, negative_prompt=["", ""], **ref_kwargs).images
    assert np.abs(zeros - ref_zeros).max() < TOL and np.abs(empty - ref_empty).max() < TOL
    assert np.abs(ref_zeros - ref_empty).max() > 10 * TOL


def _fed_refiner(monkeypatch, posterior=None, noise=None):
    """diffusers' SDXL img2img module, fed our posterior and noise draws."""
    from diffusers.models.autoencoders import vae as diffusers_vae
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    if posterior is not None:
        monkeypatch.setattr(diffusers_vae.DiagonalGaussianDistribution, "sample",
                            lambda self, generator=None: self.mean + self.std * _nchw(posterior))
    if noise is not None:
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: _nchw(noise))


def test_refiner_img2img_matches_diffusers(sdxl_checkpoints, loaded, monkeypatch):
    """The refiner (text_encoder_2 only, aesthetic score) at strength 0.6 from an image."""
    from sdjax.conditioning import MicroConditioning
    from sdjax.pipeline import initial_noise

    folder = sdxl_checkpoints["refiner"][0]
    seeds = [7, 8]
    init = np.random.default_rng(3).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    micro = MicroConditioning(aesthetic_score=7.5)
    negative = MicroConditioning(aesthetic_score=1.5)
    ours = loaded["refiner"].generate(PROMPTS, NEGATIVE, num_steps=10, guidance_scale=5.0, height=32, width=32,
                                      seed=seeds, init_image=init, strength=0.6, micro=micro,
                                      negative_micro=negative)
    _fed_refiner(monkeypatch, initial_noise(seeds, (16, 16, 4), "posterior"), initial_noise(seeds, (16, 16, 4)))
    pipe = _reference(folder, "refiner")
    kwargs = dict(image=_nchw(init), negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0,
                  strength=0.6, output_type="np")
    ref = pipe(PROMPTS, aesthetic_score=7.5, negative_aesthetic_score=1.5, **kwargs).images
    assert np.abs(ours - ref).max() < TOL
    moved = pipe(PROMPTS, aesthetic_score=2.0, negative_aesthetic_score=1.5, **kwargs).images
    assert np.abs(moved - ref).max() > 10 * TOL


def test_base_to_refiner_hand_off_matches_diffusers(sdxl_checkpoints, loaded, monkeypatch):
    """denoising_end 0.8 on the base (latents out), denoising_start 0.8 on the refiner (no noise added)."""
    from sdjax.pipeline import initial_noise

    base_folder, refiner_folder = sdxl_checkpoints["base"][0], sdxl_checkpoints["refiner"][0]
    noise = initial_noise([31, 32], (16, 16, 4))
    latents = loaded["base"].generate(PROMPTS, NEGATIVE, num_steps=10, guidance_scale=5.0, height=32, width=32,
                                      seed=31, latents=noise, denoising_end=0.8, output="latents")
    ours = loaded["refiner"].generate(PROMPTS, NEGATIVE, num_steps=10, guidance_scale=5.0, height=32, width=32,
                                      seed=31, init_latents=latents, denoising_start=0.8)
    ref_latents = _reference(base_folder, "base")(
        PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0, height=32, width=32,
        latents=_nchw(noise), denoising_end=0.8, output_type="latent").images
    assert np.abs(latents - ref_latents.permute(0, 2, 3, 1).numpy()).max() < 1e-3
    ref = _reference(refiner_folder, "refiner")(
        PROMPTS, image=ref_latents, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0,
        denoising_start=0.8, output_type="np").images
    assert np.abs(ours - ref).max() < TOL


def test_sdxl_sampling_bad_input(loaded):
    from sdjax.conditioning import MicroConditioning

    base, refiner = loaded["base"], loaded["refiner"]
    kwargs = dict(num_steps=4, height=32, width=32)
    with pytest.raises(ValueError, match=r"original_size: expected a pair of positive integers"):
        base.generate(PROMPTS, micro=MicroConditioning(original_size=(0, 64)), **kwargs)
    with pytest.raises(ValueError, match=r"negative_crops_coords_top_left: expected a pair of non-negative"):
        base.generate(PROMPTS, negative_micro=MicroConditioning(crops_coords_top_left=(-1, 0)), **kwargs)
    with pytest.raises(ValueError, match=r"denoising_end must be in \(0, 1\), got 1.0"):
        base.generate(PROMPTS, denoising_end=1.0, **kwargs)
    with pytest.raises(ValueError, match=r"denoising_start given without init_latents"):
        refiner.generate(PROMPTS, denoising_start=0.5, **kwargs)
    with pytest.raises(ValueError, match=r"init_latents has shape \(2, 8, 8, 4\); expected \(2, 16, 16, 4\)"):
        refiner.generate(PROMPTS, init_latents=np.zeros((2, 8, 8, 4)), num_steps=4, height=32, width=32)


@pytest.mark.parametrize("name,strength", [("euler", 0.75), ("ddim", 1.0)])
def test_inpainting_matches_diffusers(sdxl_checkpoints, loaded, name, strength, monkeypatch):
    """The base model inpaints with its 4-channel UNet: the kept region is re-noised and blended back."""
    import diffusers
    from diffusers.models.autoencoders import vae as diffusers_vae
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as module
    from sdjax.pipeline import initial_noise

    seeds = [41, 42]
    rng = np.random.default_rng(9)
    init = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((2, 32, 32), np.float32)
    mask[0, 8:24, 4:20] = 1
    mask[1, :16] = 1
    ours = loaded["base"].generate(PROMPTS, NEGATIVE, num_steps=8, guidance_scale=5.0, scheduler=name, height=32,
                                   width=32, seed=seeds, init_image=init, mask=mask, strength=strength)
    posterior = initial_noise(seeds, (16, 16, 4), "posterior")
    draws = iter([posterior, posterior])  # the init image, then the masked image (which this UNet ignores)
    monkeypatch.setattr(diffusers_vae.DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean + self.std * _nchw(next(draws)))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: _nchw(initial_noise(seeds, (16, 16, 4))))
    pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_checkpoints["base"][0])
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name][0]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, image=_nchw(init), mask_image=torch.from_numpy(mask[:, None]), negative_prompt=NEGATIVE,
               num_inference_steps=8, guidance_scale=5.0, strength=strength, height=32, width=32,
               output_type="np").images
    assert next(draws, None) is None, "the reference drew fewer posterior samples than expected"
    assert np.abs(ours - ref).max() < TOL
