"""Memory and FLOP plans: a run's train step and sampling program compiled ahead of time for a mesh.

Parameters, optimizer state and inputs are abstract (jax.ShapeDtypeStruct with their shardings),
so a full-size model is planned without allocating its weights. XLA's analyses of the compiled,
SPMD-partitioned programs give per-device memory (arguments, outputs, temporaries, generated code)
and FLOPs; the state's bytes per device are computed from the shardings. XLA's cost analysis counts a
loop body once, so the plans add the other iterations (accumulated micro-batches, denoising steps).

The numbers come from whichever backend compiles: on a CPU host with forced devices they are XLA
CPU's, which approximate TPU/GPU (other fusion, layouts and rematerialisation decisions).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdjax.conditioning import (abstract_conditioning, abstract_ids, takes_added_conditions, time_id_count,
                                unet_call)
from sdjax.convert.diffusers import COMPONENTS, model_components, read_component_config, read_json, read_model_index
from sdjax.find_batch import largest_fitting_batch
from sdjax.flops import compiled_cost, compiled_flops, traced_flops
from sdjax.hlo_collectives import KINDS, collectives, custom_calls
from sdjax.models.attention import resolved_impl
from sdjax.models.params import abstract_params, logical_axes
from sdjax.models.presets import PIPELINE_OPTIONS, PRESETS, preset
from sdjax.parallel import MESH_AXES, activate, batch_divisor, batch_sharding, param_shardings
from sdjax.stable_diffusion import Model
from sdjax.train.build import SD_SCHEDULE, assemble, text_config

GIB = 2 ** 30
STATE_GROUPS = ("params", "opt_state", "ema", "frozen")


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=1,fsdp=8' -> {"data": 1, "fsdp": 8, "tensor": 1}: axes left out are 1; one may be -1 (the rest)."""
    sizes = {axis: 1 for axis in MESH_AXES}
    seen = set()
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not name:
            raise ValueError(f"--mesh {spec!r}: expected AXIS=SIZE[,AXIS=SIZE...], e.g. data=1,fsdp=8")
        if name not in sizes:
            raise ValueError(f"--mesh {spec!r}: unknown mesh axis {name!r} (known: {', '.join(MESH_AXES)})")
        if name in seen:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"--mesh {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
        if size < 1 and size != -1:
            raise ValueError(f"--mesh {spec!r}: size of {name!r} must be >= 1 or -1, got {size}")
        seen.add(name)
        sizes[name] = size
    return sizes


def choose_architecture(model: ml_collections.ConfigDict, flag: str | None, config_path: str) -> tuple[str | None, str]:
    """(preset name or None for model.pretrained, why). The rule, first match wins:
    --architecture; config model.pretrained (its config.json files, no weights read);
    config model.architecture; the config file name's first word (sd15_finetune.py -> sd15)."""
    if flag:
        preset(flag, "--architecture")
        return flag, f"{flag} preset (--architecture)"
    if model.pretrained:
        return None, f"{model.pretrained} (architecture from its config.json files; no weights read)"
    if model.architecture:
        preset(model.architecture)
        return model.architecture, f"{model.architecture} preset (config model.architecture)"
    guess = os.path.basename(config_path).split("_")[0].split(".")[0]
    if guess in PRESETS:
        return guess, f"{guess} preset (from the config file's name; --architecture picks another)"
    raise ValueError(f"{config_path} names no model (model.pretrained and model.architecture are empty): "
                     f"pass --architecture, one of {', '.join(PRESETS)}")


def planning_model(model: ml_collections.ConfigDict, architecture: str | None) -> Model:
    """The run's Model, configured as build_model would (compute dtype, float32 parameters, remat,
    prediction type), without tokenizers (planning tokenizes nothing).

    A preset keeps its own text vocabulary (a real checkpoint's, e.g. 49408 for sd15); the
    from-scratch presets, which have none, take the run's tokenizer's as training does.
    """
    if architecture is None:
        index = read_model_index(model.pretrained)  # a clear error for a folder that is not a checkpoint
        configs = {name: read_component_config(model.pretrained, name) for name in model_components(index)
                   if name in COMPONENTS}
        scheduler_config = read_json(os.path.join(model.pretrained, "scheduler", "scheduler_config.json"))
    else:
        raw = preset(architecture)
        configs = {name: COMPONENTS[name].config_cls.from_dict(raw[name], f"preset {architecture}/{name}")
                   for name in raw}
        if "text_encoder" in raw and not raw["text_encoder"]["vocab_size"]:
            from sdjax.tokenizer import load_tokenizer, write_bpe_tokenizer

            with tempfile.TemporaryDirectory() as folder:
                tokenizer = load_tokenizer(model.tokenizer) if model.tokenizer else write_bpe_tokenizer(folder)
            configs["text_encoder"] = text_config(raw, tokenizer)
        scheduler_config = dict(SD_SCHEDULE)
        index = PIPELINE_OPTIONS.get(architecture, {})
    return assemble(configs, model, tokenizers={}, scheduler_config=scheduler_config, model_index=index)


