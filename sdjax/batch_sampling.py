"""Batch sampling jobs (what sample.py runs): prompts in, one PNG per image out."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from sdjax.png_info import SAMPLER_NAMES, format_parameters, save_png

_JSONL_KEYS = {"prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "size", "num_images",
               "init_image", "mask", "strength"}


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    scheduler: str | None
    height: int
    width: int
    init_image: str | None = None  # img2img / inpainting source file
    mask: str | None = None        # inpainting mask file (white = repaint)
    strength: float | None = None

    def batch_key(self) -> tuple:
        """Images with equal keys share one compiled program and can be batched."""
        return (self.steps, self.guidance, self.scheduler, self.height, self.width, self.init_image is not None,
                self.mask is not None, self.strength)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file, read from its header."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def read_image(path: str, size: tuple[int, int], grayscale: bool = False) -> np.ndarray:
    """An image file as float32 in [0, 1], (H, W, 3) or (H, W) if grayscale; it must be `size` (H, W)."""
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("L" if grayscale else "RGB"), np.float32) / 255
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    if pixels.shape[:2] != size:
        raise ValueError(f"{path}: image is {pixels.shape[0]}x{pixels.shape[1]} (HxW); the job's size is "
                         f"{size[0]}x{size[1]}")
    return pixels


def parse_size(text: str) -> tuple[int, int]:
    """"512" or "512x768" (height x width) -> (height, width), multiples of 8."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", str(text).strip())
    if not match:
        raise ValueError(f"size {text!r}: expected N or HxW, e.g. 512 or 512x768")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height % 8 or width % 8 or not height or not width:
        raise ValueError(f"size {text!r}: height and width must be positive multiples of 8")
    return height, width


def read_prompt_file(path: str) -> list[dict[str, Any]]:
    """Prompt entries from a text file (one prompt per line) or .jsonl (one object per line)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read prompts ({e.strerror})") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            entries.append({"prompt": line})
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f"{path}:{number}: expected an object with a string 'prompt'")
        unknown = set(entry) - _JSONL_KEYS
        if unknown:
            raise ValueError(f"{path}:{number}: unknown key(s) {sorted(unknown)} (known: {sorted(_JSONL_KEYS)})")
        entries.append(entry)
    return entries


def expand_jobs(entries: list[dict[str, Any]], *, negative_prompt: str, seed: int, steps: int, guidance: float,
                scheduler: str | None, size: tuple[int, int] | None, native_size: tuple[int, int],
                num_images: int, init_image: str | None = None, mask: str | None = None,
                strength: float | None = None) -> list[Job]:
    """One Job per image; per-entry settings override the defaults. Seeds count up from `seed`
    across all images unless an entry gives its own (then its k-th image uses seed + k).
    Without a size, a job takes its init image's size, else the model's native size."""
    jobs: list[Job] = []
    for entry in entries:
        source = entry.get("init_image", init_image)
        entry_mask = entry.get("mask", mask)
        if entry_mask is not None and source is None:
            raise ValueError(f"mask {entry_mask} given without an init image (prompt {entry['prompt'][:40]!r})")
        entry_size = parse_size(entry["size"]) if "size" in entry else size
        height, width = entry_size or (image_size(source) if source else native_size)
        for path in (source, entry_mask):
            if path is not None and (found := image_size(path)) != (height, width):
                raise ValueError(f"{path}: image is {found[0]}x{found[1]} (HxW); the job's size is {height}x{width}")
        entry_strength = entry.get("strength", strength)
        if entry_strength is not None and not 0 < float(entry_strength) <= 1:
            raise ValueError(f"strength must be in (0, 1], got {entry_strength} (prompt {entry['prompt'][:40]!r})")
        count = int(entry.get("num_images", num_images))
        for k in range(count):
            image_seed = int(entry["seed"]) + k if "seed" in entry else seed + len(jobs)
            job = Job(entry["prompt"], entry.get("negative_prompt", negative_prompt), image_seed,
                      int(entry.get("steps", steps)), float(entry.get("guidance", guidance)),
                      entry.get("scheduler", scheduler), height, width, source, entry_mask,
                      None if entry_strength is None else float(entry_strength))
            if job.steps < 1:
                raise ValueError(f"steps must be >= 1, got {job.steps} (prompt {job.prompt[:40]!r})")
            jobs.append(job)
    return jobs


def batches(jobs: list[Job], batch_size: int) -> Iterator[list[Job]]:
    """Consecutive jobs with the same batch_key, at most batch_size at a time."""
    current: list[Job] = []
    for job in jobs:
        if current and (len(current) == batch_size or job.batch_key() != current[0].batch_key()):
            yield current
            current = []
        current.append(job)
    if current:
        yield current


def next_index(out_dir: str) -> int:
    """The first image number after those already in out_dir, so reruns never overwrite."""
    numbers = [int(m.group(1)) for name in os.listdir(out_dir) if (m := re.fullmatch(r"(\d+)-.*\.png", name))]
    return max(numbers, default=-1) + 1


def prepare_out_dir(out_dir: str) -> None:
    """Creates out_dir and checks that it is writable, before any compute."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot create ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_dir}: not writable")


def run(sd, jobs: list[Job], out_dir: str, batch_size: int, model_name: str) -> list[str]:
    """Generates every job, writing <n>-<seed>.png files; returns their paths."""
    index = next_index(out_dir)
    paths = []
    groups = list(batches(jobs, batch_size))
    start = time.perf_counter()
    for group in tqdm(groups, desc="batches", unit="batch"):
        first = group[0]
        size = (first.height, first.width)
        init = np.stack([read_image(j.init_image, size) for j in group]) if first.init_image else None
        masks = np.stack([read_image(j.mask, size, grayscale=True) for j in group]) if first.mask else None
        images = sd.generate([j.prompt for j in group], [j.negative_prompt for j in group], num_steps=first.steps,
                             guidance_scale=first.guidance, scheduler=first.scheduler, height=first.height,
                             width=first.width, seed=[j.seed for j in group], init_image=init, mask=masks,
                             strength=first.strength)
        for job, image in zip(group, images):
            sampler = job.scheduler or sd.scheduler_config.get("_class_name", "")
            settings = {"Steps": job.steps, "Sampler": SAMPLER_NAMES.get(sampler, sampler), "CFG scale": job.guidance,
                        "Seed": job.seed, "Size": f"{job.width}x{job.height}", "Model": model_name}
            if job.init_image:
                settings["Denoising strength"] = job.strength or (1.0 if job.mask else 0.8)
            path = os.path.join(out_dir, f"{index:05d}-{job.seed}.png")
            save_png(path, image, format_parameters(job.prompt, job.negative_prompt, settings))
            paths.append(path)
            index += 1
    elapsed = time.perf_counter() - start
    print(f"wrote {len(paths)} images to {out_dir} in {elapsed:.1f} s ({len(paths) / elapsed:.2f} images/s, "
          f"including compilation)")
    return paths
