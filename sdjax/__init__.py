"""sdjax: Stable Diffusion in JAX/Flax."""

from sdjax.convert.safetensors_io import CheckpointError
from sdjax.stable_diffusion import StableDiffusion, load

__version__ = "0.1.0"
__all__ = ["CheckpointError", "StableDiffusion", "load", "__version__"]
