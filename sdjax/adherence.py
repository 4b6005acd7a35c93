"""Prompt adherence on the built-in "shapes" dataset: does a generated image show what its caption asked for?

The judge is plain image analysis (no learned model), so it is independent of any generator:

    python -m sdjax.adherence --data-check 1000                 # the judge itself, on real dataset images
    python -m sdjax.adherence --guidance 1,7.5 --out adherence/      # the shipped model (or --model DIR)

A prompt follows the dataset's caption grammar, "a {size} {color} {shape} on a {background} background".
`analyse` reads those four attributes back from an image, tolerating the blur, noise, colour cast,
background shading and specks of a small generator's output:

  * background: the palette colour most border pixels are nearest to (a shape, fully inside the
    image, covers at most ~30% of the border), modelled as a plane per channel fitted to the border
    so that a shading drift is not mistaken for foreground;
  * colour: the palette colour nearest to the median of the deep interior of the region that is far
    from the background (edge pixels are blends, which can sit nearer a third palette colour);
  * outline: the pixels past the 50% point between the measured background and shape colours (the
    anti-aliased contour of the drawn shape), largest 8-connected component only, so specks do not count;
  * shape: the ideal circle / square / upward triangle of the outline's area, centred on its
    centroid, that overlaps it best (intersection over union); area and centroid are averages, so
    edge noise barely moves them, unlike a bounding box;
  * size: that ideal shape's extent as a fraction of the image side (small 0.3, large 0.6; split 0.45).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

import sdjax
from sdjax.cli import OneLineParser, check_output_dir
from sdjax.data.shapes import BACKGROUNDS, COLORS, RGB, SHAPES, SIZE_FRACTION, SIZES, caption, make_example
from sdjax import backends, storage

ATTRIBUTES = ("shape", "color", "size", "background")
NONE = "none"  # the attribute value reported when no shape is found: it matches no prompt

_PALETTE_NAMES = tuple(RGB)
_PALETTE = np.array([RGB[name] for name in _PALETTE_NAMES], np.float32)
_PROMPT = re.compile(r"a (\w+) (\w+) (\w+) on a (\w+) background")
# Halfway between the two sizes' extents (0.3 and 0.6 of the side).
_SIZE_SPLIT = (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2
# A component smaller than this share of the image is a speck, not a shape: the smallest real shape
# (a small triangle) covers ~4.5%.
_MIN_AREA_FRACTION = 0.015


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes {"shape", "color", "size", "background"} that a shapes caption asks for.

    Raises ValueError, naming the prompt, if it does not follow the caption grammar.
    """
    match = _PROMPT.fullmatch(" ".join(prompt.strip().lower().split()))
    if match is None:
        raise ValueError(f"prompt {prompt!r} does not follow the shapes caption grammar "
                         "'a {size} {color} {shape} on a {background} background'")
    size, color, shape, background = match.groups()
    for name, value, allowed in (("size", size, SIZES), ("color", color, COLORS), ("shape", shape, SHAPES),
                                 ("background", background, BACKGROUNDS)):
        if value not in allowed:
            raise ValueError(f"prompt {prompt!r}: unknown {name} {value!r}; known: {', '.join(allowed)}")
    return {"shape": shape, "color": color, "size": size, "background": background}


