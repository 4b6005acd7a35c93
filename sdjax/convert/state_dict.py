"""Mapping between our Flax parameter trees and PyTorch state dicts of the same architecture.

Our modules mirror the reference's module nesting, so one rule names every tensor:
the Flax path ("down_blocks_0", "resnets_1", "conv1", "kernel") is the PyTorch key
"down_blocks.0.resnets.1.conv1.weight". List-valued PyTorch containers (ModuleList,
Sequential) become "<name>_<index>" in Flax; LIST_CONTAINERS says which names those are,
so that "linear_1" stays "linear_1". Leaves: Dense kernels are transposed, conv kernels go
from HWIO to OIHW, norm scales and embeddings are called "weight".
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax
import numpy as np

from sdjax.convert.safetensors_io import CheckpointError, release_pages

LIST_CONTAINERS = frozenset({
    "layers", "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net",
})
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_LIST_ITEM = re.compile(r"^(.*)_(\d+)$")


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of the Flax parameter at `path`."""
    parts = []
    for name in path[:-1]:
        match = _LIST_ITEM.match(name)
        if match and match.group(1) in LIST_CONTAINERS:
            parts += [match.group(1), match.group(2)]
        else:
            parts.append(name)
    return ".".join(parts + [_LEAF_NAMES[path[-1]]])


def to_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    """Our layout -> PyTorch's (Dense kernels (in, out) -> (out, in); conv HWIO -> OIHW)."""
    if path[-1] == "kernel":
        return array.T if array.ndim == 2 else np.transpose(array, (3, 2, 0, 1))
    return array


def from_torch_layout(path: tuple[str, ...], tensor: np.ndarray, expected_ndim: int) -> np.ndarray:
    """PyTorch's layout -> ours. A 1x1 conv kernel fills a Dense kernel (old VAE attention checkpoints)."""
    if path[-1] != "kernel":
        return tensor
    if expected_ndim == 2:
        if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]
        return tensor.T if tensor.ndim == 2 else tensor
    return np.transpose(tensor, (2, 3, 1, 0)) if tensor.ndim == 4 else tensor


def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape PyTorch gives the parameter that has `shape` here."""
    return tuple(to_torch_layout(path, np.empty(shape, np.bool_)).shape)


def state_dict_from_params(params: Any) -> dict[str, np.ndarray]:
    """A PyTorch-layout state dict (numpy arrays, same dtypes) from a Flax parameter tree."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return {torch_key(path): np.ascontiguousarray(to_torch_layout(path, np.asarray(v))) for path, v in flat.items()}


def params_from_state_dict(abstract_params: Any, state_dict: dict[str, np.ndarray], source: str,
                           dtype: Any = None, place: Callable[[np.ndarray], Any] | None = None) -> dict:
    """Fills the tree of `abstract_params` (shapes) from `state_dict`, strictly.

    Every tensor must be used and every parameter found, with matching shapes; errors name the
    key, the shape expected (PyTorch layout) and the shape found. `source` names the file.
    Values are cast to `dtype` (default: the abstract leaves' dtypes) and, with `place` (e.g.
    jnp.asarray), moved by it one at a time, each source tensor's pages released (`release_pages`) once
    its copy is placed, so that host memory holds about one tensor beside the placed ones.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_params))
    by_key = {torch_key(path): (path, leaf) for path, leaf in flat.items()}
    unexpected = sorted(set(state_dict) - set(by_key))
    missing = sorted(set(by_key) - set(state_dict))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {some_keys(missing)} that the model config needs")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {some_keys(unexpected)} that the model config "
                              f"does not have")
    laid_out = {}  # views in our layout; all shapes are checked before anything is placed
    for key, (path, leaf) in by_key.items():
        laid_out[key] = from_torch_layout(path, state_dict[key], len(leaf.shape))
        if laid_out[key].shape != tuple(leaf.shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(state_dict[key].shape)}; the model "
                                  f"config expects {torch_shape(path, tuple(leaf.shape))}")
    out = {}
    for key, (path, leaf) in by_key.items():
        value = np.asarray(laid_out[key], dtype=dtype or leaf.dtype)
        if place is not None:
            value = place(value)
            release_pages(state_dict[key])
        out[path] = value
    return flax.traverse_util.unflatten_dict(out)


def some_keys(keys: list[str], limit: int = 5) -> str:
    """The first `limit` keys quoted, and how many more (for error messages)."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
