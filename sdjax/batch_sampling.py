"""Batch sampling jobs (what sample.py runs): prompts in, one PNG per image out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import secrets
import time
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from sdjax import storage
from sdjax.png_info import SAMPLER_NAMES, format_parameters, save_png
from sdjax.seeds import SEED_LIMIT

@dataclasses.dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    scheduler: str  # a name of sdjax.schedulers.SCHEDULERS
    height: int
    width: int
    init_image: str | None = None  # img2img / inpainting source file
    mask: str | None = None        # inpainting mask file (white = repaint)
    strength: float | None = None
    karras: bool = False  # Karras sigmas (use_karras_sigmas)
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA file, scale), merged into the model for this image

    def batch_key(self) -> tuple:
        """Images with equal keys share one compiled program and one set of weights, and can be batched."""
        return (self.steps, self.guidance, self.scheduler, self.karras, self.height, self.width,
                self.init_image is not None, self.mask is not None, self.strength, self.loras)


def effective_strength(strength: float | None, mask: str | None) -> float:
    """The strength an img2img / inpainting job runs at: its own, else generate's default (0.8, 1.0 with a mask)."""
    return strength or (1.0 if mask else 0.8)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file, read from its header (a remote file is read whole)."""
    try:
        with Image.open(storage.readable(path)) as im:
            return im.height, im.width
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def read_image(path: str, size: tuple[int, int], grayscale: bool = False) -> np.ndarray:
    """An image file as float32 in [0, 1], (H, W, 3) or (H, W) if grayscale; it must be `size` (H, W)."""
    try:
        with Image.open(storage.readable(path)) as im:
            pixels = np.asarray(im.convert("L" if grayscale else "RGB"), np.float32) / 255
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    if pixels.shape[:2] != size:
        raise ValueError(f"{path}: image is {pixels.shape[0]}x{pixels.shape[1]} (HxW); the job's size is "
                         f"{size[0]}x{size[1]}")
    return pixels


def parse_size(text: str | int) -> tuple[int, int]:
    """"512" or "512x768" (height x width) -> (height, width), multiples of 8."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", str(text).strip())
    if not match:
        raise ValueError(f"{text!r}: expected N or HxW, e.g. 512 or 512x768")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height % 8 or width % 8 or not height or not width:
        raise ValueError(f"{text!r}: height and width must be positive multiples of 8")
    return height, width


# The per-image settings, each both a sample.py flag (--num-images) and a prompts-file key (num_images),
# checked by the same rule whichever way it arrives. A new per-image setting is one more Field.

def _at_least(low: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be >= {low}, got {value}")
        return value
    return check


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def _strength(value: float) -> float:
    if not 0 < value <= 1:  # also false for NaN
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def _seed(value: int) -> int:
    if not (value == RANDOM_SEED or 0 <= value < SEED_LIMIT):
        raise ValueError(f"must be an integer in [0, 2**64), or {RANDOM_SEED} for a random seed; got {value}")
    return value


def _scheduler(value: str) -> str:
    from sdjax.schedulers import SCHEDULERS

    if value not in SCHEDULERS:
        raise ValueError(f"{value!r} is unknown; known: {', '.join(SCHEDULERS)}")
    return value


SCHEDULES = ("default", "karras")


def _schedule(value: str) -> str:
    if value not in SCHEDULES:
        raise ValueError(f"{value!r} is unknown; known: {', '.join(SCHEDULES)}")
    return value


def _size(value: str | int) -> str | int:
    parse_size(value)
    return value


def _image_file(path: str) -> str:
    image_size(path)  # readable, with a header that gives its size
    return path


def split_suffix(text: str) -> tuple[str, str | None]:
    """"FILE" or "FILE:SUFFIX" -> (FILE, SUFFIX or None); an existing file whose name holds ":" is taken whole,
    as is the "://" of a URL (gs://bucket/file.safetensors:0.7)."""
    name = text.split("://", 1)[1] if storage.is_remote(text) else text
    if ":" not in name or storage.isfile(text):
        return text, None
    path, _, suffix = text.rpartition(":")
    return path, suffix


def parse_embedding(text: str) -> tuple[str, str | None]:
    """"FILE" or "FILE:TOKEN" -> (FILE, TOKEN or None: the name the file gives); the file must exist."""
    path, token = split_suffix(text)
    if not storage.isfile(path):
        raise ValueError(f"--embedding {path}: file not found")
    if token is not None and not token.strip():
        raise ValueError(f"--embedding {text!r}: empty token after ':'")
    return path, token


def parse_lora(text: str) -> tuple[str, float]:
    """"FILE" or "FILE:SCALE" -> (FILE, scale; default 1.0); the file must exist."""
    path, scale = split_suffix(text)
    scale = "1" if scale is None else scale
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(f"{text!r}: scale {scale!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r}: scale must be a finite number")
    if not storage.isfile(path):
        raise ValueError(f"{path}: LoRA file not found")
    return path, value


def _loras(value: str | list) -> tuple[tuple[str, float], ...]:
    items = [value] if isinstance(value, str) else value
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"must be FILE[:SCALE] strings, got {json.dumps(value)}")
    return tuple(parse_lora(item) for item in items)


