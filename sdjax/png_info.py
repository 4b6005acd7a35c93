"""PNG files with generation settings in a `parameters` text chunk, in AUTOMATIC1111's format:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: sd15

so existing prompt-reader tools understand sdjax's images.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid
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
    """Writes a float [0, 1] (H, W, 3) image atomically (temp file, then rename; to a store (gs://...) as one
    object) with its parameters."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    pixels = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    if storage.is_remote(path):
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="PNG", pnginfo=info)
        storage.write_bytes(path, encoded.getvalue())
        return
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        # Created exclusively with open() rather than mkstemp, so the image gets the mode any new file
        # gets (the umask's), not mkstemp's private 0600.
        with open(tmp, "xb") as f:
            Image.fromarray(pixels).save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_parameters(path: str) -> str:
    """The `parameters` chunk of a PNG written by save_png (or the web UI), local or remote."""
    with Image.open(io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path) as im:
        return im.info["parameters"]
