"""The GPU check: one command for a machine with an NVIDIA GPU, in under 10 minutes (BENCHMARKS.md):

    pip install torch==<a CUDA build> -e ".[test]" "jax[cuda12]"      # or jax[cuda13]
    python -m benchmarks.gpu_check

1. Correctness on the shipped model (sdjax.DEFAULT_MODEL; no downloads), the same program on the GPU and on
   the CPU of the same process:
   - sampling (text encoder, UNet scan with guidance, VAE decode) in float32, matmuls at full precision
     (no TF32), against the CPU: max pixel difference <= F32_PIXELS;
   - sampling in bfloat16 on the GPU against float32 on the CPU: mean pixel error within BF16_FACTOR x what
     bfloat16 costs on the CPU itself (+ BF16_SLACK);
   - attention at SD's shapes (head dims 40/80/160/64, 1024-4096 queries, 77 context keys), bfloat16: cuDNN's
     flash kernel and the one-op form each against a float32 reference; cuDNN's error <= BF16_FACTOR x the
     one-op form's (+ BF16_SLACK). cuDNN takes head dims above 128 only on Hopper (H100/H200) and later;
     elsewhere those shapes are listed as skipped.
2. The GPU benchmark table: `python -m benchmarks.run --device gpu` (its GPU section of BENCHMARKS.md).

Exit status: 0 all passed, 1 a check failed (the table is not run), 2 no GPU visible to JAX or bad flags.
`--accelerator cpu` runs the checks with the CPU standing in for the GPU (and the one-op form for cuDNN): a
test of this script on machines without a GPU, not a GPU result.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

F32_PIXELS = 2e-3       # images in [0, 1]; float32 with full-precision matmuls on both sides
BF16_FACTOR = 2.0       # a GPU bfloat16 error may be this many times the CPU's (different kernels)
BF16_SLACK = 2e-3
PROMPTS = ("a large green triangle on a white background", "a small red circle on a blue background")
# (batch, queries, keys, heads, head dim): SD 1.x self-attention at 64^2 and 32^2 latents, cross-attention
# to 77 tokens, the 16^2 level's 160-wide heads, SD 2.x / SDXL's 64-wide heads.
ATTENTION_SHAPES = ((2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80), (2, 4096, 77, 8, 40),
                    (2, 256, 256, 8, 160), (2, 4096, 4096, 5, 64), (2, 1024, 77, 10, 64))


@dataclasses.dataclass
class Check:
    name: str
    passed: bool | None   # None: skipped
    detail: str


def _model_on(device, dtype):
    import jax

    import sdjax

    sd = sdjax.load(sdjax.DEFAULT_MODEL, dtype=dtype, attention_impl="xla", to_device=False)
    return dataclasses.replace(sd, params=jax.device_put(dict(sd.params), device))


def _images(sd, steps: int):
    return sd.generate(list(PROMPTS), num_steps=steps, guidance_scale=7.5, seed=0)


def sampling_checks(accel, cpu, steps: int = 8) -> list[Check]:
    """float32 and bfloat16 sampling on `accel` against float32 on `cpu`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    with jax.default_matmul_precision("highest"):
        ref = _images(_model_on(cpu, jnp.float32), steps)
        got = _images(_model_on(accel, jnp.float32), steps)
    f32_err = float(np.abs(got - ref).max())
    checks = [Check("sampling float32 vs CPU", f32_err <= F32_PIXELS,
                    f"max pixel difference {f32_err:.2e} (limit {F32_PIXELS:.0e})")]
    cpu_bf16 = float(np.abs(_images(_model_on(cpu, jnp.bfloat16), steps) - ref).mean())
    accel_bf16 = float(np.abs(_images(_model_on(accel, jnp.bfloat16), steps) - ref).mean())
    limit = BF16_FACTOR * cpu_bf16 + BF16_SLACK
    checks.append(Check("sampling bfloat16 vs CPU float32", accel_bf16 <= limit,
                        f"mean pixel error {accel_bf16:.2e} (CPU bfloat16: {cpu_bf16:.2e}; limit {limit:.2e})"))
    return checks


