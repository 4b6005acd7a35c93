"""The training loop: task -> restore or init -> [batch -> train_step -> log / preview / checkpoint]
-> evaluate -> export. The task (sdjax.train.tasks) says what is trained: the UNet, the VAE or CLIP.

Preemption safety: every step's randomness is fold_in(seed, step) and the data order is a function
of the data seed and position, so restarting from a checkpoint (which holds the iterator's
position) replays exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdjax import storage
from sdjax.data.pipeline import make_iterator
from sdjax.data.source import make_source
from sdjax.data.preprocess import unreadable_images_skipped
from sdjax.flops import compiled_flops, counts_short, measured_peak_flops, traced_flops
from sdjax.host_memory import release_freed_heap
from sdjax.models.layers import single_cpu_device
from sdjax.parallel import activate, batch_divisor, global_batch, make_mesh, sync_processes, to_host
from sdjax.pipeline import SamplingError
from sdjax.seeds import SEED_LIMIT
from sdjax.train import faults
from sdjax.train.checkpoint import Checkpoints
from sdjax.train.config import check_keys
from sdjax.train.metrics_writer import MetricWriter
from sdjax.train.optimizer import make_optimizer
from sdjax.train.progress import Progress
from sdjax.train.placement import create_state, replicated
from sdjax.train.step import TrainState, make_step
from sdjax.train.tasks import Task, build_task, task_module


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact."""


# Bounds beyond being finite (every float value must be), as (key, bound in words, test). Each stops a
# value that makes the run diverge or mean nothing without an error of its own.
BOUNDS: tuple[tuple[str, str, Callable[[float], bool]], ...] = (
    ("seed", "in [0, 2**64)", lambda x: isinstance(x, int) and 0 <= x < SEED_LIMIT),
    ("grad_accum_steps", ">= 1", lambda x: x >= 1),
    ("optimizer.learning_rate", "> 0", lambda x: x > 0),
    ("optimizer.warmup_steps", ">= 0", lambda x: x >= 0),
    ("optimizer.end_factor", ">= 0", lambda x: x >= 0),
    ("optimizer.b1", "in [0, 1)", lambda x: 0 <= x < 1),
    ("optimizer.b2", "in [0, 1)", lambda x: 0 <= x < 1),
    # optax allows eps = 0, but then a parameter whose gradients were all 0 so far (the embedding of a
    # token no caption used yet) gets the update 0 / 0 = NaN, which no scalar guard in the step sees.
    ("optimizer.eps", "> 0", lambda x: x > 0),
    ("optimizer.weight_decay", ">= 0", lambda x: x >= 0),
    ("optimizer.grad_clip_norm", ">= 0 (0: no clipping)", lambda x: x >= 0),
    ("optimizer.ema_decay", "in [0, 1) (0: no EMA)", lambda x: 0 <= x < 1),
    ("optimizer.max_bad_steps", ">= 1", lambda x: x >= 1),
    ("loss.min_snr_gamma", ">= 0 (0: plain MSE)", lambda x: x >= 0),
    ("loss.offset_noise", ">= 0", lambda x: x >= 0),
    ("loss.l1_weight", ">= 0", lambda x: x >= 0),
    ("loss.l2_weight", ">= 0", lambda x: x >= 0),
    ("loss.kl_weight", ">= 0", lambda x: x >= 0),
)


