"""The pure train step and its loss pieces, in-process on the tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sdjax
from sdjax.train.build import build_model, initial_params
from sdjax.train.config import apply_overrides, base_config, check_keys
from sdjax.train.loss import min_snr_weights, prediction_target
from sdjax.train.optimizer import learning_rate_schedule, make_optimizer
from sdjax.train.objectives import Objective
from sdjax.train.step import ema_decay, init_state, make_step, make_train_step
from sdjax.train.tasks import unet as unet_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = base_config()
    config.batch_size = 4
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = 1e-3
    model = build_model(config.model, str(tmp_path_factory.mktemp("tiny"))).model
    sd = sdjax.StableDiffusion(model, initial_params(dict(model.networks), 0))
    rng = np.random.default_rng(0)
    batch = {"pixels": jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)),
             "input_ids": jnp.asarray(sd.tokenize(["a red circle", "", "a blue square", "x"])["input_ids"])}
    return config, sd, batch


def _step(config, sd, batch, steps=1):
    tx = make_optimizer(config.optimizer, config.total_steps)
    state = init_state(dict(sd.params), unet_task.trained(config, sd.model), config, tx)
    step = jax.jit(make_train_step(sd.model, config, tx))
    for _ in range(steps):
        state, metrics = step(state, batch)
    return state, metrics


def test_gradient_accumulation_matches_one_big_batch(setup):
    """Scanned micro-batches see the same per-image randomness as one batch: the same loss and update."""
    config, sd, batch = setup
    one, m1 = _step(config, sd, batch)
    two, m2 = _step(apply_overrides(config, {"grad_accum_steps": 2}), sd, batch)
    assert np.isfinite(float(m1["loss"]))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
    # Adam's first update is ~lr * sign(g): a parameter whose gradient is near 0 can move by up to one
    # step (lr) either way under a different summation order, so bound every difference by 2 lr and
    # require all but a handful (< 0.1%) to agree at 1e-5; a wrong accumulation moves most of them, and
    # it already shows in the loss and gradient norm checked above.
    lr = config.optimizer.learning_rate
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                           for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params))])
    assert diff.max() <= 2 * lr + 1e-6 and np.mean(diff > 1e-5) < 1e-3, (diff.max(), np.mean(diff > 1e-5))


@pytest.mark.compat
@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_fused_adamw_matches_optax(clip):
    """The fused update equals optax.chain(clip_by_global_norm, adamw) and a plain EMA, steps with and
    without clipping (gradient norms ~0.4 and ~20 against a clip norm of 1)."""
    opt = base_config().optimizer
    opt.warmup_steps, opt.learning_rate, opt.weight_decay, opt.grad_clip_norm = 2, 1e-2, 0.1, clip
    rng = np.random.default_rng(0)
    draw = lambda scale: {"a": jnp.asarray(scale * rng.normal(size=(3, 4)), jnp.float32),
                          "b": {"c": jnp.asarray(scale * rng.normal(size=(5,)), jnp.float32)}}
    params = draw(1.0)
    ours = make_optimizer(opt, 10)
    adamw = optax.adamw(learning_rate_schedule(opt, 10), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay)
    ref = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw
    state, ref_state, p, ref_p, ema, ref_ema = ours.init(params), ref.init(params), params, params, params, params
    for scale in (0.1, 5.0, 0.1, 5.0):
        grads = draw(scale)
        p, state, ema, applied = ours.apply(grads, optax.global_norm(grads), state, p, ema, jnp.float32(0.9),
                                            jnp.bool_(True))
        assert bool(applied)
        updates, ref_state = ref.update(grads, ref_state, ref_p)
        ref_p = optax.apply_updates(ref_p, updates)
        ref_ema = jax.tree.map(lambda e, q: 0.9 * e + 0.1 * q, ref_ema, ref_p)
    adam = ref_state[1][0] if clip else ref_state[0]
    assert int(state.count) == int(adam.count) == 4
    for got, want in ((p, ref_p), (state.mu, adam.mu), (state.nu, adam.nu), (ema, ref_ema)):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(p["a"] - params["a"]))) > 1e-3  # the parameters did move


def _assert_skipped(step, state, batch, steps=2):
    """`steps` calls of `step` on `batch` leave params, EMA and optimizer state bitwise unchanged and
    count as bad steps. Returns (state, last metrics)."""
    before = jax.tree.map(np.asarray, (state.params, state.ema, state.opt_state))
    for _ in range(steps):
        state, metrics = step(state, batch)
    assert int(state.step) == steps and int(state.bad_steps) == steps and float(metrics["finite"]) == 0
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.ema, state.opt_state))):
        np.testing.assert_array_equal(x, np.asarray(y))
    return state, metrics


def test_non_finite_loss_skips_the_update(setup):
    config, sd, batch = setup
    bad = dict(batch, pixels=batch["pixels"].at[0, 0, 0, 0].set(jnp.nan))
    tx = make_optimizer(config.optimizer, config.total_steps)
    step = jax.jit(make_train_step(sd.model, config, tx))
    state, metrics = _assert_skipped(step, init_state(dict(sd.params), ("unet",), config, tx), bad)
    assert not np.isfinite(float(metrics["loss"]))
    state, metrics = step(state, batch)
    assert int(state.bad_steps) == 0 and float(metrics["finite"]) == 1


def _linear_run(learning_rate: float):
    """(state, jitted step) of a "unet" that is one 3x2 matrix under a squared loss: the generic step
    and optimizer as a run uses them, compiled in a moment."""
    config = apply_overrides(base_config(), {"optimizer.learning_rate": learning_rate, "optimizer.warmup_steps": 0})
    objective = Objective(draws=lambda key, batch: {},
                          loss=lambda params, batch, rand: jnp.mean(jnp.square(batch["x"] @ params["unet"]["w"])))
    tx = make_optimizer(config.optimizer, config.total_steps)
    params = {"unet": {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)}}
    return init_state(params, ("unet",), config, tx), jax.jit(make_step(objective, config, tx))


@pytest.mark.compat
def test_non_finite_learning_rate_skips_the_update():
    """A NaN learning rate leaves the loss and gradient finite; the update itself must be refused."""
    batch = {"x": jnp.ones((4, 3))}
    state, step = _linear_run(float("nan"))
    _, metrics = _assert_skipped(step, state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    state, step = _linear_run(1e-3)  # the same step with a finite rate does move everything
    moved, metrics = step(state, batch)
    assert float(metrics["finite"]) == 1 and int(moved.opt_state.count) == 1
    for before, after in zip(jax.tree.leaves((state.params, state.ema)), jax.tree.leaves((moved.params, moved.ema))):
        assert float(jnp.abs(after - before).min()) > 0


@pytest.mark.compat
def test_min_snr_weights_and_targets():
    abar = jnp.asarray(np.linspace(0.999, 0.001, 1000, dtype=np.float32))
    t = jnp.asarray([0, 500, 999])
    snr = np.asarray(abar[t] / (1 - abar[t]))
    np.testing.assert_allclose(min_snr_weights(t, abar, 5.0, "epsilon"), np.minimum(snr, 5) / snr, rtol=1e-6)
    np.testing.assert_allclose(min_snr_weights(t, abar, 5.0, "v_prediction"), np.minimum(snr, 5) / (snr + 1),
                               rtol=1e-6)
    np.testing.assert_array_equal(min_snr_weights(t, abar, 0.0, "epsilon"), np.ones(3))
    x0, noise = jnp.ones((3, 2, 2, 1)), 2 * jnp.ones((3, 2, 2, 1))
    v = prediction_target(x0, noise, t, abar, "v_prediction")
    a = np.sqrt(np.asarray(abar[t]))[:, None, None, None]
    np.testing.assert_allclose(v, np.broadcast_to(a * 2 - np.sqrt(1 - a ** 2), v.shape), rtol=1e-5)
    with pytest.raises(ValueError, match="prediction_type 'x'"):
        prediction_target(x0, noise, t, abar, "x")


@pytest.mark.compat
def test_schedule_and_ema_decay():
    config = base_config()
    config.optimizer.warmup_steps = 10
    lr = learning_rate_schedule(config.optimizer, 100)
    assert float(lr(0)) == 0 and abs(float(lr(10)) - 1e-4) < 1e-9 and float(lr(100)) < 1e-9
    config.optimizer.schedule = "constant"
    lr = learning_rate_schedule(config.optimizer, 100)
    assert abs(float(lr(5)) - 5e-5) < 1e-9 and abs(float(lr(90)) - 1e-4) < 1e-9
    config.optimizer.schedule = "linear"
    with pytest.raises(ValueError, match="optimizer.schedule 'linear' is unknown"):
        learning_rate_schedule(config.optimizer, 100)
    assert float(ema_decay(jnp.int32(0), 0.999)) == pytest.approx(0.1)
    assert float(ema_decay(jnp.int32(10 ** 6), 0.999)) == pytest.approx(0.999)


@pytest.mark.compat
def test_unknown_keys_are_errors():
    config = base_config()
    config.unlock()
    config.optimizer.lr = 1.0
    with pytest.raises(ValueError, match="unknown config key 'optimizer.lr'"):
        check_keys(config)
    with pytest.raises(ValueError, match="unknown config key 'rate'"):
        apply_overrides(base_config(), {"optimizer.rate": 1})


def test_text_encoder_can_be_trained(setup):
    config, sd, batch = setup
    config = apply_overrides(config, {"model.train_text_encoder": True})
    state, metrics = _step(config, sd, batch)
    assert set(state.params) == {"unet", "text_encoder"} and set(state.frozen) == {"vae"}
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params["text_encoder"]),
                                                          jax.tree.leaves(sd.params["text_encoder"]))]
    assert max(moved) > 0
