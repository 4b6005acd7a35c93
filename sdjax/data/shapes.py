"""A built-in captioned dataset: one coloured shape on a plain background, drawn on demand.

Example i is a pure function of (seed, i), so the dataset needs no download and any example can
be regenerated anywhere. The attribute tuples are public so that generated images can later be
scored against the caption that asked for them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "white", "black", "purple", "orange")
SIZES = ("small", "large")
BACKGROUNDS = COLORS

RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}

# Shape extent as a fraction of the image side; the two sizes differ ~4x in area.
SIZE_FRACTION = {"small": 0.3, "large": 0.6}


def caption(shape: str, color: str, size: str, background: str) -> str:
    """The caption of an example, e.g. "a small red circle on a blue background"."""
    return f"a {size} {color} {shape} on a {background} background"


def _draw(shape: str, color: str, size: str, background: str, resolution: int,
          rng: np.random.Generator) -> np.ndarray:
    image = Image.new("RGB", (resolution, resolution), RGB[background])
    extent = max(2, round(SIZE_FRACTION[size] * resolution))
    # Jitter the position while keeping the whole shape inside the image.
    left = int(rng.integers(0, resolution - extent + 1))
    top = int(rng.integers(0, resolution - extent + 1))
    box = (left, top, left + extent - 1, top + extent - 1)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=RGB[color])
    elif shape == "square":
        draw.rectangle(box, fill=RGB[color])
    else:
        draw.polygon([(left + (extent - 1) / 2, top), (box[2], box[3]), (left, box[3])], fill=RGB[color])
    return np.asarray(image, dtype=np.uint8)


def make_example(index: int, seed: int, resolution: int = 64) -> dict:
    """Example `index` of the dataset drawn with `seed`: image (uint8 R x R x 3), caption, labels.

    The shape colour and the background colour always differ.
    """
    if index < 0:
        raise ValueError(f"shapes example index must be >= 0, got {index}")
    if resolution < 8:
        raise ValueError(f"shapes resolution must be >= 8 pixels, got {resolution}")
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLORS[rng.integers(len(COLORS))]
    # Draw the background from the other colours so it never matches the shape.
    others = [c for c in BACKGROUNDS if c != color]
    background = others[rng.integers(len(others))]
    size = SIZES[rng.integers(len(SIZES))]
    return {
        "image": _draw(shape, color, size, background, resolution, rng),
        "caption": caption(shape, color, size, background),
        "shape": shape,
        "color": color,
        "size": size,
        "background": background,
    }
