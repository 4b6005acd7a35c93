"""DDIM against diffusers' DDIMScheduler (eta adds its noise; every prediction type and spacing)."""

import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")
from diffusers import DDIMScheduler

from scheduler_harness import SD_CONFIG, rel_err, run_both

TOL = 1e-5  # relative to the largest magnitude of the reference result, float32


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim_matches_reference(prediction_type, eta):
    config = dict(SD_CONFIG, prediction_type=prediction_type)
    ours, ref = run_both(DDIMScheduler, config, 12, "ddim", step_kwargs={"eta": eta}, options={"eta": eta})
    assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_ddim_spacings_and_options(spacing):
    config = dict(SD_CONFIG, timestep_spacing=spacing, clip_sample=True, rescale_betas_zero_snr=True,
                  prediction_type="v_prediction", set_alpha_to_one=True)
    ours, ref = run_both(DDIMScheduler, config, 7, "ddim")
    assert rel_err(ours, ref) < TOL


def test_ddim_eta_noise_changes_result():
    config = dict(SD_CONFIG)
    plain, _ = run_both(DDIMScheduler, config, 5, "ddim")
    noisy, _ = run_both(DDIMScheduler, config, 5, "ddim", step_kwargs={"eta": 1.0}, options={"eta": 1.0})
    assert abs(plain - noisy).max() > 1e-2
