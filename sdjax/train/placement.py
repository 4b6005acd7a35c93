"""Where the train state lives on the mesh, and creating it there without gathering it anywhere."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdjax.models.params import abstract_params, logical_axes, place_params
from sdjax.parallel import tree_shardings
from sdjax.train.build import initial_params
from sdjax.train.optimizer import AdamW
from sdjax.train.step import TrainState, init_state


def state_shardings(networks: dict[str, nn.Module], trained: tuple[str, ...], config: ml_collections.ConfigDict,
                    tx: AdamW, mesh: Mesh) -> tuple[Any, Any]:
    """(abstract TrainState, its NamedShardings) of a run over `networks`, training those named
    `trained`, under config.mesh.rules."""
    abstract = {n: abstract_params(m) for n, m in networks.items()}
    state = jax.eval_shape(lambda p: init_state(p, trained, config, tx), abstract)
    logical = {n: logical_axes(m) for n, m in networks.items()}
    return state, tree_shardings(state, logical, mesh, config.mesh.rules)


def create_state(networks: dict[str, nn.Module], params: dict[str, Any], trained: tuple[str, ...],
                 config: ml_collections.ConfigDict, tx: AdamW, mesh: Mesh) -> tuple[TrainState, Any]:
    """The step-0 state, created sharded: networks in `params` (host arrays from files) are placed
    shard by shard, the others initialised inside the same jit whose outputs are sharded.
    Returns (state, shardings)."""
    _, shardings = state_shardings(networks, trained, config, tx, mesh)
    placed = {n: place_params(p, networks[n], mesh, config.mesh.rules) for n, p in params.items()}
    fresh = {n: m for n, m in networks.items() if n not in params}
    make = jax.jit(lambda loaded: init_state({**loaded, **initial_params(fresh, config.seed)}, trained, config, tx),
                   out_shardings=shardings)
    return make(placed), shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
