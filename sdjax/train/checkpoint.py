"""Orbax checkpoints of a training run: state, data-iterator position and a model fingerprint.

Resume order: the latest *complete* step directory (Orbax writes into a temporary directory and
renames it when the save is finished, so a save killed half-way is never picked up) gives the
trained params, optimizer state, EMA, step, RNG and the data iterator's state; the frozen networks
come from the model the config builds. The fingerprint (component configs, trained networks,
prediction type) must match the run's, so a workdir is never resumed into a different model.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from sdjax import storage
from sdjax.train.step import TrainState


def fingerprint(model, trained: tuple[str, ...]) -> dict[str, Any]:
    """What identifies the model being trained, as JSON (tuples become lists, as they do when saved)."""
    return json.loads(json.dumps({"configs": {name: cfg.to_dict() for name, cfg in model.configs.items()},
                                  "trained": list(trained),
                                  "prediction_type": model.scheduler_config.get("prediction_type", "epsilon")}))


def _describe_difference(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> str:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _describe_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: checkpoint has {a!r}, this config gives {b!r}"
    return ""


class Checkpoints:
    """The run's CheckpointManager (async saves, keep the last N plus every K-th step)."""

    def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last, keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True)
        self.directory = storage.join(storage.absolute(workdir), "checkpoints")  # Orbax writes URLs itself
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "model"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_model(self, step: int, current: dict[str, Any]) -> None:
        """Raises ValueError if the checkpoint at `step` is of a different model than `current`."""
        saved = self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
        difference = _describe_difference(saved, current)
        if difference:
            raise ValueError(f"{self.directory} holds a checkpoint of a different model ({difference}); "
                             "use a new --workdir")

    def save(self, state: TrainState, data_state: Any, model: dict[str, Any]) -> None:
        """Starts saving `state` at its step (returns before the write finishes when async)."""
        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state.replace(frozen={})), data=ocp.args.JsonSave(data_state),
            model=ocp.args.JsonSave(model)), force=True)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, Any]:
        """(state, data-iterator state) at `step`, restored into target's structure and shardings."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target.replace(frozen={}))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            # Orbax lists every mismatched subtree over many lines; name the first, in one line.
            where = next((line.strip().rstrip(":") for line in str(e).splitlines()[1:] if line.rstrip().endswith(":")),
                         "")
            raise ValueError(f"{self.directory}/{step}: the saved training state{f' ({where})' if where else ''} "
                             "has another structure than this run's; it was written by another sdjax version "
                             "(before the fused AdamW state of 6e4bb47) or config; use a new --workdir") from None
        return restored["state"].replace(frozen=target.frozen), restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def read_state(workdir: str, step: int) -> dict[str, Any]:
    """The state saved at `step` in a run's workdir as host numpy arrays, whatever mesh saved it
    (restored onto this process's first device: for inspection and tests, not for big models)."""
    directory = storage.join(storage.absolute(workdir), "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(directory).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.device_get(checkpointer.restore(directory, target))