@dataclasses.dataclass(frozen=True)
class Field:
    """One per-image setting: its value type, its check (returns the value to use or raises ValueError
    with the problem), its default and help."""

    kind: type                  # int, float or str: the flag's type, and the JSON type a prompts file must give
    check: Callable[[Any], Any] = lambda value: value
    default: Any = None
    help: str = ""
    json_kinds: tuple[type, ...] = ()  # JSON types accepted instead of (kind,)
    repeated: bool = False             # a flag given once per value (action="append")

    def check_json(self, value: Any) -> None:
        """Raises ValueError unless `value` (from JSON) has this setting's type; ints count as floats."""
        kinds = self.json_kinds or (self.kind,)
        accepted = kinds + ((int,) if float in kinds else ())
        if isinstance(value, bool) or not isinstance(value, accepted):
            names = {int: "an integer", float: "a number", str: "a string", list: "a list"}
            raise ValueError(f"must be {' or '.join(names[k] for k in kinds)}, got {json.dumps(value)}")


RANDOM_SEED = -1
FIELDS: dict[str, Field] = {
    "negative_prompt": Field(str, default="", help="negative prompt (default: none)"),
    "seed": Field(int, _seed, 0, "seed of the first image, later images count up; integers in [0, 2**64), "
                                 f"{RANDOM_SEED} draws a random one (recorded in the PNG) (default 0)"),
    "steps": Field(int, _at_least(1), 30, "denoising steps (default 30)"),
    "guidance": Field(float, _finite, 7.5, "classifier-free guidance scale (default 7.5; <= 1: unguided)"),
    "scheduler": Field(str, _scheduler, None, "scheduler family (default: the checkpoint's own)"),
    "schedule": Field(str, _schedule, "default", "sigma schedule: default (the scheduler's) or karras (for lms, "
                                                 "euler, heun, dpmpp_2m, unipc; dpmpp_2m + karras is A1111's "
                                                 "'DPM++ 2M Karras') (default: default)"),
    "size": Field(str, _size, None, "N or HxW in pixels, multiples of 8 (default: the init image's size, else the "
                                    "model's native size)", json_kinds=(int, str)),
    "num_images": Field(int, _at_least(1), 1, "images per prompt (default 1)"),
    "init_image": Field(str, _image_file, None, "img2img / inpainting source image (its size must be the job's)"),
    "mask": Field(str, _image_file, None, "inpainting mask image, same size: white = repaint, black = keep"),
    "strength": Field(float, _strength, None, "share of the schedule run from the noised init image, in (0, 1] "
                                              "(default 0.8 for img2img, 1.0 for inpainting)"),
    "lora": Field(str, _loras, None, "FILE[:SCALE] (repeat for several): a kohya or PEFT LoRA merged into the "
                                     "model at SCALE (default 1); in a prompts file a string or a list of them, "
                                     "replacing the flags' for that line", json_kinds=(str, list), repeated=True),
}


def flag(key: str) -> str:
    """The sample.py flag of a per-image setting: num_images -> --num-images."""
    return "--" + key.replace("_", "-")


