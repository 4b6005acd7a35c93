"""DDPM, PNDM (PLMS and PRK warm-up) and LMS against diffusers' PyTorch schedulers."""

import jax
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")
from diffusers import DDPMScheduler, LMSDiscreteScheduler, PNDMScheduler

from scheduler_harness import SD_CONFIG, rel_err, run_both
from sdjax.schedulers import make_scheduler

TOL = 1e-5  # relative to the largest magnitude of the reference result, float32
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SPACINGS = ["leading", "linspace", "trailing"]


# --- DDPM (stochastic: the harness feeds both sides the same per-step noise) ---

@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_ddpm_matches_reference(prediction_type, variance_type):
    config = dict(SD_CONFIG, prediction_type=prediction_type, variance_type=variance_type)
    ours, ref = run_both(DDPMScheduler, config, 10, "ddpm")
    assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddpm_spacings_and_options(spacing):
    # Leaving clip_sample out checks DDPM's own default (True) is used, as diffusers does.
    config = dict(SD_CONFIG, timestep_spacing=spacing, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    del config["clip_sample"]
    ours, ref = run_both(DDPMScheduler, config, 7, "ddpm")
    assert rel_err(ours, ref) < TOL


def test_ddpm_cosine_schedule():
    config = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=0.5)
    ours, ref = run_both(DDPMScheduler, config, 6, "ddpm")
    assert rel_err(ours, ref) < TOL


# --- PNDM ---

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_matches_reference(prediction_type, skip_prk_steps):
    config = dict(SD_CONFIG, prediction_type=prediction_type, skip_prk_steps=skip_prk_steps)
    ours, ref = run_both(PNDMScheduler, config, 10, "pndm")
    assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_spacings_and_options(spacing, skip_prk_steps):
    config = dict(SD_CONFIG, timestep_spacing=spacing, set_alpha_to_one=True, skip_prk_steps=skip_prk_steps)
    ours, ref = run_both(PNDMScheduler, config, 6, "pndm")
    assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_cosine_schedule(skip_prk_steps):
    # Leading spacing: with the cosine schedule, t near 999 has alpha_bar ~ 0 and the sample blows up to ~1e4,
    # where the stand-in model's sin(x) turns float32 rounding into O(1) differences.
    config = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", steps_offset=1,
                  skip_prk_steps=skip_prk_steps)
    ours, ref = run_both(PNDMScheduler, config, 6, "pndm")
    assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_pndm_plms_few_steps(num_steps):
    config = dict(SD_CONFIG, skip_prk_steps=True)
    ours, ref = run_both(PNDMScheduler, config, num_steps, "pndm")
    assert rel_err(ours, ref) < TOL


def test_pndm_rejects_unsupported():
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("pndm", dict(SD_CONFIG, prediction_type="sample"), 10)
    with pytest.raises(ValueError, match="skip_prk_steps"):
        make_scheduler("pndm", dict(SD_CONFIG, skip_prk_steps=False), 3)


# --- LMS ---

@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_lms_matches_reference(prediction_type):
    config = dict(SD_CONFIG, prediction_type=prediction_type)
    ours, ref = run_both(LMSDiscreteScheduler, config, 10, "lms")
    assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("spacing", SPACINGS + [None])  # None: LMS's own default, linspace
@pytest.mark.parametrize("respacing", [None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_lms_spacings_and_sigmas(spacing, respacing):
    config = dict(SD_CONFIG, prediction_type="v_prediction")
    if spacing:
        config["timestep_spacing"] = spacing
    if respacing:
        config[respacing] = True
    ours, ref = run_both(LMSDiscreteScheduler, config, 7, "lms")
    assert rel_err(ours, ref) < TOL


def test_lms_order_option():
    ours, ref = run_both(LMSDiscreteScheduler, dict(SD_CONFIG), 6, "lms", step_kwargs={"order": 2},
                         options={"lms_order": 2})
    assert rel_err(ours, ref) < TOL


def test_lms_rejects_two_sigma_schedules():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        make_scheduler("lms", dict(SD_CONFIG, use_karras_sigmas=True, use_beta_sigmas=True), 10)


# --- shared ---

@pytest.mark.parametrize("name, ref_cls, extra", [
    ("ddpm", DDPMScheduler, {}),
    ("pndm", PNDMScheduler, {"skip_prk_steps": True}),
    ("pndm", PNDMScheduler, {"skip_prk_steps": False}),
    ("lms", LMSDiscreteScheduler, {}),
    ("lms", LMSDiscreteScheduler, {"use_karras_sigmas": True, "timestep_spacing": "leading"}),
])
def test_add_noise_matches_reference(name, ref_cls, extra):
    config = dict(SD_CONFIG, **extra)
    ours = make_scheduler(name, config, 8)
    ref = ref_cls.from_config(config)
    ref.set_timesteps(8)
    original, noise = np.random.default_rng(0).standard_normal((2, 2, 4, 4, 4)).astype(np.float32)
    for i in (0, 3, len(ours.timesteps) - 1):
        got = np.asarray(ours.add_noise(jax.numpy.asarray(original), jax.numpy.asarray(noise), i))
        want = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), ref.timesteps[i:i + 1]).numpy()
        assert rel_err(got, want) < 1e-6, i


@pytest.mark.parametrize("class_name, name", [("DDPMScheduler", "ddpm"), ("PNDMScheduler", "pndm"),
                                              ("LMSDiscreteScheduler", "lms")])
def test_registry_picks_family_from_class_name(class_name, name):
    from sdjax.schedulers import SCHEDULERS

    sched = make_scheduler(None, dict(SD_CONFIG, _class_name=class_name), 5)
    assert isinstance(sched, SCHEDULERS[name][0])


def test_ddpm_rejects_unsupported_variance():
    for variance_type in ("fixed_large_log", "learned", "learned_range"):
        with pytest.raises(ValueError, match="variance_type"):
            make_scheduler("ddpm", dict(SD_CONFIG, variance_type=variance_type), 10)


@pytest.mark.parametrize("name, ref_cls, extra", [
    ("ddpm", DDPMScheduler, {}),
    ("pndm", PNDMScheduler, {"skip_prk_steps": True}),
    ("pndm", PNDMScheduler, {"skip_prk_steps": True, "timestep_spacing": "trailing"}),
    ("lms", LMSDiscreteScheduler, {}),
])
@pytest.mark.parametrize("start", [1, 4])
def test_partial_schedule_matches_reference(name, ref_cls, extra, start):
    # img2img starts mid-schedule; the reference's PNDM restarts its warm-up there (counter = 0), LMS its
    # derivative history.
    ours, ref = run_both(ref_cls, dict(SD_CONFIG, **extra), 10, name, start=start)
    assert rel_err(ours, ref) < TOL
