"""Cloud TPU targets that plan.py --target compiles for, on any machine with libtpu installed (no TPU needed).

A target names a slice as Cloud TPU does ("v5e-8", "v5p-8", "v5e-256") or several slices joined over the
data-center network ("2xv5e-16"). libtpu describes its topology (jax.experimental.topologies), whose
abstract devices a Mesh is built over; jit(...).lower(...).compile() then runs the real TPU compiler.

Chip facts are the Cloud TPU documentation's (https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e:
"peak compute per chip (bf16)", "HBM capacity" and "HBM bandwidth"). HBM is taken as GiB: v4 and v5p pages
say GiB; the v5e and v6e pages say "16 GB" / "32 GB" for the same binary-sized HBM stacks. The runtime
keeps a little of it for itself, so a plan that fits with a margin under ~0.5 GiB is tight.

Devices vs chips: v4 and v5p chips have two TensorCores. With chip_config_name "megacore" (what JAX on a
Cloud TPU v4 / v5p VM shows) each chip is one device; "default" makes a v4 chip two devices (v5p stays
one). Names of v4 / v5p slices count TensorCores (v4-8 = 4 chips), v5e / v6e names count chips.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

GIB = 2 ** 30
EXTRA = "pip install 'sdjax[tpu]'  (or: pip install \"jax[tpu]==<your jax version>\")"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's chip, as the Cloud TPU docs give it."""

    generation: str          # "v5e"
    topology_prefix: str     # libtpu's name in "v5e:2x4"
    chip_config: str         # libtpu chip config: "megacore" = one device per chip
    hbm_bytes: int           # HBM capacity per chip
    peak_flops: float        # peak bf16 FLOP/s per chip
    hbm_bandwidth: float     # bytes/s per chip
    cores_in_name: bool      # slice names count TensorCores (2 per chip), not chips
    accelerator_prefix: str  # Cloud TPU accelerator type: "v5litepod-8"


CHIPS = {
    "v4": Chip("v4", "v4", "megacore", 32 * GIB, 275e12, 1200e9, True, "v4"),
    "v5e": Chip("v5e", "v5e", "default", 16 * GIB, 197e12, 819e9, False, "v5litepod"),
    "v5p": Chip("v5p", "v5p", "megacore", 95 * GIB, 459e12, 2765e9, True, "v5p"),
    "v6e": Chip("v6e", "v6e", "default", 32 * GIB, 918e12, 1640e9, False, "v6e"),
}

# chips in a slice -> (topology, wrap-around links per axis). 2D torus wrap only for the full v5e / v6e
# pod (16x16); 3D torus for v4 / v5p slices of a full 4x4x4 cube and more (Cloud TPU docs' topologies).
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
SHAPES = {"v4": _3D, "v5p": _3D, "v5e": _2D, "v6e": _2D}


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice (or num_slices identical slices over DCN) to compile for."""

    name: str
    chip: Chip
    topology: str                # "v5e:4x4"
    num_slices: int
    chips_per_slice: int
    wrap: tuple[bool, bool, bool]

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def devices(self) -> int:
        """JAX devices: one per chip with the chip configs used here (megacore on v4 / v5p)."""
        return self.chips

    @property
    def hosts_bounds(self) -> tuple[int, int, int]:
        """Chips per host in each axis: single-host slices of 8 chips (v5e-8, v6e-8) have one 2x4 host;
        other hosts hold 2x2 chips. Only the process layout depends on it, not the compiled program."""
        return (2, 4, 1) if self.topology.endswith(":2x4") else (1, 1, 1) if self.chips_per_slice == 1 else (2, 2, 1)

    def topology_args(self) -> dict[str, Any]:
        """Keyword arguments of jax.experimental.topologies.get_topology_desc."""
        return dict(platform="tpu", topology_name=self.topology, chip_config_name=self.chip.chip_config,
                    chips_per_host_bounds=self.hosts_bounds, num_slices=self.num_slices, wrap=self.wrap)


def known_targets() -> list[str]:
    """Every single-slice name parse_target accepts (multi-slice: 'Nx' in front of one)."""
    names = []
    for generation, shapes in SHAPES.items():
        per_chip = 2 if CHIPS[generation].cores_in_name else 1
        names += [f"{generation}-{chips * per_chip}" for chips in shapes]
    return names


def parse_target(name: str) -> Target:
    """'v5e-8' -> one v5e 2x4 slice; '2xv5e-16' -> two v5e 4x4 slices over DCN. ValueError names the known ones."""
    match = re.fullmatch(r"(?:(\d+)x)?(v4|v5e|v5p|v6e)-(\d+)", name.strip())
    slices = int(match.group(1)) if match and match.group(1) else 1
    if match is None or slices < 1:
        raise ValueError(f"--target {name!r}: unknown TPU target (known: {', '.join(known_targets())}; "
                         f"several slices over DCN: e.g. 2xv5e-16)")
    chip = CHIPS[match.group(2)]
    count = int(match.group(3))
    chips = count // 2 if chip.cores_in_name else count
    if chips not in SHAPES[chip.generation] or (chip.cores_in_name and count % 2):
        raise ValueError(f"--target {name!r}: unknown TPU target (known: {', '.join(known_targets())}; "
                         f"several slices over DCN: e.g. 2xv5e-16)")
    shape = SHAPES[chip.generation][chips]
    dims = [int(d) for d in shape.split("x")]
    if chip.cores_in_name:  # a 3D torus closes each axis of a slice of whole 4x4x4 cubes
        wrap = tuple(d >= 4 for d in dims) if chips >= 64 else (False, False, False)
    else:  # the 2D torus closes only on the full 16x16 pod
        wrap = (True, True, False) if chips == 256 else (False, False, False)
    return Target(name, chip, f"{chip.topology_prefix}:{shape}", slices, chips, wrap)


def require_libtpu() -> None:
    """ValueError (one line, naming the install) when libtpu, which compiles for TPU, is not installed."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if not (path and os.path.isfile(path)) and importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"--target needs libtpu, the TPU compiler, which is not installed: {EXTRA}")


