"""Per-example preprocessing: decode, resize, crop, flip, caption dropout; unreadable images are skipped.

Each example also records what SDXL conditions on (its "micro-conditioning"): the image's size before
any resizing ("original_size", (height, width)), the top-left corner of the crop in the resized image
("crop_top_left", (top, left); mirrored with a flip, so it is the corner of what the model sees), and
whether the caption was dropped ("caption_dropped"; SDXL trains those with zeroed text embeddings).

Every random choice comes from the generator grain hands to `random_map`, which is seeded by the
pipeline seed and the example's position in the stream, so a restored iterator redoes exactly the
same choices.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

CROPS = ("center", "random")

# Reads run in grain's reader threads, so the count is guarded by a lock. With grain worker
# processes (worker_count > 0) each worker counts its own reads and this process sees none.
_unreadable_lock = threading.Lock()
_unreadable = 0
# Images that never made it into a dataset (its build skipped them), by dataset name: recorded by
# sdjax.data.source.make_source when it opens one, so that a run's count includes them.
_skipped_at_build: dict[str, int] = {}


def unreadable_images_skipped() -> int:
    """How many images were lost as unreadable since start or the last reset: those this process failed
    to decode, plus those the builds of the datasets it opened skipped."""
    with _unreadable_lock:
        return _unreadable + sum(_skipped_at_build.values())


def record_skipped_at_build(dataset: str, count: int) -> None:
    """Notes that building `dataset` (its full name) skipped `count` unreadable images; opening the same
    dataset again (e.g. another split of it) records the same count, not twice as many."""
    with _unreadable_lock:
        _skipped_at_build[dataset] = count


def reset_unreadable_count() -> None:
    """Sets the count of skipped unreadable images back to zero (both kinds)."""
    global _unreadable
    with _unreadable_lock:
        _unreadable = 0
        _skipped_at_build.clear()


def _count_unreadable() -> int:
    global _unreadable
    with _unreadable_lock:
        _unreadable += 1
        return _unreadable


class Draws(NamedTuple):
    """Every random number one example uses, drawn up front and always in the same order, so that
    changing one option (e.g. turning flip on) does not shift the draws of the others, and the
    cached-latent stream (sdjax.data.latent_cache) drops and picks the same captions as this one."""

    drop: float
    flip: float
    crop_y: float
    crop_x: float
    pick: float


def draw(rng: np.random.Generator) -> Draws:
    """One example's random numbers, from the generator grain hands to `random_map`."""
    return Draws(*rng.random(5))


def choose_caption(value: Any, draws: Draws, caption_dropout: float) -> str:
    """The empty prompt with probability caption_dropout, else the caption (one of several at random)."""
    if dropped(draws, caption_dropout):
        return ""
    texts = caption_values(value)
    return texts[int(draws.pick * len(texts))] if texts else ""


def caption_values(value: Any) -> list[str]:
    """Every caption of an example's caption feature (a Text feature or a sequence of them) as str."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v)
            for v in np.asarray(value, dtype=object).reshape(-1)]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The per-example transform; a plain picklable object so grain worker processes can run it."""

    image_key: str
    caption_key: str
    resolution: int
    crop: str = "center"
    flip: bool = False
    caption_dropout: float = 0.0

    def __call__(self, example: dict, rng: np.random.Generator) -> dict | None:
        """{"image": uint8 (R, R, 3), "caption": str, "caption_dropped": bool, "original_size": int32 (2,),
        "crop_top_left": int32 (2,)}, or None when the image cannot be decoded."""
        draws = draw(rng)
        view = self.image(example, draws)
        if view is None:
            return None
        return {"image": view.pixels, "caption": choose_caption(example[self.caption_key], draws, self.caption_dropout),
                "caption_dropped": np.bool_(dropped(draws, self.caption_dropout)),
                "original_size": view.original_size, "crop_top_left": view.crop_top_left}

    def image(self, example: dict, draws: Draws) -> ImageView | None:
        """The example's image as uint8 (R, R, 3), cropped and flipped as `draws` say, with its original
        size and crop corner; None (logged and counted) when it cannot be decoded."""
        encoded = example[self.image_key]  # a missing key is a config error, not a bad image
        try:
            image, original = _to_pil_rgb(encoded, self.resolution)
            pixels, (top, left), width = _resize_and_crop(image, self.resolution, self.crop, draws.crop_y,
                                                          draws.crop_x)
        except Exception as e:  # any decoder failure: skip the example, never stop training
            count = _count_unreadable()
            log.warning("unreadable image skipped (%s: %s); %d skipped so far", type(e).__name__, e, count)
            return None
        if self.flip and draws.flip < 0.5:
            pixels, left = pixels[:, ::-1], width - self.resolution - left
        return ImageView(np.ascontiguousarray(pixels), np.asarray(original, np.int32),
                         np.asarray((top, left), np.int32))


class ImageView(NamedTuple):
    """An example's training image and where it came from (SDXL's size and crop conditioning)."""

    pixels: np.ndarray         # uint8 (R, R, 3)
    original_size: np.ndarray  # int32 (height, width) of the stored image
    crop_top_left: np.ndarray  # int32 (top, left) of the crop in the resized image


def dropped(draws: Draws, caption_dropout: float) -> bool:
    """Whether `draws` drop the caption (the rule `choose_caption` applies)."""
    return draws.drop < caption_dropout


def _to_pil_rgb(value, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """(an RGB PIL image, the stored image's (height, width)) from encoded bytes (SkipDecoding) or an
    already decoded uint8 array."""
    if isinstance(value, (bytes, np.bytes_)):
        image = Image.open(io.BytesIO(value))
        original = (image.height, image.width)  # from the header: draft may decode a smaller image
        # JPEG can decode straight at 1/2, 1/4 or 1/8 scale; draft keeps both sides >= the request.
        image.draft("RGB", (resolution, resolution))
        image.load()
    else:
        array = np.asarray(value)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = Image.fromarray(array.astype(np.uint8, copy=False))
        original = (image.height, image.width)
    return (image.convert("RGB") if image.mode != "RGB" else image), original


def _resize_and_crop(image: Image.Image, resolution: int, crop: str, u_y: float,
                     u_x: float) -> tuple[np.ndarray, tuple[int, int], int]:
    """Shorter side to `resolution` (bicubic), then a square crop: centred or at (u_y, u_x) in [0, 1).
    Returns (pixels, the crop's (top, left) in the resized image, the resized width)."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    spare_x, spare_y = size[0] - resolution, size[1] - resolution
    if crop == "center":
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = int(u_x * (spare_x + 1)), int(u_y * (spare_y + 1))
    pixels = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return pixels, (top, left), size[0]
