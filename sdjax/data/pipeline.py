"""The training input pipeline: a TFDS random-access source read by grain into host-local batches.

    config.data = default_data_config()
    it = make_iterator(config.data, tokenize_fn, global_batch_size=64, seed=0,
                       process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)   # {"pixels": f32 (B_local, R, R, 3) in [-1, 1], "input_ids": i32 (B_local, L)}
    state = it.get_state()   # JSON-serialisable; it.set_state(state) resumes bitwise

With `latents=folder` (a cache that sdjax.data.latent_cache wrote: the split's VAE posteriors) the
batches hold "latent_mean" and "latent_logvar" instead of "pixels"; everything below holds for both.

Stream order: one global stream — the split shuffled by the seed, repeated forever (reshuffled each
epoch), preprocessed with randomness drawn from (seed, global position) — cut into global batches;
host h reads rows [h * B_local, (h + 1) * B_local) of each. So the global batch, and with it the
training run, is the same whatever the number of hosts (as long as no image is unreadable: a
dropped example shifts that host's later rows).

Sources "shapes" and "folder" build their TFDS dataset on first use (a no-op once built). With
several hosts sharing one data_dir, build it beforehand with `python -m sdjax.data.prepare`, so
that the hosts do not all write it at once. Unreadable images are logged and skipped; the count
is `sdjax.data.preprocess.unreadable_images_skipped()`, which includes the images the build of an
opened dataset skipped (an image folder's corrupt files never reach the pipeline).

grain worker processes (data.worker_count > 0) parse absl flags on start-up, so the program must
run under `absl.app.run` (or have parsed FLAGS) and `tokenize_fn` must be picklable. The batches
depend on worker_count (each worker batches its own slice), so resume with the same worker_count.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from sdjax.data.prepare import default_data_dir, prepare
from sdjax.data.preprocess import CROPS, Preprocess, caption_values, record_skipped_at_build
from sdjax.data.tfds_builders import skipped_at_build

SOURCES = ("shapes", "folder", "tfds")

# Stop, rather than spin, when most images in a window of 1000 reads cannot be decoded.
MAX_UNREADABLE_FRACTION = 0.5

TokenizeFn = Callable[[Sequence[str]], np.ndarray]


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


def _derived_seed(*numbers: int) -> int:
    """A 32-bit seed mixed from several non-negative integers of any size (grain seeds must fit in uint32;
    SeedSequence mixes every bit, so seeds that differ above bit 32 give different streams)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])


class _HostRows(grain.MapDataset):
    """This host's rows of each global batch of `parent`, in order."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, local_batch: int, process_index: int):
        super().__init__(parent)
        self._global, self._local, self._offset = global_batch, local_batch, process_index * local_batch

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local)
        return self._parent[batch * self._global + self._offset + row]

    def __str__(self) -> str:
        return f"HostRows(global={self._global}, local={self._local}, offset={self._offset})"


def make_dataset(source: Sequence[dict | None], transform: Callable[[dict, np.random.Generator], dict | None], *,
                 seed: int, process_index: int = 0, process_count: int = 1,
                 global_batch_size: int | None = None) -> grain.MapDataset:
    """This host's infinite stream of `transform(source example, rng)`: its rows of each global batch
    (of global_batch_size; default process_count, i.e. one row each). With the pixel stream's
    `image_preprocess` the examples are {"image": uint8 (R, R, 3), "caption": str}.

    Positions whose image cannot be decoded hold None; `make_iterator` drops them.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count})")
    global_batch_size = global_batch_size or process_count
    if len(source) < global_batch_size:
        raise ValueError(f"data.split: {len(source)} example(s) cannot fill a global batch of {global_batch_size}")
    dataset = grain.MapDataset.source(source).shuffle(seed=_derived_seed(seed, 0)).repeat()
    # Augmentation randomness by global position, so that it too ignores the number of hosts.
    dataset = dataset.random_map(transform, seed=_derived_seed(seed, 1))
    if process_count == 1:
        return dataset
    return _HostRows(dataset, global_batch_size, global_batch_size // process_count, process_index)


class _Collate:
    """Stacks examples into a batch (uint8 "image" becomes float "pixels"; other arrays, e.g. cached
    latents, keep their name) and tokenizes the captions.

    A class rather than a closure so that grain worker processes can pickle it with tokenize_fn.
    """

    def __init__(self, tokenize_fn: TokenizeFn | None):
        self.tokenize_fn = tokenize_fn

    def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        batch = {key: np.stack([e[key] for e in examples]) for key in examples[0] if key not in ("image", "caption")}
        if "image" in examples[0]:
            batch["pixels"] = to_pixels([e["image"] for e in examples])
        if self.tokenize_fn is None:  # image-only training (the VAE)
            return batch
        captions = [e["caption"] for e in examples]
        input_ids = np.asarray(self.tokenize_fn(captions))
        if input_ids.ndim != 2 or input_ids.shape[0] != len(captions):
            raise ValueError(f"tokenize_fn returned shape {input_ids.shape} for {len(captions)} captions; "
                             "expected (num_captions, max_length)")
        return {**batch, "input_ids": input_ids.astype(np.int32, copy=False)}


def make_iterator(data_config, tokenize_fn: TokenizeFn | None, *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, latents: str = "") -> grain.DatasetIterator:
    """An endless, checkpointable iterator over this host's batches.

    Each batch: "pixels" float32 (B_local, R, R, 3) in [-1, 1] and "input_ids" int32 (B_local, L),
    B_local = global_batch_size // process_count. `tokenize_fn(list[str]) -> int array (N, L)`; with
    tokenize_fn None, batches hold only "pixels".
    With `latents` (a cache folder of sdjax.data.latent_cache, made from this data_config's split)
    "latent_mean" and "latent_logvar" float32 (B_local, h, w, C) replace "pixels": the same examples
    in the same order, with the same captions drawn.
    The iterator's `get_state()` is JSON-serialisable and `set_state(state)` resumes exactly.
    """
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not a positive multiple of "
                         f"process_count {process_count}")
    batch_size = global_batch_size // process_count
    if latents:
        from sdjax.data.latent_cache import CachedExample, LatentCache  # which builds on this module

        source, transform = LatentCache(latents), CachedExample(float(data_config.caption_dropout))
    else:
        source, transform = make_source(data_config), image_preprocess(data_config)
    examples = make_dataset(source, transform, seed=seed, process_index=process_index, process_count=process_count,
                            global_batch_size=global_batch_size)
    read_options = grain.ReadOptions(num_threads=int(data_config.read_threads),
                                     prefetch_buffer_size=int(data_config.prefetch_buffer))
    dataset = examples.to_iter_dataset(read_options)  # drops the None of unreadable images
    dataset = grain.experimental.WithOptionsIterDataset(
        dataset, grain.experimental.DatasetOptions(filter_raise_threshold_ratio=MAX_UNREADABLE_FRACTION))
    dataset = dataset.batch(batch_size, drop_remainder=True, batch_fn=_Collate(tokenize_fn))
    if data_config.worker_count > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_config.worker_count)))
    return iter(dataset)
