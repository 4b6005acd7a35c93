"""Batch sampling: prompts in, one PNG per image out (settings in each PNG's `parameters`).

    python sample.py --prompt "a large green triangle on a white background"    (the shipped shapes model)
    python sample.py --model path/to/diffusers-folder --prompt "a red circle" --num-images 4 --out out/
    python sample.py --model ... --prompts-file prompts.jsonl --batch-size 8
    python sample.py --model ... --prompt "..." --init-image in.png --strength 0.6 --out out/       (img2img)
    python sample.py --model ... --prompt "..." --init-image in.png --mask mask.png --out out/      (inpainting)
    python sample.py --model sdxl-base --refiner sdxl-refiner --refiner-switch 0.8 --prompt "..."  (SDXL)
    python sample.py --model v1-5.safetensors --lora style.safetensors:0.7 --lora detail.safetensors --prompt "..."
    python sample.py --prompt-syntax a1111 --prompt "a (large:1.3) green [triangle] BREAK white background"
    python sample.py --model ... --embedding learned_embeds.safetensors:<my-cat> --prompt "a photo of <my-cat>"
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    from sdjax.batch_sampling import add_field_flags
    from sdjax.cli import OneLineParser

    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a diffusers Stable Diffusion folder (model_index.json inside) or a single-file "
                                   "checkpoint (.safetensors in the original layout: SD 1.x, 2.x, inpainting, SDXL "
                                   "base or refiner, told apart by its keys); default: the small shapes model "
                                   "shipped with sdjax (configs/shapes_model.py)")
    p.add_argument("--model-config", metavar="FOLDER",
                   help="for a single-file --model: a diffusers folder of the same family whose configs, tokenizers "
                        "and scheduler describe it (default: those sdjax ships for the family)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="what the model predicts, overriding its scheduler config (single files without "
                        "--model-config: v_prediction for SD 2.x and files marked v_pred, else epsilon)")
    p.add_argument("--ema", action="store_true", help="a single-file --model's EMA weights, where it holds both")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", help="one prompt per line, or .jsonl with objects holding 'prompt' and "
                                          "optionally any per-image setting below by its name (negative_prompt, "
                                          "seed, steps, guidance, scheduler, size, num_images, init_image, mask, "
                                          "strength, lora), checked like the flag; every line is checked before the "
                                          "first image")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (diffusers' learned_embeds, A1111's, SDXL's clip_l/clip_g; "
                        ".safetensors) whose word prompts can then use; TOKEN defaults to the name the file gives "
                        "(its key, or its file name). Repeat for several")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pickled files (.ckpt/.bin/.pt) for --model, --lora and --embedding: unpickling "
                        "can run code, so only for files you trust")
    p.add_argument("--save-steps", type=int, metavar="K",
                   help="also write a preview every K denoising steps beside each image (<name>.step010.png, ...) "
                        "and all of them with the image in one strip (<name>.steps.png): noise becoming an image")
    p.add_argument("--preview", choices=["x0", "latents"], default="x0",
                   help="what --save-steps shows: x0, the clean image predicted at that step (A1111's live preview), "
                        "or latents, the noisy latents after it (default x0)")
    p.add_argument("--preview-decoder", choices=["vae", "approx"], default="vae",
                   help="decode previews with the VAE (exact), or approx: a linear latent-to-RGB map fitted to the "
                        "VAE, one colour per latent pixel, nearly free (default vae)")
    p.add_argument("--prompt-syntax", choices=["plain", "a1111"], default="plain",
                   help="plain: prompts as written, truncated to the text encoder's window (diffusers' behaviour); "
                        "a1111: AUTOMATIC1111's (word), (word:1.3), [word] weighting, \\( escapes, BREAK, and "
                        "prompts longer than one window (default plain)")
    add_field_flags(p)  # the per-image settings: defaults for every prompt
    p.add_argument("--refiner", help="an SDXL refiner folder or single file: the --model (an SDXL base) denoises until "
                                     "--refiner-switch, the refiner does the rest (text-to-image jobs only)")
    p.add_argument("--refiner-switch", type=float, default=0.8,
                   help="fraction of the schedule the base runs before the refiner takes over (default 0.8)")
    p.add_argument("--batch-size", type=int, default=4, help="images per compiled batch (default 4)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--out", default="out", help="output directory (created; existing images are kept; default out/)")
    return p.parse_args(argv)


def model_name(path: str) -> str:
    """A model's name in the PNG parameters, as A1111 writes it: the folder's or the file's, without extension."""
    from sdjax import storage

    if storage.is_remote(path):
        name = path.rstrip("/").rsplit("/", 1)[-1]
    else:
        name = os.path.basename(os.path.normpath(path))
    return os.path.splitext(name)[0] if storage.isfile(path) else name