def device_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of abstract arrays under these shardings (the largest shard)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def global_bytes(abstract: Any) -> int:
    """Bytes of a tree of abstract arrays, unsharded."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes from XLA's memory analysis; total = arguments + outputs + temporaries - aliased
    (a donated argument's buffer is reused for its output, so it is counted once)."""
    m = compiled.memory_analysis()
    if m is None:
        raise ValueError(f"the {jax.default_backend()} backend gives no memory analysis")
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
           "generated_code_bytes": int(m.generated_code_size_in_bytes)}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    # The TPU compiler also reports the peak of its buffer assignment over the program, which counts
    # buffers (e.g. a collective's full-size result) that its temp figure leaves out.
    out["peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    return out


def compiled_analysis(compiled: Any) -> dict[str, Any]:
    """Per device, one call: XLA's cost analysis (a loop body counted once), the collectives in the
    optimized HLO and its custom calls (Pallas kernels on TPU are "tpu_custom_call")."""
    text = compiled.as_text()
    return {"cost": compiled_cost(compiled), "collectives": collectives(text), "custom_calls": custom_calls(text)}


def verdict(total_bytes: int, device_memory_gb: float) -> dict[str, Any]:
    """Whether `total_bytes` fits in device_memory_gb GiB, and the margin (negative: short by)."""
    capacity = int(device_memory_gb * GIB)
    return {"device_memory_bytes": capacity, "fits": total_bytes <= capacity, "margin_bytes": capacity - total_bytes}


class DoesNotFit(ValueError):
    """The compiler refused a program because it cannot fit the device's memory (the TPU compiler checks
    its buffers against the chip's HBM while compiling), so there is no memory analysis to report."""


def _compile(fn: Any, args: tuple, mesh: Mesh, rules: Any, what: str) -> tuple[Any, float]:
    start = time.perf_counter()
    with activate(mesh, rules):  # the models' activation constraints apply only inside the mesh context
        try:
            compiled = fn.lower(*args).compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            first = next((line for line in str(e).splitlines() if "memory" in line.lower()), str(e).splitlines()[0])
            raise DoesNotFit(f"{what} does not fit: the compiler refused it: {first.strip()}") from None
    return compiled, time.perf_counter() - start


def plan_training(model: Model, config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, Any]:
    """Compiles the run's train step (full global batch, config dtype / remat / accumulation) for `mesh`
    with abstract inputs; returns its per-device memory, state bytes and FLOPs."""
    from sdjax.train.optimizer import make_optimizer
    from sdjax.train.placement import replicated, state_shardings
    from sdjax.train.step import make_step
    from sdjax.train.tasks import unet as unet_task

    from sdjax.train.loop import check_batch

    rules = config.mesh.rules
    check_batch(config, mesh)
    tx = make_optimizer(config.optimizer, config.total_steps)
    networks, trained, objective = unet_task.training(config, model)  # full fine-tuning or a LoRA
    abstract, shardings = state_shardings(networks, trained, config, tx, mesh)
    side = config.data.resolution
    images = lambda shape: jax.ShapeDtypeStruct((config.batch_size,) + shape, jnp.float32,
                                                sharding=batch_sharding(mesh, rules, 4))
    if config.data.cache_latents:  # the step reads the cached posteriors and runs no encoder
        side_latent, channels = side // model.vae.config.downscale, model.vae.config.latent_channels
        batch = {name: images((side_latent, side_latent, channels)) for name in ("latent_mean", "latent_logvar")}
    else:
        batch = {"pixels": images((side, side, 3))}
    batch.update({key: jax.ShapeDtypeStruct(ids.shape, ids.dtype, sharding=batch_sharding(mesh, rules, 2))
                  for key, ids in abstract_ids(model, config.batch_size).items()})
    # What the data pipeline records of every example (SDXL's micro-conditioning reads it).
    batch.update({key: jax.ShapeDtypeStruct((config.batch_size, *shape), dtype,
                                            sharding=batch_sharding(mesh, rules, 1 + len(shape)))
                  for key, shape, dtype in (("original_size", (2,), jnp.int32), ("crop_top_left", (2,), jnp.int32),
                                            ("caption_dropped", (), jnp.bool_))})
    step = jax.jit(make_step(objective, config, tx, shardings.params), donate_argnums=0,
                   out_shardings=(shardings, replicated(mesh)))
    compiled, seconds = _compile(step, (_with_shardings(abstract, shardings), batch), mesh, rules,
                                 f"the train step (batch {config.batch_size})")
    state = {group: {"per_device_bytes": device_bytes(getattr(abstract, group), getattr(shardings, group)),
                     "global_bytes": global_bytes(getattr(abstract, group))} for group in STATE_GROUPS}
    # XLA counts a loop body once: with accumulation the micro-batch scan runs grad_accum_steps times
    # (the optimizer update, counted that many times too, is negligible next to the networks).
    flops = compiled_flops(compiled) * config.grad_accum_steps * mesh.size
    # The model's FLOPs for MFU: the step traced with one-op attention, unpartitioned. The compiled count
    # misses what runs in custom calls (on TPU the Pallas attention kernels: about half of SD 1.5's step).
    model_flops = traced_flops(make_step(objective, config, tx), abstract, batch) * config.grad_accum_steps
    return {"batch_size": int(config.batch_size), "resolution": int(side), "dtype": str(config.model.dtype),
            "remat": bool(config.model.remat), "grad_accum_steps": int(config.grad_accum_steps),
            "trained": sorted(abstract.params), "memory": memory(compiled), "state": state,
            "flops_per_step": flops, "flops_per_call": flops, "flops_per_device_per_call": flops / mesh.size,
            "model_flops_per_step": model_flops, "compile_seconds": seconds, **compiled_analysis(compiled)}


def plan_sampling(model: Model, mesh: Mesh, rules: Any, batch: int, size: int, steps: int,
                  guidance_scale: float = 7.5, scheduler: str | None = None) -> dict[str, Any]:
    """Compiles the txt2img sampling program (batch images of size x size, `steps` scheduler steps,
    classifier-free guidance when guidance_scale > 1) with parameters stored in the compute dtype, as
    sdjax.load(dtype=...) holds them, sharded by `rules` as StableDiffusion.shard places them."""
    from sdjax.pipeline import Plan, build_program
    from sdjax.schedulers import make_scheduler

    ways = batch_divisor(mesh, rules)
    if batch < 1 or batch % ways:
        raise ValueError(f"sampling batch {batch} is not divisible by the {ways} ways the mesh {dict(mesh.shape)} "
                         f"splits the batch")
    if size < 8 or size % 8:
        raise ValueError(f"sampling size must be a positive multiple of 8, got {size}")
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    dtype = model.unet.dtype
    view = model.map_networks(param_dtype=dtype)
    modules = view.networks
    abstract = {n: abstract_params(m) for n, m in modules.items()}
    shardings = {n: param_shardings(logical_axes(m), abstract[n], mesh, rules) for n, m in modules.items()}
    sched = make_scheduler(scheduler, view.scheduler_config, steps)
    factor = view.vae.config.downscale
    latent = (size // factor, size // factor, view.vae.config.latent_channels)
    plan = Plan(scheduler or "", steps, (), batch, latent[:2], guidance_scale > 1, 0.0, 0, "txt2img")
    rows = lambda ndim: batch_sharding(mesh, rules, ndim)
    ids = {key: jax.ShapeDtypeStruct(ids.shape, ids.dtype, sharding=rows(2))
           for key, ids in abstract_ids(view, batch).items()}
    key_type = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    keys = jax.ShapeDtypeStruct(key_type.shape, key_type.dtype, sharding=rows(1))
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    noise = jax.ShapeDtypeStruct((batch, *latent), jnp.float32, sharding=rows(4))
    inputs = {"ids": ids, "neg_ids": ids, "keys": keys, "noise": noise}
    if takes_added_conditions(view):  # SDXL's time ids, one row per image and side of guidance
        inputs["time_ids"] = inputs["neg_time_ids"] = jax.ShapeDtypeStruct((batch, time_id_count(view)), jnp.float32,
                                                                           sharding=rows(2))
    args = (_with_shardings(abstract, shardings), scale, inputs)
    compiled, seconds = _compile(build_program(view, plan, sched), args, mesh, rules, f"sampling (batch {batch})")
    # XLA counts the denoising scan's body once; add the other iterations' model calls.
    per_step = model_call_flops(view, batch, latent, guidance_scale)
    flops = compiled_flops(compiled) * mesh.size + (len(sched.timesteps) - 1) * per_step
    return {"batch_size": batch, "resolution": size, "steps": steps, "guidance": guidance_scale > 1,
            "dtype": str(jnp.dtype(dtype)), "scheduler": scheduler or sched.__class__.__name__,
            "memory": memory(compiled),
            "state": {"params": {"per_device_bytes": device_bytes(abstract, shardings),
                                 "global_bytes": global_bytes(abstract)}},
            "flops_per_step": per_step, "flops_per_call": flops, "flops_per_device_per_call": flops / mesh.size,
            "compile_seconds": seconds, **compiled_analysis(compiled)}


def model_call_flops(model: Model, batch: int, latent: tuple[int, int, int], guidance_scale: float) -> float:
    """FLOPs (all devices) of one denoising step's model call, guided as the sampler guides it, from the
    cost analysis of the unpartitioned lowering (cheap: nothing is compiled; see traced_flops)."""
    from sdjax.pipeline import guided

    def call(params, x, t, cond, uncond, scale):
        unet_fn = unet_call(model, {"unet": params})
        return guided(unet_fn, cond, uncond if guidance_scale > 1 else None, scale, 0.0)(x, t)

    cond = abstract_conditioning(model, batch)
    args = (abstract_params(model.unet), jax.ShapeDtypeStruct((batch, *latent), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32), cond, cond, jax.ShapeDtypeStruct((), jnp.float32))
    return traced_flops(call, *args)


def with_batch(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
    """A copy of the run's config with another global batch size."""
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    return config


def plan_largest_batch(plan_at: Callable[[int], dict[str, Any]], capacity_bytes: int,
                       tpu: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the plan at the largest per-chip batch whose memory fits capacity_bytes, or at 1 if none does; the
    search: batch_per_chip, bytes, next_bytes, compiled). plan_at(b) plans with b rows per batch shard."""
    plans: dict[int, dict[str, Any]] = {}

    def bytes_at(b: int) -> int | None:
        # Full-size TPU compiles take many minutes each on a small host: one progress line per batch tried.
        try:
            plans[b] = plan_at(b)
        except DoesNotFit:
            print(f"find_batch: {b} per chip: refused by the compiler (over memory)", file=sys.stderr, flush=True)
            return None  # refused by the compiler: over the device's memory
        found = resident_bytes(plans[b], tpu)
        print(f"find_batch: {b} per chip: {found / GIB:.2f} GiB, compiled in {plans[b]['compile_seconds']:.0f} s",
              file=sys.stderr, flush=True)
        return found

    found = largest_fitting_batch(bytes_at, capacity_bytes)
    if found["batch_per_chip"] == 0 and 1 not in plans:
        raise DoesNotFit("even 1 row per chip does not fit: the compiler refused it")
    return plans[max(found["batch_per_chip"], 1)], found


def target_facts(target: Any) -> dict[str, Any]:
    """A sdjax.tpu_targets.Target as the report's JSON: topology, chips, devices and the chip's peaks."""
    chip = target.chip
    return {"name": target.name, "generation": chip.generation, "topology": target.topology,
            "num_slices": target.num_slices, "chips": target.chips, "devices": target.devices,
            "hbm_bytes": chip.hbm_bytes, "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth,
            "source": f"Cloud TPU docs, cloud.google.com/tpu/docs/{chip.generation}"}


def tpu_backend_note(mesh: Mesh) -> str:
    """Which compiler planned the TPU programs: libtpu's, compile-only on this host."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        libtpu = f"libtpu {version('libtpu')}"
    except PackageNotFoundError:
        libtpu = "libtpu"
    return f"XLA TPU compiler ({libtpu}) for {mesh.devices.flat[0].device_kind}, compile-only (nothing ran)"


def attention_used(name: str, mesh: Mesh) -> str:
    """The attention kernel the programs get on this mesh's platform ("auto" resolved: "splash" on TPU)."""
    with jax.set_mesh(mesh):
        used = resolved_impl(name)
    return used if used == name else f"{used} ({name})"


def mesh_description(mesh: Mesh) -> str:
    devices = mesh.devices.flat[0]
    return f"{' '.join(f'{a}={n}' for a, n in mesh.shape.items())} over {mesh.size} {devices.platform} devices"


def _size(n: int) -> str:
    """Bytes in binary units, sign kept (margins can be negative)."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, scale in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{n} B"


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def format_report(report: dict[str, Any]) -> str:
    """The report as a readable table, one column per planned program (all memory per device)."""
    programs = [(title, report[key]) for key, title in (("train", "train step"), ("sample", "sampling"))
                if key in report]
    lines = [f"config   {report['config']}", f"model    {report['model']}", f"mesh     {report['mesh']}",
             f"backend  {report['backend_note']}", f"attention {report['attention']}", ""]
    target = report.get("target")
    if target:
        lines[3:3] = [f"target   {target['name']}: {target['chips']} chips = {target['devices']} devices, topology "
                      f"{target['topology']}" + (f" x {target['num_slices']} slices (data axis over DCN)"
                                                 if target["num_slices"] > 1 else "")]

    def work(p: dict) -> str:
        if "steps" in p:
            return f"{p['batch_size']} x {p['resolution']}px {p['dtype']}, {p['steps']} steps" + \
                   (", cfg" if p["guidance"] else "")
        return f"{p['batch_size']} x {p['resolution']}px {p['dtype']}" + (", remat" if p["remat"] else "") + \
               (f", accum {p['grad_accum_steps']}" if p["grad_accum_steps"] > 1 else "")

    def state(group: str):
        return lambda p: _size(p["state"][group]["per_device_bytes"]) if group in p["state"] else "-"

    def mem(key: str):
        return lambda p: _size(p["memory"][key])

    def fit(p: dict) -> str:
        v = p["verdict"]
        return (f"fits ({_size(v['margin_bytes'])} spare)" if v["fits"]
                else f"does not fit ({_size(-v['margin_bytes'])} over)")

    rows = [("per device", lambda p: ""), ("  work", work), ("  parameters", state("params")),
            ("  optimizer state", state("opt_state")), ("  EMA", state("ema")),
            ("  frozen networks", state("frozen")), ("  arguments", mem("argument_bytes")),
            ("  outputs", mem("output_bytes")), ("  aliased (donated)", mem("alias_bytes")),
            ("  temporaries", mem("temp_bytes")), ("  generated code", mem("generated_code_bytes")),
            ("  total (args+out+temp-alias)", mem("total_bytes")),
            ("  FLOPs / call", lambda p: _flops(p["flops_per_device_per_call"])),
            ("all devices", lambda p: ""),
            ("  FLOPs / step", lambda p: _flops(p["flops_per_step"])),
            ("  model FLOPs / step", lambda p: _flops(p.get("model_flops_per_step", p["flops_per_step"]))),
            ("  FLOPs / call", lambda p: _flops(p["flops_per_call"])),
            ("compile time", lambda p: f"{p['compile_seconds']:.1f} s"),
            (f"on {report['device_memory_gb']:g} GiB {'HBM per chip' if target else 'per device'}", fit)]
    if target:
        def collective(kind: str):
            return lambda p: (f"{p['collectives'][kind]['count']} x, {_size(p['collectives'][kind]['bytes'])}"
                              if p["collectives"][kind]["count"] else "-")

        rows[12:12] = [("  compiler peak", mem("peak_bytes"))]
        rows += [("collectives per chip (static)", lambda p: ""),
                 *((f"  {kind}", collective(kind)) for kind in KINDS),
                 ("Pallas kernels (static)", lambda p: str(p["custom_calls"].get("tpu_custom_call", 0))),
                 ("ESTIMATE, not measured", lambda p: ""),
                 ("  seconds / call (estimate)", lambda p: f"{p['estimate']['estimated_seconds_per_call']:.4g} s"),
                 ("  MFU (estimate)", lambda p: f"{p['estimate']['estimated_mfu']:.1%}"),
                 ("  from", lambda p: p["estimate"]["source"].removeprefix("estimate: ").split(" (")[0])]
    table = [["", *(title for title, _ in programs)]] + [[label, *(cell(p) for _, p in programs)]
                                                        for label, cell in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    for key, found in report.get("find_batch", {}).items():
        after = (f"; {found['batch_per_chip'] + 1} needs {_size(found['next_bytes'])}"
                 if found["next_bytes"] is not None else
                 f"; the compiler refused {found['batch_per_chip'] + 1} (over memory)"
                 if found['batch_per_chip'] + 1 in found.get("refused", []) else "")
        lines += [f"largest {key} batch per chip within {_size(found['capacity_bytes'])}: {found['batch_per_chip']}"
                  + (f" ({_size(found['bytes'])}{after})" if found["batch_per_chip"] else after)
                  + f"; {found['compiles']} compiles" + (f", the line predicted {found['predicted']}"
                                                         if found["predicted"] else "")]
    lines += [""] + [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def backend_note() -> str:
    """Which backend's analysis this is; on CPU, that it approximates an accelerator's."""
    if jax.default_backend() == "cpu":
        return ("XLA CPU: its memory analysis approximates TPU/GPU; the CPU compiler fuses, lays out "
                "and rematerialises differently")
    return f"XLA {jax.default_backend()} ({jax.devices()[0].device_kind})"


def resident_bytes(program: dict[str, Any], tpu: bool) -> int:
    """The bytes a device must hold for `program` (a plan_training / plan_sampling result): on TPU the
    compiler's peak, which its args + outputs + temporaries can miss, when it reports one."""
    m = program["memory"]
    return max(m["total_bytes"], m["peak_bytes"]) if tpu else m["total_bytes"]


def estimate(program: dict[str, Any], peak_flops: float, hbm_bandwidth: float) -> dict[str, Any]:
    """An ESTIMATE (never a measurement) of one call's seconds and MFU on a chip with these peaks: the TPU
    compiler's cost model (optimal_seconds) when it gives a positive figure, else the roofline
    max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth). XLA's cost analysis counts a loop body
    once; the plan's FLOPs add the other iterations, and seconds and bytes are scaled by the same ratio.
    MFU here = the model's FLOPs per device (model_flops_per_step where the plan has it: traced with one-op
    attention, counting what custom calls hide from the compiler; else the compiler's) / estimated seconds /
    peak bf16."""
    cost, flops = program["cost"], program["flops_per_device_per_call"]
    loops = flops / cost["flops"] if cost["flops"] > 0 else 1.0
    roofline = max(flops / peak_flops, cost["bytes_accessed"] * loops / hbm_bandwidth)
    compiler = cost["optimal_seconds"] * loops
    seconds, source = ((compiler, "estimate: TPU compiler cost model (optimal_seconds)") if compiler > 0 else
                       (roofline, "estimate: roofline max(FLOPs/peak, HBM bytes/bandwidth)"))
    devices = program["flops_per_call"] / flops if flops else 1.0
    useful = program.get("model_flops_per_step", program["flops_per_call"]) / devices
    return {"estimated_seconds_per_call": seconds, "estimated_mfu": useful / seconds / peak_flops if seconds else 0.0,
            "source": source, "roofline_seconds": roofline, "compiler_seconds": compiler, "loop_scale": loops}


def finish(report: dict[str, Any]) -> dict[str, Any]:
    """Adds each program's fits / margin against report['device_memory_gb'] (GiB), and notes on reading it;
    for a TPU target (report['target']) also the estimated time and MFU of each program."""
    target = report.get("target")
    for key in ("train", "sample"):
        if key in report:
            report[key]["verdict"] = verdict(resident_bytes(report[key], target is not None),
                                             report["device_memory_gb"])
            if target:
                report[key]["estimate"] = estimate(report[key], target["peak_flops"], target["hbm_bandwidth"])
    report["notes"] = ["FLOPs from XLA's cost analysis; all devices = per device x devices (work a device "
                       "repeats, e.g. on replicated weights, counts on each)"]
    if target:
        report["notes"] += [f"{target['name']}: per chip {target['hbm_bytes'] / GIB:g} GiB HBM, "
                            f"{target['peak_flops'] / 1e12:g} TFLOP/s bf16, {target['hbm_bandwidth'] / 1e9:g} GB/s "
                            f"HBM ({target['source']}); fits = max(args+out+temp-alias, the compiler's peak)",
                            "estimated time and MFU are ESTIMATES from the compiler's analysis, not measurements; "
                            "collective counts are static (a loop body's once)"]
    if "sample" in report:
        report["notes"] += ["sampling: a step is one (guided) UNet call; parameters are the three networks as "
                            "loaded, arguments only those txt2img reads (not the VAE encoder)"]
    return report


__all__ = ["choose_architecture", "compiled_analysis", "device_bytes", "estimate", "format_report", "memory",
           "parse_mesh", "plan_largest_batch", "plan_sampling", "plan_training", "planning_model", "resident_bytes",
           "target_facts", "verdict", "with_batch"]