def add_field_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Field; a flag left out is None (the Field's default applies later)."""
    for key, field in FIELDS.items():
        parser.add_argument(flag(key), type=field.kind, help=field.help,
                            **({"action": "append"} if field.repeated else {}))


def check_field(key: str, value: Any, where: str, from_json: bool = False) -> Any:
    """The checked value of setting `key`; ValueError "<where> <problem>" otherwise."""
    try:
        if from_json:
            FIELDS[key].check_json(value)
        return FIELDS[key].check(value)
    except ValueError as e:
        raise ValueError(f"{where} {e}") from None


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The per-image settings given as flags, checked (values as given; sizes stay text)."""
    given = {key: getattr(args, key) for key in FIELDS if getattr(args, key) is not None}
    for key, value in given.items():
        check_field(key, value, flag(key))
    return given


@dataclasses.dataclass(frozen=True)
class Entry:
    """A prompt and the settings it gives itself, with where it came from (for error messages)."""

    prompt: str
    settings: dict[str, Any]
    where: str  # "prompts.jsonl:3", or "--prompt" for a command-line prompt

    def source(self, key: str) -> str:
        """Where this entry's value of `key` comes from: its file line's key, else the flag."""
        return f"{self.where}: {key}" if key in self.settings else flag(key)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def read_prompt_file(path: str) -> list[Entry]:
    """Checked prompt entries from a text file (one prompt per line) or .jsonl (one object per line):
    every line's keys, value types and bounds, schedulers, sizes and image files, before any work."""
    try:
        lines = bytes(storage.read_bytes(path)).splitlines()
    except OSError as e:
        raise ValueError(f"--prompts-file {path}: cannot read ({e.strerror or e})") from None
    entries = []
    for number, raw in enumerate(lines, 1):
        where = f"{path}:{number}"
        line = _decode(raw, where)
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            entries.append(Entry(line, {}, where))
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f"{where}: expected an object with a string 'prompt'")
        prompt = entry.pop("prompt")
        unknown = set(entry) - set(FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(['prompt', *FIELDS])})")
        for key, value in entry.items():
            check_field(key, value, f"{where}: {key}", from_json=True)
        entries.append(Entry(prompt, entry, where))
    return entries


def expand_jobs(entries: list[Entry], flags: dict[str, Any], *, native_size: tuple[int, int],
                default_scheduler: Callable[[], str], inpainting_unet: bool = False,
                draw_seed: Callable[[], int] = lambda: secrets.randbelow(2**32)) -> list[Job]:
    """One Job per image, every setting checked against the others and the model before any work.

    Per-entry settings override the flags, which override the Field defaults. Seeds count up from the
    seed flag across all images unless an entry gives its own (then its k-th image uses seed + k); a
    seed of RANDOM_SEED is drawn once (below 2**32) where it is set. Without a size, a job takes its
    init image's size, else the model's native size. `default_scheduler()` names the model's own
    scheduler family, asked for only if some job uses it.
    """
    from sdjax.schedulers import KARRAS_FAMILIES

    defaults = {key: field.default for key, field in FIELDS.items()} | flags
    if defaults["seed"] == RANDOM_SEED:
        defaults["seed"] = draw_seed()
    if "strength" in flags and "init_image" not in flags and not any("init_image" in e.settings for e in entries):
        raise ValueError("--strength given without --init-image (nor an init_image in the prompts file)")
    jobs: list[Job] = []
    for entry in entries:
        s = defaults | entry.settings
        source, mask, strength = s["init_image"], s["mask"], s["strength"]
        if mask is not None and source is None:
            raise ValueError(f"{entry.source('mask')} {mask}: mask given without an init image")
        if strength is not None and source is None and "strength" in entry.settings:
            raise ValueError(f"{entry.source('strength')} given without an init image")
        if inpainting_unet and mask is None:
            raise ValueError(f"{entry.where}: this model's UNet is an inpainting UNet (9 input channels); "
                             "give init_image and mask")
        height, width = parse_size(s["size"]) if s["size"] else image_size(source) if source else native_size
        for key in ("init_image", "mask"):
            if s[key] is not None and (found := image_size(s[key])) != (height, width):
                raise ValueError(f"{entry.source(key)} {s[key]}: image is {found[0]}x{found[1]} (HxW); the job's "
                                 f"size is {height}x{width}")
        if source is None:
            strength = None  # a --strength default applies to the prompts with an init image
        else:
            effective = effective_strength(strength, mask)
            if int(s["steps"] * effective) < 1:
                raise ValueError(f"{entry.where}: {s['steps']} steps at strength {effective} leave no denoising "
                                 "step; give more steps or a higher strength")
        seed = s["seed"]
        if "seed" not in entry.settings:
            seed += len(jobs)  # count up across all images
        elif seed == RANDOM_SEED:
            seed = draw_seed()
        if seed + s["num_images"] - 1 >= SEED_LIMIT:
            raise ValueError(f"{entry.source('seed')} {seed} + {s['num_images'] - 1} more images: seeds must stay "
                             "below 2**64")
        scheduler = s["scheduler"] or default_scheduler()
        karras = s["schedule"] == "karras"
        if karras and scheduler not in KARRAS_FAMILIES:
            raise ValueError(f"{entry.source('schedule')} karras: scheduler {scheduler!r} has no Karras schedule; "
                             f"use one of {', '.join(KARRAS_FAMILIES)}")
        loras = _loras(s["lora"]) if s["lora"] else ()
        for k in range(s["num_images"]):
            jobs.append(Job(entry.prompt, s["negative_prompt"], seed + k, s["steps"], float(s["guidance"]),
                            scheduler, height, width, source, mask, None if strength is None else float(strength),
                            karras, loras))
    return jobs


