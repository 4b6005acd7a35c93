"""The small model shipped in the package: it loads, and the README's command draws what it is asked."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdjax
from sdjax import adherence

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_PROMPT = "a large green triangle on a white background"


def test_shipped_model_is_a_small_diffusers_folder():
    files = {os.path.relpath(os.path.join(d, f), sdjax.DEFAULT_MODEL)
             for d, _, names in os.walk(sdjax.DEFAULT_MODEL) for f in names}
    for needed in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                   "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                   "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert needed in files
    size = sum(os.path.getsize(os.path.join(sdjax.DEFAULT_MODEL, f)) for f in files)
    assert size < 20 * 2**20, f"the shipped model is {size / 2**20:.1f} MiB"


def test_readme_command_without_model_draws_the_prompt(tmp_path):
    """`python sample.py --prompt ...` with no --model uses the shipped model; the independent judge
    reads back every attribute the prompt asked for."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--prompt", README_PROMPT,
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (name,) = os.listdir(out)
    image = np.asarray(Image.open(out / name).convert("RGB"))
    assert image.shape == (64, 64, 3)
    assert adherence.analyse(image) == adherence.parse_prompt(README_PROMPT)
