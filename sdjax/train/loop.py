"""The training loop: task -> restore or init -> [batch -> train_step -> log / preview / checkpoint]
-> evaluate -> export. The task (sdjax.train.tasks) says what is trained: the UNet, the VAE or CLIP.

Preemption safety: every step's randomness is fold_in(seed, step) and the data order is a function
of the data seed and position, so restarting from a checkpoint (which holds the iterator's
position) replays exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from sdjax.data.latent_cache import check_cacheable
from sdjax.data.pipeline import make_iterator, make_source
from sdjax.data.preprocess import unreadable_images_skipped
from sdjax.flops import compiled_flops, measured_peak_flops, traced_flops
from sdjax.host_memory import release_freed_heap
from sdjax.models.layers import single_cpu_device
from sdjax.parallel import activate, batch_divisor, global_batch, make_mesh, sync_processes, to_host
from sdjax.train import faults
from sdjax.train.checkpoint import Checkpoints
from sdjax.train.config import check_keys
from sdjax.train.metrics_writer import MetricWriter
from sdjax.train.optimizer import make_optimizer
from sdjax.train.progress import Progress
from sdjax.train.placement import create_state, replicated
from sdjax.train.step import TrainState, make_step
from sdjax.train.tasks import Task, build_task, cache_latents, fit_tokenizer


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors a run would otherwise hit later, raised before any compute."""
    check_keys(config)
    if config.data.cache_latents:
        if config.task != "unet":
            raise ValueError(f"data.cache_latents: only task 'unet' trains on a frozen VAE's latents; "
                             f"task {config.task!r} needs the pixels")
        check_cacheable(config.data)
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


def export(task: Task, state: TrainState, folder: str) -> None:
    """Writes the EMA weights (with the frozen networks) in the task's layout (every process calls
    this; process 0 writes)."""
    params = to_host({**state.frozen, **state.ema})
    if jax.process_index() == 0:
        task.export(params, folder)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    lead = jax.process_index() == 0
    if lead:  # builds "shapes"/"folder" datasets once; a missing dataset or feature key fails here
        make_source(config.data)
    sync_processes("dataset ready")  # the other hosts open it in make_iterator, once it is built
    if config.task == "tokenizer":  # no gradient steps: merges counted from the captions
        if lead:
            fit_tokenizer(config, workdir)
        sync_processes("tokenizer written")
        return {}
    mesh = make_mesh(config.mesh)
    rules = config.mesh.rules
    task = build_task(config, workdir)
    model_id = task.identity
    checkpoints = Checkpoints(workdir, config.checkpoint)
    latest = checkpoints.latest_step()
    if latest is not None:
        checkpoints.check_model(latest, model_id)
    if lead:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    tx = make_optimizer(config.optimizer, config.total_steps)
    state, shardings = create_state(task.networks, task.params, config, tx, mesh)
    task.params = {}  # all parameters now live in the state, whose buffers each step donates
    latents = ""
    if config.data.cache_latents:  # the frozen VAE runs once over the split instead of in every step
        latents = os.path.join(workdir, "latent_cache")
        vae_params = to_host(state.frozen["vae"])  # a gather every process takes part in
        if lead:
            cache_latents(config, latents, task.networks["vae"], vae_params)
        sync_processes("latent cache ready")
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
        # device, where attention of long sequences loops over query blocks, that attention is counted in
        # its one-op form. (On GPU, cuDNN attention is a custom call that the compiled count leaves out.)
        flops_per_step = (traced_flops(train_step, state, batch) if single_cpu_device()
                          else compiled_flops(compiled)) * config.grad_accum_steps
    peak = measured_peak_flops(config.model.dtype)  # one device's
    schedule = tx.schedule  # the learning rate logged is the one the update uses

    writer = MetricWriter(os.path.join(workdir, "logs"), enabled=lead)
    progress = Progress(config.total_steps, int(state.step), enabled=lead and config.log.progress_bar)
    previews: dict = {}
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
            window.append(metrics)
            window_steps += 1
            if previous is not None and int(previous["bad_steps"]) >= config.optimizer.max_bad_steps:
                raise TrainingError(
                    f"stopped at step {step}: the loss or gradient was non-finite {config.optimizer.max_bad_steps} "
                    f"steps in a row; the last checkpoint (step {checkpoints.latest_step()}) is intact")
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
                images = task.preview({**state.frozen, **state.ema}, previews)  # the EMA weights, fixed seeds
                writer.write_images(step, {"preview": images})  # process 0 writes
                window_start = time.perf_counter()  # keep sampling time out of the step time
            if step % config.checkpoint.every_steps == 0 or step == config.total_steps:
                checkpoints.save(state, data.get_state(), model_id)
                faults.maybe_kill("save", step)
            if step < config.total_steps:  # after the save, whose data state must not count this batch
                batch = global_batch(next(data), mesh, rules)  # loads while the dispatched step runs
        if previous is not None and int(previous["bad_steps"]) >= config.optimizer.max_bad_steps:
            raise TrainingError(f"stopped at step {step}: the loss or gradient was non-finite "
                                f"{config.optimizer.max_bad_steps} steps in a row")
        checkpoints.wait()
        if task.evaluate:
            scores = task.evaluate({**state.frozen, **state.ema})
            writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
            if lead:
                print("held-out " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)
            logged = {**logged, **{f"eval/{k}": v for k, v in scores.items()}}
        export_dir = os.path.join(workdir, "export")
        if config.export.at_end and not os.path.exists(export_dir):
            export(task, state, export_dir)
            if lead:
                print(f"exported the EMA weights to {export_dir}")
    finally:
        progress.close()
        writer.close()
        checkpoints.wait()
        checkpoints.close()
    return logged


def summary(workdir: str) -> list[dict[str, Any]]:
    """The metrics a run logged (logs/metrics.jsonl), one dict per logging step."""
    with open(os.path.join(workdir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