def check_prompt_syntax(entries: list[Entry], flags: dict[str, Any], syntax: str) -> None:
    """Every prompt and negative prompt can be read in `syntax` (A1111's brackets), before any work."""
    if syntax == "plain":
        return
    from sdjax.prompt_syntax import parse

    for entry in entries:
        negative = entry.settings.get("negative_prompt", flags.get("negative_prompt", ""))
        for where, text in ((entry.where, entry.prompt), (entry.source("negative_prompt"), negative)):
            try:
                parse(text)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None


def batches(jobs: list[Job], batch_size: int, key: Callable[[Job], Any] = lambda job: ()) -> Iterator[list[Job]]:
    """Consecutive jobs with the same batch_key (and `key`), at most batch_size at a time."""
    current: list[Job] = []
    full_key = lambda job: (job.batch_key(), key(job))
    for job in jobs:
        if current and (len(current) == batch_size or full_key(job) != full_key(current[0])):
            yield current
            current = []
        current.append(job)
    if current:
        yield current


def next_index(out_dir: str) -> int:
    """The first image number after those already in out_dir, so reruns never overwrite."""
    numbers = [int(m.group(1)) for name in storage.listdir(out_dir) if (m := re.fullmatch(r"(\d+)-.*\.png", name))]
    return max(numbers, default=-1) + 1


def prepare_out_dir(out_dir: str) -> None:
    """Creates out_dir, once the whole job is checked (sdjax.cli.check_output_dir checked it can be); a
    store's (gs://...) needs no creating."""
    if storage.is_remote(out_dir):
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot create ({e.strerror})") from None


@dataclasses.dataclass(frozen=True)
class Refiner:
    """An SDXL refiner taking over from the base model at `switch` (a fraction of the schedule)."""

    sd: Any
    switch: float
    name: str


def check_refiner(base, refiner: Refiner) -> None:
    """A refiner must take the base's latents: same latent channels and VAE factor, SDXL on both sides."""
    from sdjax.conditioning import takes_added_conditions

    for what, sd in (("--model", base), ("--refiner", refiner.sd)):
        if not takes_added_conditions(sd.model):
            raise ValueError(f"{what}: not an SDXL model (its UNet takes no added conditioning); "
                             "--refiner hands an SDXL base's latents to an SDXL refiner")
    a, b = base.model.vae.config, refiner.sd.model.vae.config
    if (a.latent_channels, a.downscale) != (b.latent_channels, b.downscale):
        raise ValueError(f"--refiner: its latents ({b.latent_channels} channels, 1/{b.downscale} size) do not "
                         f"match the base's ({a.latent_channels} channels, 1/{a.downscale} size)")


