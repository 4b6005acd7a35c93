"""A training split encoded once by a frozen VAE, streamed back like the pixels it replaces.

    folder/                      (a unet run's workdir/latent_cache, written by `ensure_latent_cache`)
        mean.npy, logvar.npy     float32 (N, h, w, C): the VAE posterior of example i of data.split
        readable.npy             bool (N,): False where the image could not be decoded (rows unused)
        original_size.npy        int32 (N, 2): each image's stored (height, width), as the pixel stream records it
        crop_top_left.npy        int32 (N, 2): the (top, left) of its centre crop in the resized image
        captions.json            [[str, ...], ...]: every caption of example i (one is drawn per position)
        meta.json                {"identity": what produced the cache, "examples": N, "unreadable": count}

Rows are indexed like the split's source, so `make_iterator(..., latents=folder)` runs the very same
shuffle, repetition, per-position draws (caption dropout and choice), host rows and iterator state
as the pixel stream: batch for batch the same examples with the same captions.

The moments are stored as float32, not float16: they are then exactly what the in-step encode gives,
so a cached run is the uncached run (up to the encoder's batch composition), and they are still small
(at f8, 2 x 4-8 latent channels are 1/24-1/12 of the float32 pixels they replace). float16 would
round them by up to 5e-4 relative, a change of the training data that this switch should not make.

The folder may be a gs:// (or other fsspec) URL: the cache is then built in a local temporary folder and
uploaded beside storage.PARTIAL (a cut-off upload reads as no cache, and is built again), and read back
into memory, where a local cache is memory-mapped.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Sequence

import grain
import numpy as np
from tqdm import tqdm

from sdjax import storage
from sdjax.data.source import image_preprocess, make_source, to_pixels
from sdjax.data.tfds_builders import object_version
from sdjax.data.preprocess import Draws, ImageView, caption_values, choose_caption, draw, dropped

FORMAT = 2  # bumped when the files change, so an old cache is rebuilt rather than misread

# (pixels float32 (n, R, R, 3) in [-1, 1]) -> (mean, logvar) float32 (n, h, w, C)
Encode = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def check_cacheable(data_config) -> None:
    """Raises ValueError unless the pixel stream is deterministic per image, as a cache freezes it."""
    if data_config.crop != "center":
        raise ValueError(f"data.cache_latents: a cache holds one crop of each image; needs data.crop 'center', "
                         f"got {data_config.crop!r}")
    if data_config.flip:
        raise ValueError("data.cache_latents: a cache holds one orientation of each image; needs data.flip False")


class LatentCache:
    """The cache in `folder` as a random-access source: example i is {"latent_mean", "latent_logvar",
    "original_size", "crop_top_left", "captions"}, or None where its image was unreadable (where the
    pixel stream has None too). A local cache is memory-mapped; a remote one (a URL) is read into memory
    (by every process that opens it: each grain worker too)."""

    def __init__(self, folder: str):
        self.folder = folder
        if storage.is_remote(folder):
            storage.check_complete(folder)
            load = lambda name: _npy_in_memory(storage.read_bytes(storage.join(folder, name)))  # noqa: E731
            self.mean, self.logvar = load("mean.npy"), load("logvar.npy")
            self.captions = json.loads(storage.read_text(storage.join(folder, "captions.json")))
        else:
            load = lambda name: np.load(os.path.join(folder, name))  # noqa: E731
            self.mean = np.load(os.path.join(folder, "mean.npy"), mmap_mode="r")
            self.logvar = np.load(os.path.join(folder, "logvar.npy"), mmap_mode="r")
            with open(os.path.join(folder, "captions.json"), encoding="utf-8") as f:
                self.captions = json.load(f)
        self.readable = load("readable.npy")
        self.original_size = load("original_size.npy")
        self.crop_top_left = load("crop_top_left.npy")

    def __len__(self) -> int:
        return len(self.readable)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if not self.readable[index]:
            return None
        return {"latent_mean": np.array(self.mean[index]), "latent_logvar": np.array(self.logvar[index]),
                "original_size": self.original_size[index], "crop_top_left": self.crop_top_left[index],
                "captions": self.captions[index]}

    def __reduce__(self):  # grain worker processes reopen the files instead of receiving copies of them
        return LatentCache, (self.folder,)


def _npy_in_memory(data: bytes | bytearray) -> np.ndarray:
    """The array of .npy file contents `data`, a view of them (a cache's moments are not held twice)."""
    stream = io.BytesIO(memoryview(data)[:1 << 16])
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        return np.load(io.BytesIO(data))
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        return np.load(io.BytesIO(data))
    array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=stream.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


@dataclasses.dataclass(frozen=True)
class CachedExample:
    """The cached stream's per-example transform: the pixel stream's draws, of which only the caption's
    (dropout, choice) apply here; the keys of the pixel stream's examples, with the posterior for the image."""

    caption_dropout: float

    def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, Any]:
        draws = draw(rng)
        caption = choose_caption(np.asarray(example["captions"], dtype=object), draws, self.caption_dropout)
        return {"latent_mean": example["latent_mean"], "latent_logvar": example["latent_logvar"],
                "caption": caption, "caption_dropped": np.bool_(dropped(draws, self.caption_dropout)),
                "original_size": example["original_size"], "crop_top_left": example["crop_top_left"]}


