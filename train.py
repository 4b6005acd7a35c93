"""Train (or fine-tune) Stable Diffusion from a config file; re-running on a workdir resumes it.

    python train.py --config configs/tiny.py --workdir runs/tiny
    python train.py --config configs/sd15_finetune.py:/path/to/sd15 --workdir runs/ft --config.optimizer.learning_rate=5e-6
    python train.py --config configs/tiny.py --workdir runs/sweep --sweep list     (or --sweep 2, --sweep all)
    python train.py --config configs/shapes_model.py --workdir runs/shapes    (tokenizer, VAE, CLIP, UNet stages)
    python train.py ... --multihost        (every host of a Cloud TPU pod slice runs the same command)
    python train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0   (GPU hosts)
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sdjax import storage
from sdjax.cli import absl_flags_parser, check_output_dir, define_config_file

_CONFIG = define_config_file("config", "a configs/*.py file, optionally file.py:arg")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, export (resumed if it exists)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "join a multi-host run with jax.distributed (auto-detected on "
                                                  "Cloud TPU; elsewhere also give the three flags below)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_STAGE = flags.DEFINE_string("stage", None, "a config file with stages (e.g. configs/shapes_model.py): run only this "
                                            "stage (default: all in order, each resumed or skipped if done)")
_SWEEP = flags.DEFINE_string("sweep", None, "'list' prints the config file's sweep points; an index runs that point "
                                            "in workdir/sweep_<i>; 'all' runs every point in turn")


def staged_runs(plan: list, overrides: dict, workdir: str, only: str | None) -> list:
    """(config, workdir/<stage>) for each stage a config file's `stages(config, workdir)` declares, in
    order; command-line --config.* overrides are applied again on top of each stage's own settings."""
    from sdjax.train.config import apply_overrides

    names = [name for name, _ in plan]
    if only is not None and only not in names:
        raise ValueError(f"--stage {only!r}: expected one of {', '.join(names)}")
    return [(apply_overrides(stage_config, overrides), storage.join(workdir, name))
            for name, stage_config in plan if only in (None, name)]


def main(argv: list[str]) -> int:
    del argv  # absl_flags_parser refuses positional arguments
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every save and read at INFO
    import importlib.util

    from sdjax import backends

    backends.prepare()  # before JAX starts its backends
    from sdjax.parallel import initialize_processes
    from sdjax.train.config import apply_overrides, sweep_points
    from sdjax.train.loop import TrainingError, check_config, train

    if _MULTIHOST.value or _COORDINATOR.value:
        initialize_processes(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config, workdir = _CONFIG.value, _WORKDIR.value
    config_path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]  # drop the :arg
    spec = importlib.util.spec_from_file_location("sdjax_run_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    points = sweep_points(module)
    stages = getattr(module, "stages", None)
    try:
        if stages is not None:
            if _SWEEP.value is not None:
                raise ValueError(f"--sweep: {config_path} declares stages; sweep one stage's own config instead")
            runs = staged_runs(stages(config, workdir), config_flags.get_override_values(flags.FLAGS["config"]),
                               workdir, _STAGE.value)
        elif _STAGE.value is not None:
            raise ValueError(f"--stage {_STAGE.value!r}: {config_path} declares no stages")
        elif _SWEEP.value == "list":
            if not points:
                print(f"{config_path} declares no sweep")
            for i, point in enumerate(points):
                print(f"{i}: {point}")
            return 0
        elif _SWEEP.value is None:
            runs = [(config, workdir)]
        elif _SWEEP.value == "all":
            runs = [(apply_overrides(config, p), storage.join(workdir, f"sweep_{i}")) for i, p in enumerate(points)]
        elif _SWEEP.value.isdigit() and int(_SWEEP.value) < len(points):
            i = int(_SWEEP.value)
            runs = [(apply_overrides(config, points[i]), storage.join(workdir, f"sweep_{i}"))]
        else:
            raise ValueError(f"--sweep {_SWEEP.value!r}: expected 'list', 'all' or an index below {len(points)}")
        for run_config, run_dir in runs:  # every run's config and folder, before the first run creates or
            check_config(run_config)       # compiles anything (a bad sweep point fails now, not hours later)
            check_output_dir(run_dir, "--workdir")
        from sdjax.pipeline import enable_compilation_cache

        enable_compilation_cache()  # a resumed, restaged or re-swept run loads its compiled programs
        for run_config, run_dir in runs:
            if len(runs) > 1:
                print(f"{'stage' if stages is not None else 'sweep point'} {run_dir}", flush=True)
            train(run_config, run_dir)
    except (ValueError, TrainingError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=absl_flags_parser("train.py", required=("config", "workdir")))