def attention_checks(accel, kernel: str, reference_kernel: str = "dot",
                     shapes: tuple[tuple[int, ...], ...] = ATTENTION_SHAPES) -> list[Check]:
    """`kernel` against `reference_kernel` (both bfloat16) on `accel`, each measured against float32, at
    `shapes` (batch, queries, keys, heads, head dim)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sdjax.models.attention import attention_fn

    hopper = "H100" in accel.device_kind or "H200" in accel.device_kind or "B200" in accel.device_kind
    checks = []
    for batch, queries, keys, heads, depth in shapes:
        name = f"attention {kernel} vs one-op, {queries}x{keys} tokens, {heads} heads of {depth}"
        if kernel == "cudnn" and depth > 128 and not hopper:
            checks.append(Check(name, None, f"skipped: cuDNN takes head dims > 128 on Hopper only "
                                            f"({accel.device_kind})"))
            continue
        rng = np.random.default_rng(depth + queries)
        q, k, v = (jax.device_put(rng.standard_normal((batch, n, heads, depth), np.float32), accel)
                   for n in (queries, keys, keys))
        with jax.default_matmul_precision("highest"):
            exact = np.asarray(jax.jit(lambda q, k, v: attention_fn("dot")(q, k, v, causal=False, upcast=False))(
                q, k, v))
        errors = {}
        for impl in (kernel, reference_kernel):
            run = jax.jit(lambda q, k, v, impl=impl: attention_fn(impl)(q, k, v, causal=False, upcast=False))
            out = run(*(t.astype(jnp.bfloat16) for t in (q, k, v)))
            errors[impl] = float(np.abs(np.asarray(out, np.float32) - exact).max())
        limit = BF16_FACTOR * errors[reference_kernel] + BF16_SLACK
        checks.append(Check(name, errors[kernel] <= limit,
                            f"max error {errors[kernel]:.2e} (one-op bfloat16: {errors[reference_kernel]:.2e}; "
                            f"limit {limit:.2e})"))
    return checks


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu",
                   help="the device checked (cpu: a dry run of this script, no GPU figures)")
    p.add_argument("--no-table", action="store_true", help="only the correctness checks")
    p.add_argument("--steps", type=int, default=8, help="sampling steps of the correctness checks (default 8)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Both platforms in one process: the GPU and the CPU it is compared with. Pinned, so that a jax that
    # cannot start CUDA fails here instead of comparing the CPU with itself.
    os.environ["JAX_PLATFORMS"] = "cuda,cpu" if args.accelerator == "gpu" else "cpu"
    import jax

    try:
        cpu = jax.devices("cpu")[0]
        accel = jax.devices("gpu")[0] if args.accelerator == "gpu" else cpu
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"benchmarks.gpu_check: error: JAX sees no GPU ({first}); install a CUDA jax, e.g. "
              f"pip install \"jax[cuda12]\"", file=sys.stderr)
        return 2
    print(f"gpu_check: {accel.device_kind} ({accel.platform}) against {cpu.device_kind} (cpu), jax {jax.__version__}")
    start = time.perf_counter()
    checks = sampling_checks(accel, cpu, args.steps)
    checks += attention_checks(accel, "cudnn" if args.accelerator == "gpu" else "xla")
    for c in checks:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[c.passed]
        print(f"  {mark} {c.name}: {c.detail}")
    failed = [c for c in checks if c.passed is False]
    print(f"gpu_check: {len(checks) - len(failed)} of {len(checks)} checks passed or skipped "
          f"in {time.perf_counter() - start:.0f} s")
    if failed:
        return 1
    if args.no_table or args.accelerator != "gpu":
        return 0
    return subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", "gpu"], cwd=REPO_ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