def _as_rgb255(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"image has shape {image.shape}; expected (H, W, 3) with H, W >= 8")
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image has dtype {image.dtype}; expected uint8 or float in [0, 1]")
    return np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """Index into _PALETTE of the nearest colour (RGB distance) of each pixel (..., 3)."""
    return np.argmin(((pixels[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def _deepest(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` at least half as deep inside it as its deepest one: far from the edge,
    where blur has not mixed in the background (a triangle's thin corners would otherwise bias it)."""
    depth = ndimage.distance_transform_edt(mask)
    return depth >= 0.5 * depth.max()


def _shape_mask(shape: str, top: float, left: float, extent: float, height: int, width: int) -> np.ndarray:
    """The ideal `shape` filling the square box (top, left, extent) in pixel units, sampled at pixel
    centres. The triangle points up with its apex at the top centre, as the dataset draws it."""
    v = ((np.arange(height) + 0.5 - top) / extent)[:, None]
    u = ((np.arange(width) + 0.5 - left) / extent)[None, :]
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return inside
    return inside & (np.abs(u - 0.5) <= v / 2)


# Area of each shape as a fraction of its square box, and its centroid's depth in the box.
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
_CENTROID_DEPTH = {"circle": 0.5, "square": 0.5, "triangle": 2 / 3}


def _fit_shape(component: np.ndarray) -> tuple[str, float]:
    """The shape whose ideal outline, of the component's area and placed at its centroid, overlaps it
    best (intersection over union), and that outline's extent in pixels. Area and centroid are
    averages over the whole component, so edge noise and blur barely move them, unlike a bounding box."""
    rows, cols = np.nonzero(component)
    area, cy, cx = len(rows), rows.mean() + 0.5, cols.mean() + 0.5
    best, best_iou, best_extent = "none", -1.0, 0.0
    for shape in SHAPES:
        extent = float(np.sqrt(area / _FILL[shape]))
        ideal = _shape_mask(shape, cy - _CENTROID_DEPTH[shape] * extent, cx - extent / 2, extent, *component.shape)
        iou = (ideal & component).sum() / (ideal | component).sum()
        if iou > best_iou:
            best, best_iou, best_extent = shape, iou, extent
    return best, best_extent


def _border(array: np.ndarray) -> np.ndarray:
    """The outermost ring of an (H, W, ...) array, flattened to (ring length, ...)."""
    return np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])


def _background_field(pixels: np.ndarray, bg_index: int, margin: float) -> np.ndarray:
    """The background colour at every pixel: a plane per channel fitted to the border pixels of the
    background colour. A generated background is not always flat (a shading drift across the image
    of a few tens of levels), and a flat estimate would then call its far side foreground."""
    height, width = pixels.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    design = np.stack([np.ones((height, width)), yy / height - 0.5, xx / width - 0.5], axis=-1)
    ring, ring_design = _border(pixels), _border(design)
    chosen = _nearest_palette(ring) == bg_index
    for _ in range(2):  # refit on the ring pixels the plane explains: drops the shape where it touches the ring
        coef = np.linalg.lstsq(ring_design[chosen], ring[chosen], rcond=None)[0]
        near = np.sqrt(((ring - ring_design @ coef) ** 2).sum(-1)) < margin
        if near.sum() < 3:
            break
        chosen = near
    return design @ coef


def analyse(image: np.ndarray) -> dict[str, str]:
    """The attributes {"shape", "color", "size", "background"} an image shows.

    `image`: (H, W, 3), uint8 or float in [0, 1]. With no shape found, shape, color and size are
    "none", so they match no prompt.
    """
    pixels = _as_rgb255(image)
    height, width = pixels.shape[:2]
    min_area = _MIN_AREA_FRACTION * height * width
    bg_index = int(np.bincount(_nearest_palette(_border(pixels)), minlength=len(_PALETTE)).argmax())
    none = {"shape": NONE, "color": NONE, "size": NONE, "background": _PALETTE_NAMES[bg_index]}

    # First cut: farther from the background than half the way to its nearest other palette colour.
    # It only has to find the shape's interior, from which the shape colour is measured. The
    # measured colours (not the palette's) anchor both cuts, so a colour cast cancels out.
    others = np.delete(_PALETTE, bg_index, axis=0)
    margin = 0.5 * float(np.sqrt(((others - _PALETTE[bg_index]) ** 2).sum(-1)).min())
    bg_field = _background_field(pixels, bg_index, margin)
    rough = _largest_component(np.sqrt(((pixels - bg_field) ** 2).sum(-1)) > margin)
    if rough.sum() < min_area:
        return none
    deep = _deepest(rough)
    fg_rgb = np.median(pixels[deep], axis=0)
    color_index = int(_nearest_palette(fg_rgb))

    # Final cut at the 50% blend of the two measured colours: where a blurred or anti-aliased edge
    # crosses half way, i.e. the drawn outline, whatever palette colour the blends pass near.
    axis = fg_rgb - np.median(bg_field[deep], axis=0)
    blend = ((pixels - bg_field) @ axis) / max(float(axis @ axis), 1e-6)
    component = _largest_component(blend > 0.5)
    if component.sum() < min_area or color_index == bg_index:
        return none
    shape, extent = _fit_shape(component)
    return {"shape": shape, "color": _PALETTE_NAMES[color_index],
            "size": "large" if extent / min(height, width) > _SIZE_SPLIT else "small",
            "background": _PALETTE_NAMES[bg_index]}


def judge(image: np.ndarray, prompt: str) -> dict[str, bool]:
    """Per attribute (and "all"): does `image` show what `prompt` asks for?"""
    wanted, seen = parse_prompt(prompt), analyse(image)
    verdict = {name: seen[name] == wanted[name] for name in ATTRIBUTES}
    verdict["all"] = all(verdict.values())
    return verdict


def score(images: Sequence[np.ndarray] | np.ndarray, prompts: Sequence[str]) -> dict[str, float | int]:
    """Accuracy of images against their prompts: the fraction right per attribute and on all four
    ("all"), and the number of images ("count")."""
    prompts = list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images given for {len(prompts)} prompts")
    if not prompts:
        raise ValueError("score: no images given")
    verdicts = [judge(image, prompt) for image, prompt in zip(images, prompts)]
    result: dict[str, float | int] = {k: float(np.mean([v[k] for v in verdicts])) for k in (*ATTRIBUTES, "all")}
    result["count"] = len(prompts)
    return result


def dataset_accuracy(n: int, resolution: int = 64, seed: int = 0) -> dict[str, float | int]:
    """`score` on the first `n` real dataset examples: the judge must be right here before it judges."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    examples = [make_example(i, seed, resolution) for i in range(n)]
    return score([e["image"] for e in examples], [e["caption"] for e in examples])


def all_prompts() -> list[str]:
    """Every valid caption (colour != background): 3 shapes x 8 colours x 7 backgrounds x 2 sizes = 336."""
    return [caption(shape, color, size, background)
            for shape, color, size, background in itertools.product(SHAPES, COLORS, SIZES, BACKGROUNDS)
            if color != background]


def evaluation_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct captions, the same for the same (n, seed), ordered so that every prefix spreads
    evenly over each attribute's values: each next caption is the one whose values have been used
    least so far (ties: a fixed-seed shuffle), so a short list still covers every shape and colour."""
    pool = all_prompts()
    if not 1 <= n <= len(pool):
        raise ValueError(f"number of prompts must be in [1, {len(pool)}], got {n}")
    pool = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    attrs = [parse_prompt(p) for p in pool]
    used: dict[tuple[str, str], int] = {}
    chosen: list[str] = []
    for _ in range(n):
        best = min(range(len(pool)), key=lambda i: sum(used.get(kv, 0) for kv in attrs[i].items()))
        for kv in attrs[best].items():
            used[kv] = used.get(kv, 0) + 1
        chosen.append(pool.pop(best))
        attrs.pop(best)
    return chosen


def _to_uint8(images: np.ndarray) -> np.ndarray:
    # A diverged model can emit NaN; as black pixels it is judged (wrong) instead of crashing the cast.
    images = np.nan_to_num(np.asarray(images, np.float32), nan=0.0)
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def evaluate_model(sd: Any, prompts: Sequence[str], seeds: int = 2, guidance: float | Sequence[float] = (7.5,),
                   steps: int = 30, scheduler: str | None = None, batch_size: int = 16,
                   height: int | None = None, width: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Generates `seeds` images per prompt at each guidance scale and scores them.

    Image j of prompt i uses seed j * len(prompts) + i at every guidance scale, so the scales are
    compared on the same starting noise. height / width default to the model's native size.

    Returns {"prompts": the prompt of each image, "seeds": its seed, "results": {guidance: `score`
    dict}, "images": {guidance: uint8 (N, H, W, 3)}}.
    """
    prompts = list(prompts)
    guidance = [float(guidance)] if np.isscalar(guidance) else [float(g) for g in guidance]
    for p in prompts:
        parse_prompt(p)  # fail before generating anything
    if not prompts or seeds < 1 or batch_size < 1 or steps < 1 or not guidance:
        raise ValueError(f"evaluate_model needs >= 1 prompt, seed, step, guidance value and batch size; got "
                         f"{len(prompts)} prompts, seeds={seeds}, steps={steps}, guidance={list(guidance)}, "
                         f"batch_size={batch_size}")
    jobs = [(p, j * len(prompts) + i) for j in range(seeds) for i, p in enumerate(prompts)]
    out: dict[str, Any] = {"prompts": [p for p, _ in jobs], "seeds": [s for _, s in jobs], "results": {},
                           "images": {}}
    num_batches = -(-len(jobs) // batch_size)
    for g in guidance:
        images = []
        for b in range(num_batches):
            batch = jobs[b * batch_size:(b + 1) * batch_size]
            # Pad the last batch to full size with repeats: a new batch size would compile a new program.
            padded = batch + [batch[-1]] * (batch_size - len(batch)) if num_batches > 1 else batch
            result = sd.generate([p for p, _ in padded], num_steps=steps, guidance_scale=g,
                                 scheduler=scheduler, seed=[s for _, s in padded], height=height, width=width)
            images.append(_to_uint8(result[:len(batch)]))
            if progress:
                print(f"guidance {g:g}: batch {b + 1}/{num_batches} ({min((b + 1) * batch_size, len(jobs))}/"
                      f"{len(jobs)} images)", flush=True)
        out["images"][g] = np.concatenate(images)
        out["results"][g] = score(out["images"][g], out["prompts"])
    return out


def contact_sheet(images: np.ndarray, prompts: Sequence[str], columns: int = 8) -> np.ndarray:
    """A grid of the images (uint8), each framed green if it matches its prompt on every attribute,
    red if not."""
    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    pad = 2
    sheet = np.full((rows * (h + 2 * pad), columns * (w + 2 * pad), 3), 128, np.uint8)
    for k, (image, prompt) in enumerate(zip(images, prompts)):
        r, c = divmod(k, columns)
        top, left = r * (h + 2 * pad), c * (w + 2 * pad)
        sheet[top:top + h + 2 * pad, left:left + w + 2 * pad] = (40, 200, 40) if judge(image, prompt)["all"] \
            else (220, 30, 30)
        sheet[top + pad:top + pad + h, left + pad:left + pad + w] = image
    return sheet


def labelled_grid(images: np.ndarray, prompts: Sequence[str], columns: int = 4, scale: int = 2) -> np.ndarray:
    """The images enlarged `scale` times (nearest), each over its prompt written in two lines, with a
    check or cross from the judge: the README's prompt -> image grid."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    tile_w, tile_h, text_h = w * scale + 8, h * scale + 8, 30
    sheet = Image.new("RGB", (columns * tile_w, rows * (tile_h + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (image, prompt) in enumerate(zip(images, prompts)):
        r, c = divmod(k, columns)
        left, top = c * tile_w + 4, r * (tile_h + text_h) + 4
        sheet.paste(Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST), (left, top))
        wanted = parse_prompt(prompt)
        mark = "ok" if judge(image, prompt)["all"] else "x"
        lines = (f"{wanted['size']} {wanted['color']} {wanted['shape']}", f"on {wanted['background']}  [{mark}]")
        for i, line in enumerate(lines):
            draw.text((left, top + h * scale + 2 + 12 * i), line, fill=(0, 0, 0))
    return np.asarray(sheet)


def format_table(results: dict[Any, dict[str, float | int]], label: str = "guidance") -> str:
    """Accuracy rows: label | images | shape | color | size | background | all."""
    header = f"{label:>10} | {'images':>6} | " + " | ".join(f"{k:>10}" for k in (*ATTRIBUTES, "all"))
    lines = [header, "-" * len(header)]
    for key, r in results.items():
        lines.append(f"{key!s:>10} | {r['count']:>6} | " + " | ".join(f"{r[k]:>10.3f}" for k in (*ATTRIBUTES, "all")))
    return "\n".join(lines)


def _parse_guidance(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"--guidance {text!r}: expected comma-separated numbers, e.g. 1,7.5")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m sdjax.adherence", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=sdjax.DEFAULT_MODEL,
                   help="diffusers folder of a model trained on the shapes dataset (default: the shipped model)")
    p.add_argument("--num-prompts", type=int, default=48, help="prompts to evaluate, at most 336 (default 48)")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt and guidance value (default 2)")
    p.add_argument("--guidance", default="7.5", help="comma-separated guidance scales (default 7.5)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--scheduler", help="scheduler family (default: the checkpoint's own)")
    p.add_argument("--batch-size", type=int, default=16, help="images per generate call (default 16)")
    p.add_argument("--out", help="folder for a contact sheet PNG per guidance value")
    p.add_argument("--data-check", type=int, metavar="N", help="instead: score N real dataset images")
    p.add_argument("--resolution", type=int, default=64, help="image side for --data-check (default 64)")
    p.add_argument("--data-seed", type=int, default=0, help="dataset seed for --data-check (default 0)")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> list[float]:
    from sdjax.schedulers import SCHEDULERS

    if args.data_check is not None:
        if args.data_check < 1:
            raise ValueError(f"--data-check must be >= 1, got {args.data_check}")
        if args.resolution < 8:
            raise ValueError(f"--resolution must be >= 8, got {args.resolution}")
        return []
    if storage.is_remote(args.model):
        storage.check_readable(args.model, "--model")
    if not storage.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a folder")
    if not 1 <= args.num_prompts <= len(all_prompts()):
        raise ValueError(f"--num-prompts must be in [1, {len(all_prompts())}], got {args.num_prompts}")
    for flag, value in (("--seeds", args.seeds), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.scheduler and args.scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler {args.scheduler!r} is unknown; known: {', '.join(SCHEDULERS)}")
    if args.out:
        check_output_dir(args.out, "--out")  # a gs:// URL too
    return _parse_guidance(args.guidance)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    backends.prepare()  # before JAX starts its backends
    try:
        guidance = _check_args(args)
        if args.data_check is not None:
            print(format_table({f"{args.resolution}px": dataset_accuracy(args.data_check, args.resolution,
                                                                         args.data_seed)}, label="data"))
            return 0
        sd = sdjax.load(args.model)
    except (ValueError, OSError, sdjax.CheckpointError) as e:
        print(f"python -m sdjax.adherence: error: {e}", file=sys.stderr)
        return 2
    out = evaluate_model(sd, evaluation_prompts(args.num_prompts), args.seeds, guidance, args.steps,
                         args.scheduler, args.batch_size)
    print(format_table(out["results"]))
    if args.out:
        import io

        from PIL import Image

        storage.makedirs(args.out)
        for g, images in out["images"].items():
            for kind, picture in (("contact", contact_sheet(images, out["prompts"])),
                                  ("grid", labelled_grid(images, out["prompts"]))):
                path = storage.join(args.out, f"{kind}-guidance-{g:g}.png")
                buffer = io.BytesIO()
                Image.fromarray(picture).save(buffer, format="PNG")
                storage.write_bytes(path, buffer.getvalue())
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