def tpu_chips_attached() -> bool:
    """Whether this machine has TPU chips (PCI devices of Google's vendor id), as jax's own check."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # a private jax module: if it moves, assume a TPU host and leave libtpu's setup alone
        return True


def quiet_libtpu(target: Target) -> None:
    """Environment for loading libtpu on a machine without TPU chips; must run before jax loads the plugin.

    Without chips libtpu cannot ask the cloud metadata server what it runs on and prints about five
    lines of errors at load: "Failed to find host bounds for accelerator type" (TPU_ACCELERATOR_TYPE
    answers it) and "unexpected worker hostname" (TPU_WORKER_HOSTNAMES answers it); and it locks
    /tmp/libtpu_lockfile, so a second process could not load it. Values already set
    win; on a real TPU host nothing is set, since there the metadata server's answers are the right ones.
    JAX_PLATFORMS=cpu (unless set) keeps JAX's own backend on the CPU: planning runs nothing, and on a TPU host it
    leaves the chips to whatever job holds them.
    """
    import jax

    if not os.environ.get("JAX_PLATFORMS"):  # jax read the variable at import; its config is what counts now
        jax.config.update("jax_platforms", "cpu")
    if tpu_chips_attached():
        return
    per_chip = 2 if target.chip.cores_in_name else 1
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{target.chip.accelerator_prefix}-{target.chips_per_slice * per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes /tmp/libtpu_lockfile for the chips it would drive; compiling only, there are none to
    # guard, and a second plan (or test) at the same time would otherwise fail to load it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def skip_absent_tpu() -> None:
    """Keeps JAX from starting libtpu on a machine that has it installed (the `tpu` extra, for plan.py
    --target) but no TPU chips: there the TPU backend cannot start anyway, and trying prints about five lines
    of libtpu errors at every JAX start. JAX is then limited to the CPU. Called by the command-line tools
    before JAX picks its backends; does nothing where JAX_PLATFORMS is set, on a TPU host, without libtpu,
    or where a CUDA plugin is installed (JAX's own choice of GPU stays)."""
    import jax

    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    if importlib.util.find_spec("libtpu") is None or tpu_chips_attached():
        return
    if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return
    jax.config.update("jax_platforms", "cpu")


def topology_devices(target: Target) -> list[Any]:
    """The target's abstract TPU devices, ordered slice by slice (then by id): a mesh's leading axis that
    is a multiple of num_slices then spans the slices, so its collectives are the ones that cross DCN."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(**target.topology_args()).devices
    return sorted(devices, key=lambda d: (getattr(d, "slice_index", None) or 0, d.id))


def check_mesh(sizes: dict[str, int], target: Target) -> dict[str, int]:
    """The mesh sizes with a -1 resolved against the target's devices; ValueError (one line) when they do
    not multiply to the target's device count or, over several slices, the data axis cannot span them."""
    free = [axis for axis, size in sizes.items() if size == -1]
    known = math.prod(size for size in sizes.values() if size != -1)
    shown = ",".join(f"{axis}={size}" for axis, size in sizes.items())
    if len(free) == 1 and known and target.devices % known == 0:
        sizes = {**sizes, free[0]: target.devices // known}
    if len(free) > 1 or math.prod(sizes.values()) != target.devices:
        raise ValueError(f"--target {target.name} has {target.devices} devices ({target.chips} chips), but the "
                         f"mesh {shown} multiplies to {known if free else math.prod(sizes.values())}"
                         f"{' times -1' if free else ''}: give --mesh sizes whose product is {target.devices}")
    if target.num_slices > 1 and sizes["data"] % target.num_slices:
        raise ValueError(f"--target {target.name}: the data axis spans the {target.num_slices} slices over DCN, so "
                         f"it must be a multiple of {target.num_slices} (mesh {shown})")
    return sizes


__all__ = ["CHIPS", "Chip", "EXTRA", "Target", "check_mesh", "known_targets", "parse_target", "quiet_libtpu",
           "require_libtpu", "skip_absent_tpu", "topology_devices"]
