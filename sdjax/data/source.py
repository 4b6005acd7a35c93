"""What the training data is: the TFDS split a config names, opened as a random-access source, its
per-example preprocessing, and reads of it outside the training stream (held-out evaluation
examples, every caption).

Sources "shapes" and "folder" build their TFDS dataset on first use (a no-op once built). With
several hosts sharing one data_dir, build it beforehand with `python -m sdjax.data.prepare`, so
that the hosts do not all write it at once. Unreadable images are logged and skipped; the count
is `sdjax.data.preprocess.unreadable_images_skipped()`, which includes the images the build of an
opened dataset skipped (an image folder's corrupt files never reach the pipeline).

data.data_dir and data.folder.src may be gs:// (or other fsspec) URLs; see prepare.py.
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from sdjax import storage
from sdjax.data.prepare import default_data_dir, point_array_record_at_emulator, prepare
from sdjax.data.preprocess import CROPS, Preprocess, caption_values, record_skipped_at_build
from sdjax.data.tfds_builders import skipped_at_build

SOURCES = ("shapes", "folder", "tfds")


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` block of a training config, with defaults for the built-in shapes dataset."""
    config = ml_collections.ConfigDict()
    config.source = "shapes"  # "shapes" | "folder" | "tfds"
    config.data_dir = default_data_dir()  # where TFDS datasets are built and read
    config.split = "train"
    config.image_key = "image"
    config.caption_key = "caption"
    config.name = ""  # source "tfds": the dataset name, e.g. "my_dataset/config:1.0.0"
    config.shapes = ml_collections.ConfigDict({"num_examples": 2000, "num_test_examples": 200, "seed": 0})
    config.folder = ml_collections.ConfigDict({"src": "", "caption_column": "text"})
    config.resolution = 64  # also the side the shapes are drawn at
    config.crop = "center"  # "center" | "random"
    config.flip = False  # random horizontal flip (off by default: captions may say left/right)
    config.caption_dropout = 0.1  # probability of the empty prompt, for classifier-free guidance
    # Task "unet": encode the split once with the frozen VAE into workdir/latent_cache (reused while the
    # VAE and the data match) and train on those posteriors instead of encoding pixels in every step.
    # The cache holds one crop of each image: needs crop "center" and flip False.
    config.cache_latents = False
    config.worker_count = 0  # grain worker processes; 0 reads in this process
    config.read_threads = 8  # reader threads per process
    config.prefetch_buffer = 256  # preprocessed examples kept ready per process
    return config


def _check_config(data_config) -> None:
    if data_config.source not in SOURCES:
        raise ValueError(f"data.source: expected one of {', '.join(SOURCES)}, got {data_config.source!r}")
    if data_config.crop not in CROPS:
        raise ValueError(f"data.crop: expected one of {', '.join(CROPS)}, got {data_config.crop!r}")
    if not 0.0 <= data_config.caption_dropout <= 1.0:
        raise ValueError(f"data.caption_dropout: expected a probability in [0, 1], got {data_config.caption_dropout}")
    if data_config.resolution < 1:
        raise ValueError(f"data.resolution: expected a positive number of pixels, got {data_config.resolution}")
    if data_config.worker_count < 0:
        raise ValueError(f"data.worker_count: expected >= 0, got {data_config.worker_count}")


