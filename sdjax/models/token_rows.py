"""The embedding rows textual inversion trains, as a Flax module whose parameters are those rows
(`{text encoder: (vectors, width)}`), inserted into the frozen token-embedding tables by
sdjax.textual_inversion.with_rows."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.layers import Dtype


class TokenRows(nn.Module):
    """New token-embedding rows: `shapes` is ((text encoder, vectors, width), ...). Their starting values come
    from the initializer word (the task's params); the zeros here only give the shapes. Small: not sharded."""

    shapes: tuple[tuple[str, int, int], ...]
    param_dtype: Dtype = jnp.float32

    def example_inputs(self) -> tuple:
        return ()

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        return {encoder: self.param(encoder, nn.initializers.zeros, (vectors, width), self.param_dtype)
                for encoder, vectors, width in self.shapes}