def read_loras(sd, jobs: list[Job], allow_pickle: bool = False) -> dict[str, Any]:
    """Every LoRA file the jobs name, read and matched onto `sd`'s model (errors before any image)."""
    from sdjax.lora import read_lora

    paths = dict.fromkeys(path for job in jobs for path, _ in job.loras)
    return {path: read_lora(path, sd.model, sd.params, allow_pickle=allow_pickle) for path in paths}


def _lora_prompt(job: Job, loras: dict[str, Any]) -> str:
    """The prompt as A1111 writes it with LoRAs: each as <lora:name:scale>."""
    return job.prompt + "".join(f" <lora:{loras[path].name}:{scale:g}>" for path, scale in job.loras)


def used_embeddings(job: Job, files: dict[str, str]) -> dict[str, str]:
    """The loaded textual-inversion words (word -> file, of `files`) that the job's prompt or negative names."""
    return {word: path for word, path in files.items() if word in job.prompt or word in job.negative_prompt}


@dataclasses.dataclass(frozen=True)
class StepImages:
    """sample.py --save-steps: a preview every `every` steps, beside each image and in a strip with it."""

    every: int
    kind: str = "x0"
    decoder: str = "vae"


def check_save_steps(jobs: list[Job], steps: StepImages | None, refiner: bool,
                     scheduler_config: dict[str, Any]) -> None:
    """--save-steps fits every job: at least 1, at most the loop steps the job runs (its scheduler's model
    calls: Heun's two per step but the first, PNDM's one extra; fewer where img2img's strength skips some)."""
    if steps is None:
        return
    if refiner:
        raise ValueError("--save-steps: not with --refiner (the base and the refiner run separate loops)")
    from sdjax.schedulers import make_scheduler

    # One loop length per distinct (scheduler, steps, schedule, strength), not one scheduler built per image.
    loops = {(job.scheduler, job.steps, job.karras,
              None if job.init_image is None else effective_strength(job.strength, job.mask)) for job in jobs}
    for scheduler, num_steps, karras, strength in sorted(loops, key=repr):
        sched = make_scheduler(scheduler, scheduler_config, num_steps, **({"use_karras_sigmas": True} if karras else {}))
        runs = num_steps if strength is None else int(num_steps * strength)
        calls = len(sched.timesteps) - (num_steps - runs) * sched.order  # as sdjax.pipeline.generate starts
        if not 1 <= steps.every <= calls:
            raise ValueError(f"--save-steps must be in [1, {calls}] (the model calls of {num_steps} {scheduler} "
                             f"steps{'' if strength is None else ' at its strength'}), got {steps.every}")


def save_steps(path: str, image: np.ndarray, previews: np.ndarray, every: int, parameters: str) -> list[str]:
    """Writes each preview beside the image at `path` as <name>.stepNNN.png and all of them with the image in
    one strip, <name>.steps.png; returns the paths."""
    stem = path.removesuffix(".png")
    paths = []
    for k, preview in enumerate(previews, 1):
        paths.append(f"{stem}.step{k * every:03d}.png")
        save_png(paths[-1], preview, parameters)
    paths.append(f"{stem}.steps.png")
    save_png(paths[-1], np.concatenate(list(previews) + [image], axis=1), parameters)
    return paths


