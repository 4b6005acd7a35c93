"""Batch sampling: prompts in, one PNG per image out (settings in each PNG's `parameters`).

    python sample.py --prompt "a large green triangle on a white background"    (the shipped shapes model)
    python sample.py --model path/to/diffusers-folder --prompt "a red circle" --num-images 4 --out out/
    python sample.py --model ... --prompts-file prompts.jsonl --batch-size 8
    python sample.py --model ... --prompt "..." --init-image in.png --strength 0.6 --out out/       (img2img)
    python sample.py --model ... --prompt "..." --init-image in.png --mask mask.png --out out/      (inpainting)
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a diffusers Stable Diffusion folder (model_index.json inside); default: the "
                                   "small shapes model shipped with sdjax (configs/shapes_model.py)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", help="one prompt per line, or .jsonl with objects holding 'prompt' and "
                                          "optional negative_prompt, seed, steps, guidance, scheduler, size, num_images, "
                                          "init_image, mask, strength")
    p.add_argument("--negative-prompt", default="", help="negative prompt for every image (default: none)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="images per compiled batch (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; later images count up (default 0)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5; <=1 off)")
    p.add_argument("--scheduler", help="scheduler family (default: the checkpoint's own)")
    p.add_argument("--size", help="N or HxW in pixels, multiples of 8 (default: the init image's size, else the "
                                  "model's native size)")
    p.add_argument("--init-image", help="img2img / inpainting source image (its size must be the job's size)")
    p.add_argument("--mask", help="inpainting mask image, same size: white = repaint, black = keep")
    p.add_argument("--strength", type=float, help="share of the schedule run from the noised init image, in (0, 1] "
                                                  "(default 0.8 for img2img, 1.0 for inpainting)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--out", default="out", help="output directory (created; existing images are kept; default out/)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import jax.numpy as jnp

    import sdjax
    from sdjax import batch_sampling as job
    from sdjax.pipeline import enable_compilation_cache
    from sdjax.schedulers import SCHEDULERS

    try:
        entries = [{"prompt": p} for p in args.prompt] + (job.read_prompt_file(args.prompts_file)
                                                         if args.prompts_file else [])
        if not entries:
            raise ValueError("no prompts: give --prompt or --prompts-file")
        if args.scheduler and args.scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler {args.scheduler!r} is unknown; known: {', '.join(SCHEDULERS)}")
        for flag, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size),
                            ("--steps", args.steps)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        job.prepare_out_dir(args.out)
        enable_compilation_cache()
        model = args.model or sdjax.DEFAULT_MODEL
        sd = sdjax.load(model, dtype=getattr(jnp, args.dtype))
        native = sd.unet.config.sample_size * sd.vae.config.downscale
        jobs = job.expand_jobs(entries, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                               guidance=args.guidance, scheduler=args.scheduler,
                               size=job.parse_size(args.size) if args.size else None, native_size=(native, native),
                               num_images=args.num_images, init_image=args.init_image, mask=args.mask,
                               strength=args.strength)
        job.run(sd, jobs, args.out, args.batch_size, os.path.basename(os.path.normpath(model)))
    except (ValueError, sdjax.CheckpointError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
