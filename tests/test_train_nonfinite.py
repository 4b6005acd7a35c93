"""A run never writes non-finite results: config numbers refused before any compile, and the checks
that refuse to checkpoint or export a state with non-finite values (in-process; the end-to-end runs
are in tests/test_train.py)."""

import jax
import jax.numpy as jnp
import pytest

from sdjax.train.checkpoint import Checkpoints
from sdjax.train.config import apply_overrides, base_config
from sdjax.train.loop import TrainingError, export, refuse_non_finite, refuse_untrained, train
from sdjax.train.optimizer import AdamWState
from sdjax.train.step import TrainState

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("override,message", [
    ({"optimizer.learning_rate": NAN}, "optimizer.learning_rate must be a finite number > 0, got nan"),
    ({"optimizer.learning_rate": 0.0}, "optimizer.learning_rate must be a finite number > 0, got 0.0"),
    ({"optimizer.eps": 0.0}, "optimizer.eps must be a finite number > 0, got 0.0"),
    ({"optimizer.b2": 1.0}, "optimizer.b2 must be a finite number in [0, 1), got 1.0"),
    ({"optimizer.ema_decay": 1.0}, "optimizer.ema_decay must be a finite number in [0, 1) (0: no EMA), got 1.0"),
    ({"optimizer.grad_clip_norm": INF}, "optimizer.grad_clip_norm must be a finite number >= 0 (0: no clipping), "
                                        "got inf"),
    ({"optimizer.max_bad_steps": 0}, "optimizer.max_bad_steps must be a finite number >= 1, got 0"),
    ({"loss.kl_weight": -1.0}, "loss.kl_weight must be a finite number >= 0, got -1.0"),
    ({"grad_accum_steps": 0}, "grad_accum_steps must be a finite number >= 1, got 0"),
    ({"seed": -1}, "seed must be a finite number in [0, 2**64), got -1"),
    ({"seed": 2**64}, "seed must be a finite number in [0, 2**64), got 18446744073709551616"),
    # keys without bounds of their own: every float in the config must be finite
    ({"log.preview_guidance": INF}, "log.preview_guidance must be a finite number, got inf"),
    ({"data.caption_dropout": NAN}, "data.caption_dropout must be a finite number, got nan"),
])
def test_bad_numbers_are_refused_before_any_compile(tmp_path, monkeypatch, override, message):
    compiles = []
    listener = lambda event, seconds, **kwargs: compiles.append(event) if "compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)

    def no_jit(*args, **kwargs):
        raise AssertionError("jax.jit was called before the config was checked")

    monkeypatch.setattr(jax, "jit", no_jit)
    workdir = tmp_path / "run"
    try:
        with pytest.raises(ValueError) as info:
            train(apply_overrides(base_config(), override), str(workdir))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert str(info.value) == message
    assert compiles == [] and not workdir.exists()


def _state(step=4, count=1, ema_value=1.0, mu_value=0.0):
    params = {"unet": {"conv_in": {"bias": jnp.ones(3)}, "out": {"kernel": jnp.ones((2, 2))}}}
    ema = jax.tree.map(lambda x: jnp.full_like(x, ema_value), params)
    ema["unet"]["out"]["kernel"] = ema["unet"]["out"]["kernel"].at[1, 0].set(ema_value)
    moments = jax.tree.map(lambda x: jnp.full_like(x, mu_value), params)
    return TrainState(step=jnp.int32(step), params=params,
                      opt_state=AdamWState(count=jnp.int32(count), mu=moments, nu=jax.tree.map(jnp.zeros_like, params)),
                      ema=ema, rng=jnp.zeros(2, jnp.uint32), bad_steps=jnp.int32(0))


class RecordingTask:
    def __init__(self):
        self.exported = []

    def export(self, params, folder):
        self.exported.append(folder)


def test_export_of_a_non_finite_ema_is_refused(tmp_path):
    checkpoints = Checkpoints(str(tmp_path / "run"), base_config().checkpoint)
    task, folder = RecordingTask(), str(tmp_path / "run" / "export")
    try:
        with pytest.raises(TrainingError) as info:
            export(task, _state(ema_value=NAN), folder, checkpoints)
        assert str(info.value) == ("step 4: non-finite EMA of unet (first at unet/conv_in/bias): not exported; "
                                   "no checkpoint was written: the run has no good state")
        checkpoints.save(_state(step=3), {"position": 3}, {"model": 1})
        with pytest.raises(TrainingError, match=r"step 4: non-finite Adam first moment of unet \(first at "
                                                r"unet/conv_in/bias\): not saved; the last checkpoint \(step 3\) "
                                                r"is intact$"):
            refuse_non_finite(_state(mu_value=INF), checkpoints, "saved")
        assert task.exported == []
        export(task, _state(), folder, checkpoints)  # a finite state is written
        assert task.exported == [folder]
    finally:
        checkpoints.close()


def test_non_finite_leaf_is_named_by_its_path(tmp_path):
    state = _state()
    state.params["unet"]["out"]["kernel"] = state.params["unet"]["out"]["kernel"].at[1, 1].set(NAN)
    checkpoints = Checkpoints(str(tmp_path / "run"), base_config().checkpoint)
    try:
        with pytest.raises(TrainingError, match=r"^step 4: non-finite params of unet \(first at unet/out/kernel\)"):
            refuse_non_finite(state, checkpoints, "saved")
    finally:
        checkpoints.close()


def test_a_run_that_applied_no_update_is_refused():
    with pytest.raises(TrainingError, match=r"^step 4: no update was applied in 4 steps"):
        refuse_untrained(_state(step=4, count=0))
    refuse_untrained(_state(step=4, count=1))
    refuse_untrained(_state(step=0, count=0))  # nothing ran yet: nothing to refuse


def test_run_seeds_are_64_bit():
    """A run's seed keeps its key below 2**32 (runs and checkpoints of earlier versions replay exactly)
    and gives seeds that differ only above bit 32 their own model draws and data order."""
    from sdjax.data.pipeline import _derived_seed
    from sdjax.train.optimizer import make_optimizer
    from sdjax.train.step import init_state

    config = base_config()
    tx = make_optimizer(config.optimizer, config.total_steps)
    rng = lambda seed: init_state({"unet": {}}, ("unet",), apply_overrides(config, {"seed": seed}), tx).rng.tolist()
    assert rng(7) == jax.random.key_data(jax.random.key(7)).tolist()
    assert rng(2**32) == [1, 0] and rng(2**32) != rng(0)
    assert _derived_seed(7, 1) == 369571992  # what the 32-bit form gave: data orders of earlier runs kept
    assert _derived_seed(2**32, 0) != _derived_seed(0, 0)
