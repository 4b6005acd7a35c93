"""Side-by-side benchmarks, sdjax vs diffusers/PyTorch, on one machine and the same random weights.

    python -m benchmarks.run                          (SD 1.5 architecture; CPU: minutes per measurement)
    python -m benchmarks.run --preset tiny --repeats 1 --warmup 1     (a smoke run: small networks, a few minutes
                                                                       of imports and compiles on 2 cores)
    python -m benchmarks.run --only unet,sampling --repeats 5 --out /tmp/BENCHMARKS.md

Measures UNet forward, txt2img sampling, VAE decode, the UNet train step and the compile time of the sdjax
sampling program (cold and with a warm persistent cache), each framework in a process of its own; prints a
markdown table and writes it as the CPU or GPU section of --out, keeping the file's other text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

from benchmarks import report
from benchmarks.machine import section
from benchmarks.settings import MEASUREMENTS, ROWS, SIDES, Settings, sides_of
from benchmarks.weights import architecture, check_folder, is_built, native_resolution, vae_factor
from sdjax.cli import OneLineParser
from sdjax.models.attention import ATTENTION_IMPLS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("float32", "bfloat16", "float16")
# The torch side's train step is SD 1.x's (one text encoder, no added conditioning).
SDXL_MEASUREMENTS = ("unet", "sampling")
GUIDANCE = 7.5
# Per device: (images per call, sampling steps, sdjax dtype, torch dtype, sdjax attention, warm-up calls,
# timed calls). A GPU call takes milliseconds to a second: more of both, so clocks settle and medians hold.
DEVICE_DEFAULTS = {"cpu": (1, 4, "float32", "float32", "xla", 1, 3),
                   "gpu": (8, 20, "bfloat16", "float16", "cudnn", 3, 10)}


def _measurements(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown measurement {', '.join(unknown) or repr(text)}; "
                                         f"known: {', '.join(MEASUREMENTS)}")
    return names


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sdjax", "bench-weights")
    p = OneLineParser(prog="benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("sd15", "sdxl", "tiny"), default="sd15",
                   help="architecture: sd15 (default), sdxl (SDXL base 1.0: no train measurement) or tiny (small "
                        "networks, for smoke tests)")
    p.add_argument("--only", type=_measurements,
                   help=f"comma list of measurements (default: all of {','.join(MEASUREMENTS)}; sdxl: "
                        f"{','.join(SDXL_MEASUREMENTS)})")
    p.add_argument("--warmup", type=_at_least(1), help="untimed calls first; >= 1, as the first call compiles "
                                                       "(sdjax) or sets up kernels (default: 1 on CPU, 3 on GPU)")
    p.add_argument("--repeats", type=_at_least(1), help="timed calls; the table shows medians (default: 3 on CPU, "
                                                        "10 on GPU)")
    p.add_argument("--batch", type=_at_least(1), help="images per call (default: 1 on CPU, 8 on GPU); the UNet "
                                                      "forward runs the guided batch, twice this")
    p.add_argument("--resolution", type=_at_least(8), help="image side in pixels, a multiple of 8, for every "
                   "measurement (default: UNet at the model's native side; the rest 256 on CPU, native on GPU)")
    p.add_argument("--steps", type=_at_least(1), help="sampling steps (default: 4 on CPU, 20 on GPU)")
    p.add_argument("--device", choices=("cpu", "gpu"),
                   help="default: gpu when both torch and jax see one, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of both sides (default: float32 on CPU; on GPU bfloat16 "
                                                   "for sdjax and float16 for torch)")
    p.add_argument("--attention", choices=tuple(ATTENTION_IMPLS),
                   help="sdjax attention kernel (default: xla on CPU, cudnn on GPU)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "BENCHMARKS.md"), help="markdown file to update")
    p.add_argument("--cache-dir", default=cache, help=f"where the built weights are kept, per preset (default {cache})")
    return p.parse_args(argv)


def gpu_visible(asked: bool = False) -> bool:
    """Whether both torch and jax see an NVIDIA GPU, each asked in a child process of its own as the workers
    run them (so this one never initialises CUDA, and the two never load their CUDA libraries side by side).
    Unless `asked`, a machine without NVIDIA's driver files is answered at once."""
    gpus = "/proc/driver/nvidia/gpus"
    if not asked and not (os.path.isdir(gpus) and os.listdir(gpus)):
        return False
    probes = ("import torch; print(torch.cuda.is_available())", "import jax; print(jax.default_backend() == 'gpu')")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return all(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env).stdout.strip()
               == "True" for probe in probes)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The run's settings: flags, else the device's defaults. Raises ValueError naming a bad flag."""
    arch = architecture(args.preset)
    if args.resolution is not None and args.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8, got {args.resolution}")
    if args.device == "gpu" and not gpu_visible(asked=True):
        raise ValueError("--device gpu: no GPU that both torch and jax can use")
    device = args.device or ("gpu" if gpu_visible() else "cpu")
    batch, steps, sdjax_dtype, torch_dtype, attention, warmup, repeats = DEVICE_DEFAULTS[device]
    sdjax_dtype, attention = args.dtype or sdjax_dtype, args.attention or attention
    if sdjax_dtype == "float32" and attention == "cudnn":
        if args.attention:
            raise ValueError("--attention cudnn: cuDNN's flash attention takes bfloat16 or float16, not float32; "
                             "give --dtype bfloat16 or --attention dot")
        attention = "dot"
    native = native_resolution(arch)
    return Settings(
        preset=args.preset, folder=os.path.join(os.path.abspath(args.cache_dir), args.preset), device=device,
        sdjax_dtype=sdjax_dtype, torch_dtype=args.dtype or torch_dtype,
        attention=attention,
        batch=args.batch or batch, resolution=args.resolution or (min(native, 256) if device == "cpu" else native),
        unet_resolution=args.resolution or native, vae_factor=vae_factor(arch), steps=args.steps or steps,
        guidance=GUIDANCE, warmup=args.warmup or warmup, repeats=args.repeats or repeats)


def measurements_of(args: argparse.Namespace) -> tuple[str, ...]:
    """--only, else the preset's default; raises ValueError for a measurement the preset has no torch side for."""
    if args.preset != "sdxl":
        return args.only or MEASUREMENTS
    only = args.only or SDXL_MEASUREMENTS
    if "train" in only:
        raise ValueError("--only train: the torch side's train step is SD 1.x's; --preset sdxl measures "
                         "unet, sampling, vae and compile")
    return only


