"""What step-by-step previews cost: one sampling call with and without them, compiled first, medians.

    python -m benchmarks.preview_cost [--model FOLDER] [--batch 4] [--steps 30] [--repeats 5]

Prints the machine, then per setting the median seconds per call and the ratio to the call without
previews: VAE-decoded previews (every 10, every 5 and every step) and the fitted linear decoder (every step).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import sdjax
from benchmarks.machine import describe_machine
from benchmarks.timing import time_calls

SETTINGS = [("no previews", {}), ("vae, every 10", dict(preview_every=10)), ("vae, every 5", dict(preview_every=5)),
            ("vae, every step", dict(preview_every=1)),
            ("approx, every step", dict(preview_every=1, preview_decoder="approx"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=sdjax.DEFAULT_MODEL, help="a diffusers folder (default: the shipped model)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sd = sdjax.load(args.model)
    prompts = ["a large red triangle on a white background"] * args.batch
    print(describe_machine())
    print(f"model {args.model}, batch {args.batch}, {args.steps} steps, median of {args.repeats} calls after one "
          "compiling call")
    base = None
    for name, options in SETTINGS:
        seconds = statistics.median(time_calls(
            lambda: np.asarray(sd.generate(prompts, num_steps=args.steps, seed=0, **options)[0]), 1, args.repeats))
        base = base or seconds
        previews = args.steps // options.get("preview_every", args.steps + 1)
        print(f"{name:20s} {previews:3d} previews/image  {seconds:7.3f} s/call  x{seconds / base:.2f}")


if __name__ == "__main__":
    main()
