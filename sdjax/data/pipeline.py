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

The examples come from sdjax.data.source (what the split is and how an example is preprocessed).

grain worker processes (data.worker_count > 0) parse absl flags on start-up, so the program must
run under `absl.app.run` (or have parsed FLAGS) and `tokenize_fn` must be picklable. The batches
depend on worker_count (each worker batches its own slice), so resume with the same worker_count.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import grain
import numpy as np

from sdjax.data.latent_cache import CachedExample, LatentCache
from sdjax.data.source import image_preprocess, make_source, to_pixels

# Stop, rather than spin, when most images in a window of 1000 reads cannot be decoded.
MAX_UNREADABLE_FRACTION = 0.5

TokenizeFn = Callable[[Sequence[str]], Mapping[str, np.ndarray]]  # captions -> {batch key: ids}


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
        for key, ids in self.tokenize_fn(captions).items():
            ids = np.asarray(ids)
            if ids.ndim != 2 or ids.shape[0] != len(captions):
                raise ValueError(f"tokenize_fn returned {key} of shape {ids.shape} for {len(captions)} captions; "
                                 "expected (num_captions, max_length)")
            batch[key] = ids.astype(np.int32, copy=False)
        return batch


def make_iterator(data_config, tokenize_fn: TokenizeFn | None, *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, latents: str = "") -> grain.DatasetIterator:
    """An endless, checkpointable iterator over this host's batches.

    Each batch: "pixels" float32 (B_local, R, R, 3) in [-1, 1] and "input_ids" int32 (B_local, L),
    B_local = global_batch_size // process_count. `tokenize_fn(list[str]) -> {batch key: int array (N, L)}`
    (e.g. sdjax.conditioning.tokenizer_fn: "input_ids" per text encoder); with tokenize_fn None, batches
    hold only "pixels".
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
