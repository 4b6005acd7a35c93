"""sdjax: Stable Diffusion in JAX/Flax."""

import os

from sdjax.convert.safetensors_io import CheckpointError
from sdjax.pipeline import generate
from sdjax.stable_diffusion import Model, StableDiffusion, load, save
from sdjax.storage import StorageError

__version__ = "0.1.0"

# The small model trained from scratch by configs/shapes_model.py, shipped in the package (diffusers layout).
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes-model")

__all__ = ["CheckpointError", "DEFAULT_MODEL", "Model", "StableDiffusion", "StorageError", "generate", "load", "save", "__version__"]
