"""The LoRA factors sdjax trains, as a Flax module whose parameters are the factor tree that sdjax.lora
applies (`{network: {...kernel path...: {"down": (..., in, rank), "up": (rank, out)}}}`)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.layers import Dtype

# (network, Flax path of the kernel, kernel shape) of every weight that gets a LoRA.
Targets = tuple[tuple[str, tuple[str, ...], tuple[int, ...]], ...]


def _init(key: jax.Array, entries: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...], rank: int,
          dtype: Dtype) -> dict[str, Any]:
    """down from He's uniform bound 1/sqrt(fan_in) (PyTorch's Linear init, as kohya and PEFT draw it), up zero:
    the delta is zero at step 0, so training starts from the model itself."""
    tree: dict[str, Any] = {}
    for index, (path, shape) in enumerate(entries):
        bound = 1 / math.sqrt(math.prod(shape[:-1]))
        node = tree
        for name in path:
            node = node.setdefault(name, {})
        node["down"] = jax.random.uniform(jax.random.fold_in(key, index), (*shape[:-1], rank), dtype, -bound, bound)
        node["up"] = jnp.zeros((rank, shape[-1]), dtype)
    return tree


class LoRAFactors(nn.Module):
    """One LoRA's trainable factors: for each target kernel a down and an up factor of `rank`. Calling it
    returns them (the factor tree); they are small, so they are not sharded."""

    targets: Targets
    rank: int
    param_dtype: Dtype = jnp.float32

    def example_inputs(self) -> tuple:
        return ()

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        by_network: dict[str, list] = {}
        for network, path, shape in self.targets:
            by_network.setdefault(network, []).append((tuple(path), tuple(shape)))
        return {network: self.param(network, _init, tuple(entries), self.rank, self.param_dtype)
                for network, entries in by_network.items()}
