"""PNG files with generation settings in a `parameters` text chunk, in AUTOMATIC1111's format:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: sd15

so existing prompt-reader tools understand sdjax's images.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from sdjax import storage

# Our scheduler names -> the sampler names the web UI writes.
SAMPLER_NAMES = {"ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun",
                 "dpmpp_2m": "DPM++ 2M", "lms": "LMS", "ddpm": "DDPM", "unipc": "UniPC"}


def quote(value: Any) -> str:
    """A setting's value as the web UI writes it: JSON-quoted if it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_parameters(prompt: str, negative_prompt: str, settings: dict[str, Any]) -> str:
    """The `parameters` text: prompt line, optional negative line, then "Key: value" pairs."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in settings.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of format_parameters: (prompt, negative prompt, settings as strings, quotes removed)."""
    lines = text.split("\n")
    pairs = re.findall(r'\s*([^:,"]+): ("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', lines[-1])
    settings = {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}
    body = lines[:-1]
    negative = ""
    neg_at = next((i for i, line in enumerate(body) if line.startswith("Negative prompt: ")), None)
    if neg_at is not None:
        negative = "\n".join(body[neg_at:])[len("Negative prompt: "):]
        body = body[:neg_at]
    return "\n".join(body), negative, settings


def save_png(path: str, image: np.ndarray, parameters: str) -> None:
    """Writes a float [0, 1] (H, W, 3) image with its parameters, whole or not at all (storage.write_bytes:
    renamed into place on a local disk, one object on a store)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    pixels = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG", pnginfo=info)
    storage.write_bytes(path, encoded.getvalue())


def read_parameters(path: str) -> str:
    """The `parameters` chunk of a PNG written by save_png (or the web UI), local or remote."""
    with Image.open(storage.readable(path)) as im:
        return im.info["parameters"]
