"""Device meshes and logical-axis sharding: one code path from one CPU to a TPU pod.

Every weight carries logical axis names (sdjax.models.logical_axes); a rules table maps them onto
the mesh axes data / fsdp / tensor. Parameters, optimizer state and EMA are created already
sharded (jit with out_shardings over an abstract state); activations are constrained at block
boundaries by the same rules, through flax's logical-constraint context (see `activate`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Batch over data x fsdp; the large weight dimensions over fsdp; attention
# heads and MLP hidden units over tensor. Unlisted names (norm scales, vocab, ...) are replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)


def mesh_config() -> ml_collections.ConfigDict:
    """The `config.mesh` block: axis sizes (-1 = all remaining devices) and the rules table."""
    c = ml_collections.ConfigDict()
    c.data = -1
    c.fsdp = 1
    c.tensor = 1
    c.rules = DEFAULT_RULES
    return c


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh (data, fsdp, tensor) over `devices` (default: all), sizes from config."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(cfg[axis]) for axis in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"mesh: sizes {dict(zip(MESH_AXES, sizes))} do not divide the {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, "
                         f"but there are {len(devices)} devices")
    check_rules(cfg.rules)
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_rules(rules: Sequence[tuple[str, Any]]) -> None:
    """Raises ValueError if a rule names a mesh axis that does not exist."""
    for logical, axes in rules:
        for axis in (axes,) if isinstance(axes, str) or axes is None else axes:
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"mesh.rules: {logical!r} -> {axis!r}: unknown mesh axis "
                                 f"(known: {', '.join(MESH_AXES)})")


def _mesh_axes(logical: str | None, rules: dict[str, Any]) -> tuple[str, ...]:
    axes = rules.get(logical) if logical is not None else None
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def spec_for(logical: PartitionSpec | Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
    """The mesh PartitionSpec of an array with these logical axis names and shape.

    A dimension that the rule's mesh axes do not divide evenly stays replicated (e.g. 3 RGB input
    channels under fsdp=8): sharding it would need padding, and such weights are small.
    A mesh axis is used at most once per array.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axes = tuple(a for a in _mesh_axes(name, table) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def param_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a parameter tree, from its logical PartitionSpecs (sdjax.models.logical_axes)."""
    is_spec = lambda x: isinstance(x, PartitionSpec)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, spec_for(spec, x.shape, mesh, rules)),
                        logical_tree, abstract_tree, is_leaf=is_spec)


def _names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def tree_shardings(abstract: Any, params_logical: dict[str, Any], mesh: Mesh,
                   rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for any tree holding copies of parameters (train state: params, EMA, Adam's
    mu / nu): a leaf whose key path ends with a parameter's path (network name first) gets that
    parameter's sharding; everything else (step counters, RNG) is replicated."""
    by_path = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(
            params_logical, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]:
        by_path[_names(path)] = spec

    def sharding(path, leaf):
        names = _names(path)
        for start in range(len(names)):
            spec = by_path.get(names[start:])
            if spec is not None:
                return NamedSharding(mesh, spec_for(spec, leaf.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding, abstract)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]], ndim: int) -> NamedSharding:
    """Inputs sharded over the batch axes on their leading dimension, replicated otherwise."""
    axes = _mesh_axes("batch", dict(rules))
    return NamedSharding(mesh, PartitionSpec(axes if len(axes) != 1 else axes[0], *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> int:
    """How many ways the batch dimension is split (a batch must be a multiple of it)."""
    return math.prod(mesh.shape[a] for a in _mesh_axes("batch", dict(rules)))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> dict[str, jax.Array]:
    """The global batch arrays from this host's rows (every host passes its own, in process order)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
            for k, v in local.items()}


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Within this context, models' activation constraints (nn.with_logical_constraint) apply."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding hint by logical names; a no-op outside `activate`."""
    return nn.with_logical_constraint(x, names)


def initialize_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> None:
    """Joins a multi-host run (jax.distributed). With no arguments JAX detects the cluster itself
    (Cloud TPU, SLURM, ...); on a GPU cluster or localhost give all three."""
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("multi-host: give coordinator_address, num_processes and process_id together")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly multi-host sharded) arrays; every process must call it."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


# Barriers passed so far: each gets a new id (the coordination service does not reuse one), and every
# process passes the same barriers in the same order.
_barriers_passed = [0]
BARRIER_TIMEOUT_S = 24 * 3600  # process 0 may build a dataset or a latent cache for hours meanwhile


def sync_processes(name: str) -> None:
    """Waits until every process reaches this point (no-op with one process).

    A barrier of jax.distributed's coordination service (through Orbax's public helper), not a
    collective: a collective (multihost_utils.sync_global_devices) on CPU hosts gives up when a peer is
    30 s late (gloo's key-value wait), which a host building the dataset, or compiling slower, exceeds."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    _barriers_passed[0] += 1
    multihost.get_barrier_sync_fn()(key=f"sdjax/{_barriers_passed[0]}/{name}", timeout_ms=BARRIER_TIMEOUT_S * 1000)
