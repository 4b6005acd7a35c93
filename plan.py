"""Per-device memory and FLOPs of a run's train step and sampling program, compiled ahead of time for a
mesh with abstract parameters (nothing full-size is allocated; no checkpoint is needed).

    python plan.py --config configs/sd15_finetune.py --mesh data=1,fsdp=8
    python plan.py --config configs/tiny.py --mesh data=2,fsdp=4 --json plan.json --config.batch_size=16
    python plan.py --config configs/sd21_finetune.py --mesh fsdp=8 --device_memory_gb 32 --nosample
    python plan.py --config configs/sd15_finetune.py --mesh fsdp=8 --target v5e-8 --find_batch

The model: --architecture NAME (a preset) if given; else the config's model.pretrained folder (its
config.json files only); else model.architecture; else the config file name's first word
(sd15_finetune.py -> the sd15 preset). --mesh sets all three axes (left out: 1). On a CPU host the
mesh's devices are XLA's forced host devices: --devices N (default: the --mesh size) sets
XLA_FLAGS=--xla_force_host_platform_device_count=N unless XLA_FLAGS already sets a count.

--target NAME compiles for a Cloud TPU slice instead (v4-8, v5e-8, v5p-8, v6e-8, v5e-256, ...; 2xv5e-16 is
two slices over DCN, the data axis spanning them) with the TPU compiler from libtpu (pip install
'sdjax[tpu]'), on this machine, TPU or not: memory against the chip's HBM, the collectives, and an
ESTIMATED time and MFU per call. --find_batch plans at the largest per-chip batch that fits instead of the
config's (--device_memory_gb caps the memory; with --target it defaults to the chip's HBM).
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sdjax import storage
from sdjax.cli import absl_flags_parser, check_output_file, define_config_file

_CONFIG = define_config_file("config", "a configs/*.py file, optionally file.py:arg")
_MESH = flags.DEFINE_string("mesh", None, "AXIS=SIZE,... over data / fsdp / tensor, e.g. data=1,fsdp=8 "
                                          "(default: the config's mesh)")
_DEVICES = flags.DEFINE_integer("devices", None, "forced host (CPU) device count; default: the --mesh size")
_ARCHITECTURE = flags.DEFINE_string("architecture", None, "plan this preset (sd15, sd21, sdxl, sdxl_refiner, small, "
                                                          "tiny) instead of the config's model")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 8, "images per sampling call")
_SAMPLE_SIZE = flags.DEFINE_integer("sample_size", None, "sampled image side in pixels (default: data.resolution)")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 4, "scheduler steps (a lax.scan: memory barely depends on it)")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "guidance scale; > 1 doubles the UNet batch")
_SCHEDULER = flags.DEFINE_string("scheduler", None, "sampling scheduler family (default: the model's own)")
_TRAIN = flags.DEFINE_bool("train", True, "plan the train step (--notrain skips it)")
_SAMPLE = flags.DEFINE_bool("sample", True, "plan the sampling program (--nosample skips it)")
_MEMORY = flags.DEFINE_float("device_memory_gb", 16, "memory per device in GiB, for the fits / does not fit verdict "
                                                    "(with --target: default the chip's HBM)")
_TARGET = flags.DEFINE_string("target", None, "compile for this Cloud TPU slice, e.g. v5e-8, v5p-8, v6e-8, v5e-256, "
                                              "2xv5e-16 (needs libtpu: pip install 'sdjax[tpu]')")
_FIND_BATCH = flags.DEFINE_bool("find_batch", False, "plan at the largest per-chip batch that fits "
                                                     "--device_memory_gb (two compiles give the line, two confirm it)")
_JSON = flags.DEFINE_string("json", None, "also write the report as JSON to this path")

_FORCE = "--xla_force_host_platform_device_count"
_CODEGEN = "--xla_backend_optimization_level"


def _set_xla_flags(count: int | None) -> None:
    """XLA_FLAGS for planning; must run before JAX creates its backends. Flags already set win.

    The forced host device count makes the CPU platform a mesh of `count` devices. LLVM code
    generation at -O0 cuts compile time by a third: the plan never runs the code, and buffer
    assignment, which the memory analysis reports, happens on HLO before LLVM sees it.
    """
    flags_now = os.environ.get("XLA_FLAGS", "")
    extra = [] if _CODEGEN in flags_now else [f"{_CODEGEN}=0"]
    if count is not None and _FORCE not in flags_now:
        extra.append(f"{_FORCE}={count}")
    os.environ["XLA_FLAGS"] = " ".join([flags_now, *extra]).strip()


def main(argv: list[str]) -> int:
    del argv  # absl_flags_parser refuses positional arguments
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    config_path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
    from sdjax import CheckpointError, plan, tpu_targets  # imports jax without starting a backend

    try:
        if _JSON.value:  # checked now, not after minutes of compiling
            check_output_file(_JSON.value, "--json")
        if not (_TRAIN.value or _SAMPLE.value):
            raise ValueError("--notrain and --nosample leave nothing to plan")
        sizes = plan.parse_mesh(_MESH.value) if _MESH.value is not None else None
        if _DEVICES.value is not None and _DEVICES.value < 1:
            raise ValueError(f"--devices must be >= 1, got {_DEVICES.value}")
        known = sizes is not None and all(s > 0 for s in sizes.values())
        target = None
        if _TARGET.value is not None:
            target = tpu_targets.parse_target(_TARGET.value)
            if _DEVICES.value is not None:
                raise ValueError("--devices sets the count of CPU devices; --target plans the target's own devices")
            tpu_targets.require_libtpu()
            tpu_targets.quiet_libtpu(target)  # before JAX loads libtpu
        else:
            tpu_targets.skip_absent_tpu()  # libtpu without chips: plan on the CPU, without libtpu's errors
            _set_xla_flags(_DEVICES.value if _DEVICES.value is not None else
                           (math.prod(sizes.values()) if known else None))
        import jax

        from sdjax.parallel import MESH_AXES, batch_divisor, make_mesh
        from sdjax.train.config import check_keys

        if _DEVICES.value is not None and jax.device_count() != _DEVICES.value:
            raise ValueError(f"--devices {_DEVICES.value}: JAX sees {jax.device_count()} devices "
                             f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
        check_keys(config)
        if sizes is not None:
            for axis, size in sizes.items():
                config.mesh[axis] = size
        memory_gb = _MEMORY.value
        if target is not None:
            sizes = tpu_targets.check_mesh({axis: int(config.mesh[axis]) for axis in MESH_AXES}, target)
            for axis, size in sizes.items():
                config.mesh[axis] = size
            mesh = make_mesh(config.mesh, tpu_targets.topology_devices(target))
            if not flags.FLAGS["device_memory_gb"].present:
                memory_gb = target.chip.hbm_bytes / plan.GIB
        else:
            mesh = make_mesh(config.mesh)
        architecture, source = plan.choose_architecture(config.model, _ARCHITECTURE.value, config_path)
        sd_model = plan.planning_model(config.model, architecture)
        report = {"config": config_path, "model": source, "mesh": plan.mesh_description(mesh),
                  "mesh_shape": dict(mesh.shape), "devices": mesh.size, "backend": jax.default_backend(),
                  "backend_note": plan.backend_note(), "device_memory_gb": memory_gb,
                  "attention": plan.attention_used(config.model.attention_impl, mesh)}
        if target is not None:
            report.update(backend="tpu", backend_note=plan.tpu_backend_note(mesh),
                          target=plan.target_facts(target))
        side = _SAMPLE_SIZE.value or config.data.resolution
        sample = lambda batch: plan.plan_sampling(sd_model, mesh, config.mesh.rules, batch, side,
                                                  _SAMPLE_STEPS.value, _GUIDANCE.value, _SCHEDULER.value)
        if _FIND_BATCH.value:  # per-chip batch b: b rows on each of the mesh's batch shards (per micro-batch)
            ways, capacity = batch_divisor(mesh, config.mesh.rules), int(memory_gb * plan.GIB)
            programs = {"train": lambda b: plan.plan_training(
                            sd_model, plan.with_batch(config, b * ways * config.grad_accum_steps), mesh),
                        "sample": lambda b: sample(b * ways)}
            for key, wanted in (("train", _TRAIN.value), ("sample", _SAMPLE.value)):
                if wanted:
                    report[key], report.setdefault("find_batch", {})[key] = plan.plan_largest_batch(
                        programs[key], capacity, tpu=target is not None)
        else:
            if _TRAIN.value:
                report["train"] = plan.plan_training(sd_model, config, mesh)
            if _SAMPLE.value:
                report["sample"] = sample(_SAMPLE_BATCH.value)
        plan.finish(report)
        print(plan.format_report(report))
        if _JSON.value:
            storage.write_text(_JSON.value, json.dumps(report, indent=2))
    except (ValueError, OSError, CheckpointError) as e:
        print(f"plan.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=absl_flags_parser("plan.py", required=("config",)))
