"""Where the train state lives on the mesh, and creating it there without gathering it anywhere."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdjax.models.params import abstract_params, logical_axes, place_params
from sdjax.parallel import tree_shardings
from sdjax.train.build import initial_params
from sdjax.train.step import TrainState, init_state


def state_shardings(sd, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                    mesh: Mesh) -> tuple[Any, Any]:
    """(abstract TrainState, its NamedShardings) under config.mesh.rules."""
    abstract = {n: abstract_params(m) for n, m in sd.networks.items()}
    state = jax.eval_shape(lambda p: init_state(p, config, tx), abstract)
    logical = {n: logical_axes(m) for n, m in sd.networks.items()}
    return state, tree_shardings(state, logical, mesh, config.mesh.rules)


def create_state(sd, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                 mesh: Mesh) -> tuple[TrainState, Any]:
    """The step-0 state, created sharded: from the checkpoint's host arrays (placed shard by shard)
    or, from scratch, initialised inside one jit whose outputs are sharded. Returns (state, shardings)."""
    _, shardings = state_shardings(sd, config, tx, mesh)
    make = jax.jit(lambda p: init_state(p, config, tx), out_shardings=shardings)
    if sd.params:
        placed = {n: place_params(p, sd.networks[n], mesh, config.mesh.rules) for n, p in sd.params.items()}
        return make(placed), shardings
    scratch = jax.jit(lambda: init_state(initial_params(sd, config.seed), config, tx), out_shardings=shardings)
    return scratch(), shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