def check_out(path: str) -> None:
    """Fails before the measuring starts if the markdown file cannot be written (its folder is created)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out: cannot create folder {folder}: {e.strerror}") from None
    if os.path.isdir(path) or not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise ValueError(f"--out {path}: not a writable file")


def log(message: str) -> None:
    print(f"benchmarks: {message}", file=sys.stderr, flush=True)


def run_child(args: list[str]) -> tuple[int, str]:
    """Runs `python args...` from the repo root, echoing its stderr indented; (exit status, last stderr line)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stderr:
        sys.stderr.write("    " + line)
        last = line.strip() or last
    return proc.wait(), last


def run_worker(side: str, measure: str, s: Settings, label: str) -> dict:
    """One measurement in its own process: its result, or {"error": the last line it wrote to stderr}."""
    log(f"{label}: {side} {measure} ...")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        code, last = run_child(["-m", "benchmarks.worker", side, measure, s.to_json(), path])
        if code or not os.path.exists(path):
            log(f"{label}: {side} {measure} FAILED (exit {code}): {last}")
            return {"error": last or f"exit status {code}"}
        with open(path) as f:
            result = json.load(f)
    detail = f", median {report.seconds(result):.3g} s" if "seconds" in result else ""
    log(f"{label}: {side} {measure} done in {time.perf_counter() - start:.0f} s{detail}")
    return result


def measure_all(s: Settings, only: tuple[str, ...]) -> dict:
    """Results by (row, side); row "peak" is each side's matmul peak, the compile rows run the sdjax compile
    measurement twice on one persistent cache: empty, then filled by the first."""
    jobs = [("peak", side, "peak") for side in SIDES]
    for name in only:
        jobs += [(row, side, name) for row in ROWS[name] for side in sides_of(name)]
    cache = tempfile.mkdtemp(prefix="sdjax-bench-xla-")
    try:
        s = dataclasses.replace(s, cache_dir=cache)
        return {(row, side): run_worker(side, measure, s, f"[{i}/{len(jobs)}]")
                for i, (row, side, measure) in enumerate(jobs, 1)}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from_args(args)
        only = measurements_of(args)
        check_folder(settings.folder)
        check_out(args.out)
    except ValueError as e:
        print(f"benchmarks.run: error: {e}", file=sys.stderr)
        return 2
    log(f"preset {settings.preset} on {settings.device}; weights in {settings.folder}")
    if not is_built(settings.preset, settings.folder):
        log("building the shared random weights (once per preset) ...")
        code, last = run_child(["-m", "benchmarks.weights", settings.preset, settings.folder])
        if code:
            print(f"benchmarks.run: error: building weights failed: {last}", file=sys.stderr)
            return code
    results = measure_all(settings, only)
    generated = report.render(settings, only, results, f"python -m benchmarks.run {shlex.join(argv)}")
    print(generated)
    report.write(args.out, section(settings.device, preset=settings.preset)[0], generated)
    log(f"wrote the {section(settings.device, preset=settings.preset)[1]!r} section of {args.out}")
    for line in report.flops_checks(settings, results):
        log(line)
    failed = [f"{side} {name}" for (name, side), r in results.items() if "error" in r]
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