def main(argv: list[str]) -> int:
    """Checks the whole job (flags, every prompts-file line, the files they name, the model), then
    creates --out and writes one PNG per image. Bad input: one line on stderr, exit 2, nothing written."""
    args = parse_args(argv)
    from sdjax import backends

    backends.prepare()  # before JAX starts its backends
    import sdjax
    from sdjax import batch_sampling as job
    from sdjax import storage
    from sdjax.cli import check_output_dir
    from sdjax.pipeline import SamplingError

    try:
        flags = job.flag_settings(args)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.refiner and not 0 < args.refiner_switch < 1:
            raise ValueError(f"--refiner-switch must be in (0, 1), got {args.refiner_switch}")
        entries = [job.Entry(p, {}, "--prompt") for p in args.prompt]
        entries += job.read_prompt_file(args.prompts_file) if args.prompts_file else []
        if not entries:
            raise ValueError("no prompts: give --prompt or --prompts-file")
        job.check_prompt_syntax(entries, flags, args.prompt_syntax)
        check_output_dir(args.out, "--out")  # created only once the whole job is checked

        import jax.numpy as jnp

        from sdjax.pipeline import enable_compilation_cache
        from sdjax.schedulers import scheduler_name
        from sdjax.textual_inversion import read_embedding

        model = args.model or sdjax.DEFAULT_MODEL
        for flag, path in (("--model", model), ("--model-config", args.model_config), ("--refiner", args.refiner)):
            if path and storage.is_remote(path):
                storage.check_readable(path, flag)  # no such bucket or object: one line, before any download
        single = storage.isfile(model)
        if not single and (args.model_config or args.ema):
            raise ValueError(f"--model-config and --ema are for a single-file --model; {model} is not a file")
        embeddings = {}  # word -> its file's vectors
        for text in args.embedding:
            path, token = job.parse_embedding(text)
            embedding = read_embedding(path, allow_pickle=args.allow_pickle)
            word = token or embedding.name
            if word in embeddings:
                raise ValueError(f"--embedding {path}: word {word!r} is also {embeddings[word].path}'s; give each "
                                 "its own as FILE:TOKEN")
            embeddings[word] = embedding
        sd = sdjax.load(model, dtype=getattr(jnp, args.dtype), config=args.model_config, ema=args.ema,
                        prediction_type=args.prediction_type, allow_pickle=args.allow_pickle)
        for word, embedding in embeddings.items():
            sd = sd.with_textual_inversion(embedding, word)
        unet, vae = sd.model.unet, sd.model.vae
        native = unet.config.sample_size * vae.config.downscale
        jobs = job.expand_jobs(entries, flags, native_size=(native, native),
                               default_scheduler=lambda: scheduler_name(sd.model.scheduler_config),
                               inpainting_unet=unet.config.in_channels != vae.config.latent_channels)
        refiner = None
        if args.refiner:
            if any(j.init_image for j in jobs):
                raise ValueError("--refiner: only for text-to-image jobs (no --init-image / init_image)")
            refined = sdjax.load(args.refiner, dtype=getattr(jnp, args.dtype), allow_pickle=args.allow_pickle)
            for word, embedding in embeddings.items():  # SDXL embeddings: the refiner takes their clip_g vectors
                refined = refined.with_textual_inversion(embedding, word)
            refiner = job.Refiner(refined, args.refiner_switch, model_name(args.refiner))
            job.check_refiner(sd, refiner)
        if args.save_steps is None and (args.preview != "x0" or args.preview_decoder != "vae"):
            raise ValueError("--preview / --preview-decoder: only with --save-steps")
        steps = None if args.save_steps is None else job.StepImages(args.save_steps, args.preview,
                                                                     args.preview_decoder)
        job.check_save_steps(jobs, steps, refiner is not None, dict(sd.model.scheduler_config))
        loras = job.read_loras(sd, jobs, args.allow_pickle)
        job.prepare_out_dir(args.out)
        enable_compilation_cache()
        job.run(sd, jobs, args.out, args.batch_size, model_name(model), refiner, loras, args.prompt_syntax,
                {word: e.path for word, e in embeddings.items()}, steps)
    except (ValueError, sdjax.CheckpointError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    except SamplingError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
