"""How far a bfloat16 / float16 VAE decode lands from float32 on a trained VAE (the shipped model's).

    python -m benchmarks.vae_dtype [--model FOLDER]

Samples latents with the model (float32), decodes them in each dtype (parameters cast to it) and prints
the error of each decode against float32's in [0, 1] image space.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import sdjax

PROMPTS = ["a large red circle on a blue background", "a small green square on a white background",
           "a yellow triangle on a black background", "a large blue star on a yellow background"]


def decode(sd: sdjax.StableDiffusion, latents: jax.Array, dtype) -> np.ndarray:
    """Images in [0, 1] (float32 numpy) of `latents` decoded by sd's VAE computing and stored in `dtype`."""
    vae = sd.model.vae.clone(dtype=dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), sd.params["vae"])
    scaled = (latents / vae.config.scaling_factor).astype(dtype)
    out = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(params, scaled)
    return np.clip((np.asarray(out, np.float32) + 1) / 2, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=sdjax.DEFAULT_MODEL, help="a diffusers folder (default: the shipped model)")
    args = parser.parse_args()
    sd = sdjax.load(args.model)
    prompts = PROMPTS * 2
    latents = sd.generate(prompts, num_steps=30, seed=list(range(len(prompts))), output="latents")
    reference = decode(sd, latents, jnp.float32)
    for dtype in (jnp.bfloat16, jnp.float16):
        images = decode(sd, latents, dtype)
        error = np.abs(images - reference)
        levels = np.abs(np.round(images * 255) - np.round(reference * 255))
        print(f"{jnp.dtype(dtype).name}: max abs {error.max():.4f}, mean abs {error.mean():.5f}, "
              f"8-bit values off by more than one level {np.mean(levels > 1):.2%}")


if __name__ == "__main__":
    main()