def _open_builder(data_config):
    """The tfds builder the config names, prepared on demand for "shapes" and "folder"."""
    source = data_config.source
    if source == "shapes":
        options = dict(data_config.shapes)
        path = prepare("shapes", data_config.data_dir, resolution=data_config.resolution, **options)
        return tfds.builder_from_directory(path)
    if source == "folder":
        if not data_config.folder.src:
            raise ValueError("data.folder.src: source 'folder' needs the image folder")
        return tfds.builder_from_directory(prepare("folder", data_config.data_dir, **dict(data_config.folder)))
    name = data_config.name
    if not name:
        raise ValueError("data.name: source 'tfds' needs a dataset name")
    try:
        builder = tfds.builder(name, data_dir=data_config.data_dir)
    except Exception as e:  # tfds raises several types for an unknown name
        raise ValueError(f"data.name: tfds dataset {name!r} not found in {data_config.data_dir} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not builder.is_prepared():
        raise ValueError(f"data.name: tfds dataset {name!r} is not prepared in {data_config.data_dir} "
                         f"(expected it at {builder.data_dir})")
    return builder


def make_source(data_config) -> Sequence[dict]:
    """The random-access TFDS source of `data_config.split`, its image feature left encoded.

    Checks the dataset, split and feature keys first, and names whichever is missing.
    """
    _check_config(data_config)
    if storage.is_remote(data_config.data_dir):
        storage._check_credentials(data_config.data_dir)  # one line, not a wait on a metadata server
        point_array_record_at_emulator()
    builder = _open_builder(data_config)
    info = builder.info
    record_skipped_at_build(info.full_name, skipped_at_build(info))
    splits = sorted(info.splits.keys())
    base_split = data_config.split.split("[")[0]
    if base_split not in splits:
        raise ValueError(f"data.split: {info.full_name} has no split {base_split!r}; available: {', '.join(splits)}")
    features = info.features
    for key_name in ("image_key", "caption_key"):
        key = data_config[key_name]
        if key not in features:
            raise ValueError(f"data.{key_name}: {info.full_name} has no feature {key!r}; "
                             f"available features: {', '.join(sorted(features.keys()))}")
    # Decoding happens in the pipeline, where an unreadable image is skipped instead of raising.
    decoders = None
    if isinstance(features[data_config.image_key], tfds.features.Image):
        decoders = {data_config.image_key: tfds.decode.SkipDecoding()}
    source = builder.as_data_source(split=data_config.split, decoders=decoders)
    if len(source) == 0:
        raise ValueError(f"data.split: {info.full_name} split {data_config.split!r} is empty")
    return source


def image_preprocess(data_config) -> Preprocess:
    """The pixel stream's per-example transform, as data_config sets it up."""
    return Preprocess(image_key=data_config.image_key, caption_key=data_config.caption_key,
                      resolution=int(data_config.resolution), crop=data_config.crop, flip=bool(data_config.flip),
                      caption_dropout=float(data_config.caption_dropout))


def held_out(data_config, split: str, num_examples: int) -> dict[str, Any]:
    """The first `num_examples` readable examples of `split`, preprocessed without randomness (centre
    crop, no flip, no caption dropout), for evaluation: {"pixels": float32 (N, R, R, 3) in [-1, 1],
    "captions": list of N str}."""
    data_config = ml_collections.ConfigDict(dict(data_config.to_dict(), split=split, crop="center", flip=False,
                                                 caption_dropout=0.0))
    source = make_source(data_config)
    preprocess, rng = image_preprocess(data_config), np.random.default_rng(0)  # rng draws are unused here
    examples = []
    for i in range(len(source)):
        example = preprocess(source[i], rng)
        if example is not None:
            examples.append(example)
        if len(examples) == num_examples:
            break
    if not examples:
        raise ValueError(f"data split {split!r} has no readable example to evaluate on")
    return {"pixels": to_pixels([e["image"] for e in examples]), "captions": [e["caption"] for e in examples]}


def to_pixels(images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 images (R, R, 3), as the pipeline carries them, stacked into float32 in [-1, 1]."""
    return np.stack(images).astype(np.float32) / 127.5 - 1.0


def all_captions(data_config, limit: int = 0) -> list[str]:
    """Every caption of the first `limit` examples of data.split (0 = all), e.g. to train a tokenizer."""
    source = make_source(data_config)
    count = len(source) if limit <= 0 else min(limit, len(source))
    return [text for i in range(count) for text in caption_values(source[i][data_config.caption_key])]
