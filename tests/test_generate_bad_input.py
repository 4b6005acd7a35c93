"""`generate` refuses bad arguments before any compute, with one message naming the argument."""

import numpy as np
import pytest

import sdjax

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

IMG = np.zeros((1, 32, 32, 3), np.float32)
MASK = np.ones((1, 32, 32), np.float32)


@pytest.fixture(scope="module")
def sd(checkpoints):
    return sdjax.load(checkpoints["sd1"][0])


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[]), "prompts: empty list"),
    (dict(negative_prompts=["a", "b"]), "negative_prompts: 2 given for 1 prompts"),
    (dict(num_steps=0), "num_steps must be >= 1"),
    (dict(height=36), "multiples of 8, got 36x32"),
    (dict(seed=[1, 2]), "seed: 2 seeds given for 1 prompts"),
    (dict(scheduler="nope"), "unknown scheduler 'nope'"),
    (dict(init_image=IMG, strength=0.0), "strength must be in (0, 1], got 0.0"),
    (dict(init_image=IMG, strength=1.5), "strength must be in (0, 1], got 1.5"),
    (dict(init_image=IMG, strength=0.01), "leaves no denoising step"),
    (dict(init_image=np.zeros((1, 16, 32, 3))), "init_image has shape (1, 16, 32, 3); expected (1, 32, 32, 3)"),
    (dict(init_image=IMG, mask=np.ones((1, 32, 16))), "mask has shape (1, 32, 16); expected (1, 32, 32)"),
    (dict(mask=MASK), "mask given without init_image"),
    (dict(latents=np.zeros((1, 8, 8, 4))), "latents has shape (1, 8, 8, 4); expected (1, 16, 16, 4)"),
])
def test_bad_arguments(sd, kwargs, message):
    args = dict(prompts=["a circle"], num_steps=4, height=32, width=32) | kwargs
    with pytest.raises(ValueError) as e:
        sd.generate(args.pop("prompts"), **args)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_inpainting_model_needs_mask(inpaint_checkpoint):
    sd = sdjax.load(inpaint_checkpoint)
    with pytest.raises(ValueError, match="9 input channels .* give init_image and mask"):
        sd.generate(["a"], num_steps=2, height=32, width=32)


def test_long_prompt_is_truncated_with_warning(sd):
    long_prompt = "circle " * 100
    with pytest.warns(UserWarning, match="exceed 77 tokens and were truncated"):
        ids = sd.tokenize([long_prompt, "short"])["input_ids"]
    assert ids.shape == (2, 77)
    eos = sd.model.tokenizers["tokenizer"].eos_token_id
    assert ids[0, -1] == eos  # truncation keeps the end-of-text token, as CLIP's tokenizer does