def dataset_identity(data_config, source: Sequence[dict]) -> dict[str, Any]:
    """What the split's pixels and captions come from: the dataset's files and the settings that read them."""
    info = source.dataset_info
    directory = storage.absolute(os.fspath(info.data_dir))
    files = {}
    if storage.is_remote(directory):  # names, sizes and versions (GCS: generations), from one listing
        for entry in storage.filesystem(directory).ls(directory, detail=True):
            if entry.get("type") != "directory":
                files[entry["name"].rstrip("/").rsplit("/", 1)[-1]] = [int(entry.get("size") or 0),
                                                                       object_version(entry)]
        files = dict(sorted(files.items()))
    else:
        for name in sorted(os.listdir(directory)):
            stat = os.stat(os.path.join(directory, name))
            files[name] = [stat.st_size, stat.st_mtime_ns]
    return {"dataset": info.full_name, "dataset_dir": directory, "dataset_files": files, "split": data_config.split,
            "examples": len(source), "image_key": data_config.image_key, "caption_key": data_config.caption_key,
            "resolution": int(data_config.resolution), "crop": data_config.crop, "flip": bool(data_config.flip)}


def _saved_identity(folder: str) -> dict[str, Any] | None:
    try:
        if storage.is_remote(folder) and not storage.is_complete_folder(folder):  # an upload cut off
            return None
        return json.loads(storage.read_text(storage.join(folder, "meta.json")))["identity"]
    except (OSError, ValueError, KeyError):  # absent or not ours: rebuilt like a stale one
        return None


def ensure_latent_cache(folder: str, data_config, encode: Encode, identity: dict[str, Any], chunk: int,
                        progress: bool = True) -> None:
    """Makes `folder` hold data.split encoded by `encode` (in chunks of `chunk` images): kept if its
    meta.json records this `identity` (the encoder's: VAE config, weights, dtype) and this dataset,
    else (re)built in folder.tmp and renamed into place, so a build cut short leaves no cache (a remote
    `folder`: built in a local temporary folder, then uploaded in place of the old one)."""
    check_cacheable(data_config)
    source = make_source(data_config)
    identity = json.loads(json.dumps({"format": FORMAT, **identity, **dataset_identity(data_config, source)}))
    saved = _saved_identity(folder)
    if saved == identity:
        print(f"latent cache: reusing {folder}", flush=True)
        return
    if saved is not None:
        changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        print(f"latent cache: {folder} is out of date ({', '.join(changed)} changed); rebuilding", flush=True)
    print(f"latent cache: encoding the {len(source)} images of data.split {data_config.split!r} into {folder}",
          flush=True)
    start_time = time.perf_counter()
    if storage.is_remote(folder):
        with tempfile.TemporaryDirectory(prefix="sdjax-latent-cache-") as staging:
            unreadable = _write_all(staging, source, data_config, encode, identity, chunk, progress)
            storage.remove(folder)  # the stale cache, or what a cut-off upload left
            storage.upload_folder(staging, folder)
    else:
        staging = folder + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        unreadable = _write_all(staging, source, data_config, encode, identity, chunk, progress)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(staging, folder)
    print(f"latent cache: {len(source) - unreadable} images encoded ({unreadable} unreadable, skipped) in "
          f"{time.perf_counter() - start_time:.1f}s", flush=True)


