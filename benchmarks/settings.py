"""What one benchmark run measures, shared by the orchestrator and its worker processes (as JSON)."""

from __future__ import annotations

import dataclasses
import json

MEASUREMENTS = ("unet", "sampling", "vae", "train", "compile")
SIDES = ("sdjax", "torch")
# Side of the square matmul each framework's peak FLOP/s is measured with: 2048 saturates a CPU; a GPU
# finishes that in tens of microseconds, where launch overhead would hide its peak.
PEAK_MATMUL_SIDE = {"cpu": 2048, "gpu": 8192}
# Best of this many matmuls: with 5, one run on the shared 2-core VM read 322 GFLOP/s where others read
# 409-459, which put the MFU column above 100%.
PEAK_MATMUL_REPEATS = 20
# Table rows per measurement: compile runs twice on one persistent cache, empty and then filled.
ROWS = {name: (name,) for name in MEASUREMENTS} | {"compile": ("compile_cold", "compile_warm")}


def sides_of(measurement: str) -> tuple[str, ...]:
    """The frameworks a measurement runs on: torch runs eagerly, so it has no compile time to measure."""
    return ("sdjax",) if measurement == "compile" else SIDES


@dataclasses.dataclass(frozen=True)
class Settings:
    """Shapes, dtypes and repeat counts of one run; sizes are image sides in pixels."""

    preset: str
    folder: str          # the shared diffusers checkpoint both frameworks load
    device: str          # "cpu" or "gpu"
    sdjax_dtype: str     # compute dtype of the sdjax networks
    torch_dtype: str     # dtype of the torch networks (parameters and compute)
    attention: str       # sdjax attention_impl
    batch: int           # images per sampling / VAE / train call; the UNet runs the guided batch, 2x this
    resolution: int      # image side of sampling, VAE decode and training
    unet_resolution: int  # image side whose latents the UNet forward gets
    vae_factor: int      # pixels per latent along a side
    steps: int
    guidance: float
    warmup: int
    repeats: int
    cache_dir: str = ""  # persistent compilation cache of the compile measurement

    @property
    def latent_side(self) -> int:
        return self.resolution // self.vae_factor

    @property
    def unet_latent_side(self) -> int:
        return self.unet_resolution // self.vae_factor

    def attention_of(self, network: str) -> str:
        """The sdjax attention kernel of one network. cuDNN's flash kernel takes head dims up to 256 (128 before
        Hopper); the VAE's mid-block attention is one 512-wide head, so with "cudnn" the VAE runs "dot"."""
        return "dot" if network == "vae" and self.attention == "cudnn" else self.attention

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        return cls(**json.loads(text))
