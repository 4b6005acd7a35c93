"""Euler, Euler ancestral, Heun, DPM-Solver++ 2M and UniPC against diffusers' PyTorch schedulers.

Every case runs our jitted lax.scan loop and the reference loop from the same noise with the same
stand-in model (stochastic steps share their noise) and compares the final samples.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, UniPCMultistepScheduler)

from scheduler_harness import SD_CONFIG, rel_err, run_both
from sdjax.schedulers import SCHEDULERS, make_scheduler, scheduler_name

TOL = 1e-5  # relative to the largest magnitude of the reference result, float32

FAMILIES = {
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
PREDICTIONS = [(name, p) for name in FAMILIES for p in ("epsilon", "v_prediction", "sample")
               if (name, p) != ("euler_ancestral", "sample")]  # diffusers' ancestral Euler has no "sample"
RESCALES = ["euler", "euler_ancestral", "dpmpp_2m", "unipc"]  # Heun has no rescale_betas_zero_snr


def check(name: str, config: dict, num_steps: int, tol: float = TOL, **kwargs) -> float:
    ours, ref = run_both(FAMILIES[name], config, num_steps, name, **kwargs)
    err = rel_err(ours, ref)
    assert np.isfinite(ref).all() and err < tol, err
    return err


@pytest.mark.parametrize("name,prediction_type", PREDICTIONS)
def test_matches_reference(name, prediction_type):
    check(name, dict(SD_CONFIG, prediction_type=prediction_type), 8)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_spacings(name, spacing):
    check(name, dict(SD_CONFIG, timestep_spacing=spacing, beta_schedule="linear", beta_end=0.02), 6)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", RESCALES)
def test_zero_terminal_snr(name, spacing):
    # Zero-SNR rescaling cancels sqrt(alpha_bar) against its last value, which turns torch's one-ulp
    # float32 sqrt errors (it is not correctly rounded) into ~2e-5 relative differences of the sigmas
    # near t = 999. Linspace/trailing schedules then start at sigma ~ 4096, where Euler's first step
    # cancels |x| ~ 1.6e4 down to ~1e2 and amplifies them: the float32 reference is itself only good
    # to a few 1e-5 there (measured 5e-5 / 4e-5); with well-conditioned steps every other case is < 1e-5.
    tol = 1e-4 if (name, spacing) in {("euler", "linspace"), ("euler", "trailing")} else TOL
    config = dict(SD_CONFIG, timestep_spacing=spacing, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    check(name, config, 6, tol=tol)


@pytest.mark.parametrize("name,extra", [
    ("euler", {}),
    ("euler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "leading"}),
    ("euler", {"sigma_min": 0.1, "sigma_max": 10.0, "prediction_type": "v_prediction"}),
    ("heun", {"timestep_spacing": "trailing"}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"}),
    ("unipc", {}),
    ("unipc", {"final_sigmas_type": "sigma_min"}),
])
def test_karras_sigmas(name, extra):
    check(name, dict(SD_CONFIG, use_karras_sigmas=True, **extra), 7)


@pytest.mark.parametrize("extra,steps", [
    ({"solver_order": 1}, 6),
    ({"solver_type": "heun"}, 6),
    ({"final_sigmas_type": "sigma_min", "lower_order_final": False}, 6),  # second-order last step
    ({"final_sigmas_type": "sigma_min"}, 16),  # >= 15 steps: no lower-order final step
    ({"final_sigmas_type": "sigma_min", "euler_at_final": True}, 16),
    ({"algorithm_type": "deis", "final_sigmas_type": "sigma_min"}, 6),  # the reference maps deis onto dpmsolver++
    ({"lambda_min_clipped": -2.0, "timestep_spacing": "trailing"}, 6),
    ({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 6),
])
def test_dpm_solver_options(extra, steps):
    check("dpmpp_2m", dict(SD_CONFIG, **extra), steps)


@pytest.mark.parametrize("extra", [
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"predict_x0": False, "final_sigmas_type": "sigma_min"},
    {"solver_order": 1},
    {"disable_corrector": [0, 2]},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False},
])
def test_unipc_options(extra):
    check("unipc", dict(SD_CONFIG, **extra), 6)


def test_unipc_bh1_last_step_to_zero_is_finite():
    """diffusers' bh1 multiplies B_h = -inf by a zero residual on the last step to sigma 0 (NaN); ours is x0."""
    ours, ref = run_both(UniPCMultistepScheduler, dict(SD_CONFIG, solver_type="bh1"), 6, "unipc")
    assert np.isnan(ref).all() and np.isfinite(ours).all()


def test_euler_churn_noise():
    churn = {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 8.0}
    config = dict(SD_CONFIG, prediction_type="v_prediction")
    check("euler", config, 8, step_kwargs=churn, options=churn)
    plain, _ = run_both(EulerDiscreteScheduler, config, 8, "euler")
    churned, _ = run_both(EulerDiscreteScheduler, config, 8, "euler", options=churn)
    assert np.abs(plain - churned).max() > 1e-2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_img2img_start(name):
    """Starting mid-schedule: multistep solvers must begin at first order, Heun on a first-order half."""
    steps = 8
    start = 3 * make_scheduler(name, SD_CONFIG, steps).order
    check(name, dict(SD_CONFIG, use_karras_sigmas=name != "euler_ancestral"), steps, start=start)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_add_noise(name, spacing):
    config = dict(SD_CONFIG, timestep_spacing=spacing, use_karras_sigmas=name in ("dpmpp_2m", "unipc"))
    ours = make_scheduler(name, config, 5)
    ref = FAMILIES[name].from_config(config)
    ref.set_timesteps(5)
    rng = np.random.default_rng(0)
    original, noise = (rng.standard_normal((2, 8, 8, 4)).astype(np.float32) for _ in range(2))
    for i in range(len(ours.timesteps)):
        expected = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), ref.timesteps[i:i + 1])
        got = ours.add_noise(jnp.asarray(original), jnp.asarray(noise), i)
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_registry_and_family_defaults():
    for name, cls in FAMILIES.items():
        assert name in SCHEDULERS and scheduler_name({"_class_name": cls.__name__}) == name
    # A config without the keys takes each class's own defaults (Heun: betas from 0.00085; all: linspace).
    check("heun", {"beta_schedule": "scaled_linear"}, 4)
    check("dpmpp_2m", {"beta_schedule": "scaled_linear", "_class_name": "PNDMScheduler"}, 4)


def test_step_is_jittable():
    sched = make_scheduler("unipc", SD_CONFIG, 4)
    x = jnp.ones((1, 4, 4, 4))
    state, prev = jax.jit(sched.step)(sched.init(x), x * 0.1, jnp.int32(1), x, None)
    assert prev.shape == x.shape and jnp.isfinite(prev).all()


@pytest.mark.parametrize("name,extra,key", [
    ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpmpp_2m", {"solver_order": 3}, "solver_order"),
    ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("dpmpp_2m", {"algorithm_type": "deis"}, "final_sigmas_type"),
    ("unipc", {"predict_x0": False}, "final_sigmas_type"),
    ("unipc", {"solver_order": 3}, "solver_order"),
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler_ancestral", {"prediction_type": "sample"}, "prediction_type"),
])
def test_unsupported_options_raise(name, extra, key):
    with pytest.raises(ValueError, match=key):
        make_scheduler(name, dict(SD_CONFIG, **extra), 4)