def _write_all(staging: str, source: Sequence[dict], data_config, encode: Encode, identity: dict[str, Any],
               chunk: int, progress: bool) -> int:
    """The whole cache, meta.json last, written into local folder `staging`; returns the unreadable count."""
    unreadable = _write(staging, source, data_config, encode, chunk, progress)
    with open(os.path.join(staging, "meta.json"), "w", encoding="utf-8") as f:
        json.dump({"identity": identity, "examples": len(source), "unreadable": unreadable}, f, indent=1)
    return unreadable


class _Read:
    """Example -> its centre-cropped image (zeros where unreadable: every row keeps its index), its
    original size and crop corner, and its captions."""

    # Centre crop and no flip (check_cacheable) use none of the draws.
    NO_DRAWS = Draws(drop=0.0, flip=1.0, crop_y=0.5, crop_x=0.5, pick=0.0)

    def __init__(self, data_config):
        self.preprocess = image_preprocess(data_config)

    def __call__(self, example: dict) -> dict[str, Any]:
        view = self.preprocess.image(example, self.NO_DRAWS)
        side, readable = self.preprocess.resolution, view is not None
        if not readable:
            view = ImageView(np.zeros((side, side, 3), np.uint8), np.zeros(2, np.int32), np.zeros(2, np.int32))
        return {"image": view.pixels, "original_size": view.original_size, "crop_top_left": view.crop_top_left,
                "readable": readable, "captions": caption_values(example[self.preprocess.caption_key])}


def _write(staging: str, source: Sequence[dict], data_config, encode: Encode, chunk: int, progress: bool) -> int:
    """Encodes every example of `source` into the cache's arrays and captions in `staging` (all but
    meta.json); returns how many images were unreadable."""
    count = len(source)
    read_options = grain.ReadOptions(num_threads=int(data_config.read_threads),
                                     prefetch_buffer_size=int(data_config.prefetch_buffer))
    examples = iter(grain.MapDataset.source(source).map(_Read(data_config)).to_iter_dataset(read_options))
    readable, captions, moments = np.zeros(count, bool), [], None
    sizes = {name: np.zeros((count, 2), np.int32) for name in ("original_size", "crop_top_left")}
    with tqdm(total=count, unit="image", desc="latent cache", disable=not progress) as bar:
        for start in range(0, count, chunk):
            part = list(itertools.islice(examples, chunk))
            mean, logvar = encode(to_pixels([e["image"] for e in part]))
            if moments is None:  # the latent shape is known once the first chunk is encoded
                moments = [np.lib.format.open_memmap(os.path.join(staging, f"{name}.npy"), mode="w+",
                                                     dtype=np.float32, shape=(count,) + mean.shape[1:])
                           for name in ("mean", "logvar")]
            stop = start + len(part)
            moments[0][start:stop], moments[1][start:stop] = mean, logvar
            readable[start:stop] = [e["readable"] for e in part]
            for name, array in sizes.items():
                array[start:stop] = [e[name] for e in part]
            captions.extend(e["captions"] for e in part)
            bar.update(len(part))
    for array in moments:
        array.flush()
    np.save(os.path.join(staging, "readable.npy"), readable)
    for name, array in sizes.items():
        np.save(os.path.join(staging, f"{name}.npy"), array)
    with open(os.path.join(staging, "captions.json"), "w", encoding="utf-8") as f:
        json.dump(captions, f, ensure_ascii=False)
    return int(count - readable.sum())