def run(sd, jobs: list[Job], out_dir: str, batch_size: int, model_name: str,
        refiner: Refiner | None = None, loras: dict[str, Any] | None = None, prompt_syntax: str = "plain",
        embeddings: dict[str, str] | None = None, steps: StepImages | None = None) -> list[str]:
    """Generates every job, writing <n>-<seed>.png files; returns their paths. `loras` holds the LoRAs
    the jobs name (read_loras), merged into `sd` for the jobs that use them; `embeddings` the
    textual-inversion words loaded into `sd` (word -> file), for the PNG's TI hashes; `steps` adds the
    step-by-step previews beside each image (save_steps). In the "a1111" prompt
    syntax, jobs are batched only with jobs of the same window count, so that no image is padded
    with empty windows for another's sake."""
    from sdjax.conditioning import prompt_chunks
    from sdjax.lora import a1111_hash
    from sdjax.textual_inversion import file_hash

    loras = loras or {}
    hashes = {path: a1111_hash(path) for path in loras}  # for the PNG parameters, once per file
    embeddings = embeddings or {}
    ti_hashes = {word: file_hash(path) for word, path in embeddings.items()}
    index = next_index(out_dir)
    paths = []
    windows = lambda job: max(prompt_chunks(sd.model, text, prompt_syntax) for text in (job.prompt, job.negative_prompt))
    groups = list(batches(jobs, batch_size, windows))
    start = time.perf_counter()
    with_loras, merged_for = sd, ()
    for group in tqdm(groups, desc="batches", unit="batch"):
        first = group[0]
        if first.loras != merged_for:  # the base weights with this batch's LoRAs merged in
            with_loras, merged_for = sd, first.loras
            for path, scale in first.loras:
                with_loras = with_loras.with_lora(loras[path], scale)
        size = (first.height, first.width)
        init = np.stack([read_image(j.init_image, size) for j in group]) if first.init_image else None
        masks = np.stack([read_image(j.mask, size, grayscale=True) for j in group]) if first.mask else None
        prompts = [j.prompt for j in group]
        # No negative prompt in the whole batch: None, which SDXL (force_zeros_for_empty_prompt) turns into
        # zero embeddings as diffusers and A1111 do; for SD 1.x/2.x it is the empty prompt either way.
        negatives = None if all(not j.negative_prompt for j in group) else [j.negative_prompt for j in group]
        common = dict(num_steps=first.steps, guidance_scale=first.guidance, scheduler=first.scheduler,
                      scheduler_options={"use_karras_sigmas": True} if first.karras else None,
                      height=first.height, width=first.width, seed=[j.seed for j in group],
                      prompt_syntax=prompt_syntax)
        previews = None
        if refiner is None and steps is not None:
            images, previews = with_loras.generate(prompts, negatives, init_image=init, mask=masks,
                                                   strength=first.strength, preview_every=steps.every,
                                                   preview=steps.kind, preview_decoder=steps.decoder, **common)
        elif refiner is None:
            images = with_loras.generate(prompts, negatives, init_image=init, mask=masks, strength=first.strength,
                                         **common)
        else:
            latents = with_loras.generate(prompts, negatives, denoising_end=refiner.switch, output="latents",
                                          **common)
            images = refiner.sd.generate(prompts, negatives, init_latents=latents, denoising_start=refiner.switch,
                                         **common)
        for k, (job, image) in enumerate(zip(group, images)):
            settings = {"Steps": job.steps, "Sampler": SAMPLER_NAMES[job.scheduler]}
            if job.karras:  # A1111's key and value for it
                settings["Schedule type"] = "Karras"
            settings.update({"CFG scale": job.guidance, "Seed": job.seed, "Size": f"{job.width}x{job.height}",
                             "Model": model_name})
            if job.init_image:
                settings["Denoising strength"] = effective_strength(job.strength, job.mask)
            if refiner is not None:  # A1111's names for its refiner settings
                settings.update({"Refiner": refiner.name, "Refiner switch at": refiner.switch})
            if job.loras:  # A1111's: "alias: short hash", aliases without ":" or ","
                settings["Lora hashes"] = ", ".join(
                    f"{loras[p].name.replace(':', '').replace(',', '')}: {hashes[p]}" for p, _ in job.loras)
            used = used_embeddings(job, embeddings)
            if used:  # A1111's key: "word: short hash" of each embedding the prompts use
                settings["TI hashes"] = ", ".join(f"{word.replace(':', '').replace(',', '')}: {ti_hashes[word]}"
                                                  for word in used)
            path = storage.join(out_dir, f"{index:05d}-{job.seed}.png")
            parameters = format_parameters(_lora_prompt(job, loras), job.negative_prompt, settings)
            save_png(path, image, parameters)
            paths.append(path)
            if previews is not None:
                paths += save_steps(path, image, previews[k], steps.every, parameters)
            index += 1
    elapsed = time.perf_counter() - start
    extra = f" (and {len(paths) - len(jobs)} step previews)" if len(paths) > len(jobs) else ""
    print(f"wrote {len(jobs)} images{extra} to {out_dir} in {elapsed:.1f} s ({len(jobs) / elapsed:.2f} images/s, "
          f"including compilation)")
    return paths
