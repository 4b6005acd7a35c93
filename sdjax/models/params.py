"""Creating, describing and counting parameters of the three networks without running them."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.clip import CLIPModel
from sdjax.models.clip_text import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL


def example_inputs(module: nn.Module) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The smallest inputs that trace every parameter of `module` (shapes only); a module may name its own."""
    if hasattr(module, "example_inputs"):
        return module.example_inputs()
    cfg = module.config
    if isinstance(module, CLIPTextModel):
        return (jax.ShapeDtypeStruct((1, cfg.max_position_embeddings), jnp.int32),)
    if isinstance(module, AutoencoderKL):
        side = cfg.downscale
        return (jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32),)
    if isinstance(module, UNet2DConditionModel):
        side = 2 ** (len(cfg.block_out_channels) - 1)
        inputs = (jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32),
                  jax.ShapeDtypeStruct((1,), jnp.int32),
                  jax.ShapeDtypeStruct((1, 1, cfg.cross_attention_dim), jnp.float32))
        if cfg.addition_embed_type == "text_time":  # any split of the added features traces the same weights
            pooled = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
            inputs += (jax.ShapeDtypeStruct((1, pooled), jnp.float32), jax.ShapeDtypeStruct((1, 1), jnp.float32))
        return inputs
    if isinstance(module, CLIPModel):
        side = cfg.vision.image_size
        return (jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32),
                jax.ShapeDtypeStruct((1, cfg.text.max_position_embeddings), jnp.int32))
    raise TypeError(f"no example inputs for {type(module).__name__}")


def boxed_abstract_params(module: nn.Module) -> Any:
    """Parameter shapes with their logical-axis metadata (flax LogicallyPartitioned boxes)."""
    return jax.tree.map(lambda leaf: leaf, _traced_params(module))  # a tree of its own for the caller


@functools.lru_cache(maxsize=16)
def _traced_params(module: nn.Module) -> Any:
    # Tracing init takes seconds even for small models, and loading, placing, planning and training ask
    # for the same network's shapes several times; modules are frozen dataclasses, equal by configuration.
    return jax.eval_shape(lambda rng, *xs: module.init(rng, *xs), jax.random.key(0), *example_inputs(module))["params"]


def abstract_params(module: nn.Module) -> Any:
    """The parameter tree of `module` as jax.ShapeDtypeStruct leaves; allocates nothing."""
    return nn.unbox(boxed_abstract_params(module))


def logical_axes(module: nn.Module) -> Any:
    """A tree like the parameters whose leaves are PartitionSpecs of logical axis names."""
    return nn.get_partition_spec(boxed_abstract_params(module))


def init_params(module: nn.Module, rng: jax.Array) -> Any:
    """Randomly initialised parameters (plain arrays) for training from scratch."""
    return nn.unbox(jax.jit(module.init)(rng, *(jnp.zeros(x.shape, x.dtype) for x in example_inputs(module)))["params"])


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(int(jnp.size(x)) if hasattr(x, "size") else 0 for x in jax.tree.leaves(params))


def place_params(params: Any, module: nn.Module, mesh: Any, rules: Any) -> Any:
    """`module`'s parameters (host or device arrays) put on `mesh`, each sharded by its logical axes
    under `rules` (shard by shard from the host: no device holds the whole tree)."""
    from sdjax.parallel import param_shardings

    return jax.device_put(params, param_shardings(logical_axes(module), params, mesh, rules))