def _values(value: Any, name: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every value under `value`, into groups, lists and tuples."""
    if isinstance(value, (ml_collections.ConfigDict, dict)):
        for key, item in value.items():
            yield from _values(item, f"{name}.{key}" if name else key)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _values(item, f"{name}[{i}]")
    else:
        yield name, value


def check_numbers(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key whose number is out of BOUNDS, or any float value anywhere
    in `config` that is NaN or infinite."""
    for key, bound, holds in BOUNDS:
        value = config
        for part in key.split("."):
            value = value[part]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and holds(value)):
            raise ValueError(f"{key} must be a finite number {bound}, got {value!r}")
    for key, value in _values(config, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors a run would otherwise hit later, raised before any compute."""
    check_keys(config)
    check_numbers(config)
    task_module(config).check(config)
    if config.lora.rank and config.task != "unet":
        raise ValueError(f"lora.rank: LoRAs are trained by task 'unet', not {config.task!r}")
    check_batch(config, make_mesh(config.mesh))
    if config.total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {config.total_steps}")
    for key in ("every_steps", "keep_last"):
        if config.checkpoint[key] < 1:
            raise ValueError(f"checkpoint.{key} must be >= 1, got {config.checkpoint[key]}")


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
    """The global batch must split into micro-batches that split evenly over the hosts and the mesh."""
    ways, processes = batch_divisor(mesh, config.mesh.rules), jax.process_count()
    if config.batch_size < 1 or config.batch_size % ways:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {ways} ways the mesh "
                         f"{dict(mesh.shape)} splits the batch")
    if config.batch_size % (config.grad_accum_steps * processes * ways):
        raise ValueError(f"batch_size {config.batch_size} is not divisible by grad_accum_steps "
                         f"{config.grad_accum_steps} x processes {processes} x batch ways {ways}: each "
                         "micro-batch must split evenly over the mesh")


@jax.jit
def _finite_leaves(trees: Any) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)])


def non_finite(state: TrainState) -> str:
    """"" when the trained params, their EMA and Adam's moments are all finite, else the first group
    that is not, e.g. "non-finite params of unet (first at unet/conv_in/bias)". One small jitted
    reduction (a flag per leaf), meant for the points where state leaves the device for good."""
    groups = {"params": state.params, "EMA": state.ema, "Adam first moment": state.opt_state.mu,
              "Adam second moment": state.opt_state.nu}
    flags = to_host(_finite_leaves(list(groups.values())))
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(list(groups.values()))[0]]
    for path, finite in zip(paths, flags):
        if not finite:
            group, *keys = path
            names = [str(getattr(k, "key", k)) for k in keys]
            return f"non-finite {list(groups)[group.idx]} of {names[0]} (first at {'/'.join(names)})"
    return ""


def last_good(checkpoints: Checkpoints) -> str:
    """Which checkpoint a failed run leaves to resume from, in words (waits for a save under way)."""
    checkpoints.wait()
    latest = checkpoints.latest_step()
    return (f"the last checkpoint (step {latest}) is intact" if latest is not None
            else "no checkpoint was written: the run has no good state")


def refuse_non_finite(state: TrainState, checkpoints: Checkpoints, action: str) -> None:
    """Raises TrainingError instead of letting `state` be `action` ("saved", "exported") if any trained
    value in it is not finite (see `non_finite`); the step's own guard cannot see every such value."""
    found = non_finite(state)
    if found:
        raise TrainingError(f"step {int(state.step)}: {found}: not {action}; {last_good(checkpoints)}")


def refuse_bad_steps(metrics: dict | None, step: int, limit: int, checkpoints: Checkpoints) -> None:
    """Raises TrainingError if `metrics` (of a step before `step`) count `limit` skipped steps in a row."""
    if metrics is not None and int(metrics["bad_steps"]) >= limit:
        raise TrainingError(f"stopped at step {step}: the loss, gradient or learning rate was non-finite {limit} "
                            f"steps in a row; {last_good(checkpoints)}")


def refuse_untrained(state: TrainState) -> None:
    """Raises TrainingError if steps ran but not one applied an update: such a run has no result."""
    steps, updates = int(state.step), int(state.opt_state.count)
    if steps > 0 and updates == 0:
        raise TrainingError(f"step {steps}: no update was applied in {steps} steps (each one's loss, gradient "
                            "or learning rate was non-finite); nothing exported")


def export(task: Task, state: TrainState, folder: str, checkpoints: Checkpoints) -> None:
    """Writes the EMA weights (with the frozen networks) in the task's layout (every process calls
    this; process 0 writes), or raises TrainingError, writing nothing, if they are not finite.

    Into a bucket: written locally, then uploaded with storage.upload_folder, whose marker keeps a cut-off
    upload from reading as an export (the next run deletes it and exports again)."""
    refuse_non_finite(state, checkpoints, "exported")
    params = to_host({**state.frozen, **state.ema})
    if jax.process_index() != 0:
        return
    if not storage.is_remote(folder):
        task.export(params, folder)
        return
    storage.remove(folder)  # what a cut-off upload left
    with tempfile.TemporaryDirectory(prefix="sdjax-export-") as tmp:
        local = os.path.join(tmp, "export")
        task.export(params, local)
        storage.upload_folder(local, folder, on_marker=lambda: faults.maybe_kill("export", int(state.step)))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    check_config(config)
    storage.makedirs(workdir)
    lead = jax.process_index() == 0
    if lead:  # builds "shapes"/"folder" datasets once; a missing dataset or feature key fails here
        make_source(config.data)
    sync_processes("dataset ready")  # the other hosts open it in make_iterator, once it is built
    task = build_task(config, workdir)
    if task.fit is not None:  # no gradient steps
        if lead:
            task.fit()
        sync_processes("task fitted")
        return {}
    mesh = make_mesh(config.mesh)
    rules = config.mesh.rules
    model_id = task.identity
    checkpoints = Checkpoints(workdir, config.checkpoint)
    latest = checkpoints.latest_step()
    if latest is not None:
        checkpoints.check_model(latest, model_id)
    if lead:
        storage.write_text(storage.join(workdir, "config.json"), config.to_json(indent=2))

    tx = make_optimizer(config.optimizer, config.total_steps)
    state, shardings = create_state(task.networks, task.params, task.trained, config, tx, mesh)
    task = dataclasses.replace(task, params={})  # all parameters now live in the state, whose buffers steps donate
    latents = task.prepare_data(state.frozen) if task.prepare_data else ""
    data = make_iterator(config.data, task.tokenize, global_batch_size=config.batch_size, seed=config.seed,
                         process_index=jax.process_index(), process_count=jax.process_count(), latents=latents)
    if latest is not None:
        state, data_state = checkpoints.restore(latest, state)
        data.set_state(data_state)
        print(f"resumed from {checkpoints.directory} at step {latest}", flush=True)

    train_step = make_step(task.objective, config, tx, shardings.params)
    step_fn = jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, replicated(mesh)))
    batch = global_batch(next(data), mesh, rules)
    with activate(mesh, rules):
        compiled = step_fn.lower(state, batch).compile()
        release_freed_heap()  # the compiler's memory, before the step's buffers are allocated beside it
        # Per device. XLA counts a loop body once: the scanned micro-batch is multiplied in, and on one CPU
        # device, where attention of long sequences loops over query blocks and wide 3x3 convolutions take
        # Winograd's fewer multiplications, a program with either is traced again (seconds) with its kernels
        # in their one-op forms. (On GPU, cuDNN attention is a custom call that the compiled count leaves out.)
        retrace = single_cpu_device() and counts_short(compiled)
        flops_per_step = (traced_flops(train_step, state, batch) if retrace
                          else compiled_flops(compiled)) * config.grad_accum_steps
    peak = measured_peak_flops(config.model.dtype)  # one device's
    schedule = tx.schedule  # the learning rate logged is the one the update uses

    writer = MetricWriter(storage.join(workdir, "logs"), enabled=lead)
    progress = Progress(config.total_steps, int(state.step), enabled=lead and config.log.progress_bar)
    # Hosts compile in their own time and process 0 did more on the way: the first step's collectives
    # start together (on CPU hosts gloo waits 30 s at most for a peer).
    sync_processes("train step compiled")
    step = int(state.step)
    window: list[dict] = []
    window_start, window_steps = time.perf_counter(), 0
    logged: dict[str, Any] = {}
    previous = None
    try:
        while step < config.total_steps:
            state, metrics = compiled(state, batch)
            step += 1
            faults.maybe_kill("step", step, before=checkpoints.wait)
            state = state.replace(params=faults.maybe_put_nan(step, state.params))
            window.append(metrics)
            window_steps += 1
            refuse_bad_steps(previous, step, config.optimizer.max_bad_steps, checkpoints)
            previous = metrics  # checked after the next dispatch, so the host never waits on the device
            if step % config.log.every_steps == 0 or step == config.total_steps:
                means = {k: float(np.mean([jax.device_get(m[k]) for m in window])) for k in window[0]}
                elapsed = time.perf_counter() - window_start
                logged = {"loss": means["loss"], "grad_norm": means["grad_norm"],
                          "lr": float(schedule(step - 1)), "step_time": elapsed / window_steps,
                          "images_per_second": config.batch_size * window_steps / elapsed,
                          "mfu": flops_per_step * window_steps / elapsed / peak if flops_per_step else 0.0,
                          "skipped_steps": window_steps * (1 - means["finite"]),
                          "unreadable_images": unreadable_images_skipped()}
                writer.write_scalars(step, logged)
                progress.update(step, logged)
                window, window_start, window_steps = [], time.perf_counter(), 0
            if task.preview and config.log.preview_every_steps and step % config.log.preview_every_steps == 0:
                try:
                    images = task.preview({**state.frozen, **state.ema})  # the EMA weights, fixed seeds
                except SamplingError as e:  # non-finite EMA (or an overflowing sampler): stop, as at a save
                    raise TrainingError(f"step {step}: preview: {e}; {last_good(checkpoints)}") from None
                writer.write_images(step, {"preview": images})  # process 0 writes
                window_start = time.perf_counter()  # keep sampling time out of the step time
            if step % config.checkpoint.every_steps == 0 or step == config.total_steps:
                refuse_non_finite(state, checkpoints, "saved")
                checkpoints.save(state, data.get_state(), model_id)
                writer.flush()  # a bucket's logs are uploaded with each checkpoint
                faults.maybe_kill("save", step)
            if step < config.total_steps:  # after the save, whose data state must not count this batch
                batch = global_batch(next(data), mesh, rules)  # loads while the dispatched step runs
        refuse_bad_steps(previous, step, config.optimizer.max_bad_steps, checkpoints)
        refuse_untrained(state)
        checkpoints.wait()
        if task.evaluate:
            scores = task.evaluate({**state.frozen, **state.ema})
            writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
            if lead:
                print("held-out " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)
            logged = {**logged, **{f"eval/{k}": v for k, v in scores.items()}}
        export_dir = storage.join(workdir, "export")
        if config.export.at_end and not storage.is_complete_folder(export_dir):
            export(task, state, export_dir, checkpoints)
            if lead:
                weights = "EMA weights" if config.optimizer.ema_decay else "trained weights (no EMA)"
                print(f"exported the {weights} to {export_dir}")
    finally:
        progress.close()
        writer.close()
        checkpoints.wait()
        checkpoints.close()
    return logged


def summary(workdir: str) -> list[dict[str, Any]]:
    """The metrics a run logged (logs/metrics.jsonl), one dict per logging step."""
    text = storage.read_text(storage.join(workdir, "logs", "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
