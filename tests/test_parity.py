"""Our Flax networks, loaded through sdjax.load from diffusers folders, against the PyTorch reference.

Tolerance: max |ours - reference| / max |reference| <= 1e-4 in float32 (measured: ~1e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

import sdjax

RTOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nchw(x_nhwc):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x_nhwc), (0, 3, 1, 2))))


def to_nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def loaded(request, checkpoints):
    folder, ref = checkpoints[request.param]
    return request.param, sdjax.load(folder), ref


def test_text_encoder(loaded):
    flavour, sd, ref = loaded
    prompts = ["a red circle", "", "a blue square on a green background, detailed"]
    ids = sd.tokenize(prompts)["input_ids"]
    assert ids.shape == (3, 77)
    expected_pad = sd.model.tokenizers["tokenizer"].eos_token_id if flavour == "sd1" else 0
    assert ids[1, 2] == expected_pad and ids[1, 1] == sd.model.tokenizers["tokenizer"].eos_token_id
    hidden, pooled = jax.jit(sd.model.networks["text_encoder"].apply)({"params": sd.params["text_encoder"]}, ids)
    with torch.no_grad():
        out = ref["text_encoder"](torch.from_numpy(ids.astype(np.int64)))
    assert rel_err(hidden, out.last_hidden_state) < RTOL
    assert rel_err(pooled, out.pooler_output) < RTOL


def test_vae_encode_decode(loaded):
    _, sd, ref = loaded
    images = np.random.default_rng(0).uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
    variables = {"params": sd.params["vae"]}
    mean, logvar = jax.jit(lambda v, x: sd.model.vae.apply(v, x, method="encode"))(variables, images)
    with torch.no_grad():
        dist = ref["vae"].encode(nchw(images)).latent_dist
    assert rel_err(mean, to_nhwc(dist.mean)) < RTOL
    assert rel_err(logvar, to_nhwc(dist.logvar)) < RTOL
    latents = np.random.default_rng(1).normal(size=(2, 12, 20, 4)).astype(np.float32)
    decoded = jax.jit(lambda v, z: sd.model.vae.apply(v, z, method="decode"))(variables, latents)
    with torch.no_grad():
        expected = ref["vae"].decode(nchw(latents)).sample
    assert decoded.shape == (2, 24, 40, 3)
    assert rel_err(decoded, to_nhwc(expected)) < RTOL


@pytest.mark.parametrize("height,width", [(16, 24), (10, 14)])  # 10x14: odd sizes need upsample_size
def test_unet(loaded, height, width):
    flavour, sd, ref = loaded
    rng = np.random.default_rng(2)
    latents = rng.normal(size=(2, height, width, 4)).astype(np.float32)
    context = rng.normal(size=(2, 7, 32)).astype(np.float32)
    timesteps = np.array([999, 17], np.int32)
    ours = jax.jit(sd.model.unet.apply)({"params": sd.params["unet"]}, latents, timesteps, context)
    with torch.no_grad():
        expected = ref["unet"](nchw(latents), torch.from_numpy(timesteps.astype(np.int64)),
                               torch.from_numpy(context)).sample
    assert sd.model.unet.config.use_linear_projection == (flavour == "sd2")
    assert sd.model.unet.config.upcast_attention == (flavour == "sd2")
    assert rel_err(ours, to_nhwc(expected)) < RTOL


def test_attention_implementations_agree(loaded):
    """jax.nn.dot_product_attention gives the reference numbers too (the fast path on GPU/TPU)."""
    _, sd, _ = loaded
    rng = np.random.default_rng(3)
    latents = rng.normal(size=(1, 8, 8, 4)).astype(np.float32)
    context = rng.normal(size=(1, 5, 32)).astype(np.float32)
    xla = sd.model.unet.apply({"params": sd.params["unet"]}, latents, 500, context)
    dot = sd.model.unet.clone(attention_impl="dot").apply({"params": sd.params["unet"]}, latents, 500, context)
    assert rel_err(dot, xla) < RTOL


def test_remat_gradients_match(loaded):
    """remat=True recomputes activations in the backward pass (a checkpoint in the program), same gradients."""
    _, sd, _ = loaded
    rng = np.random.default_rng(4)
    latents = rng.normal(size=(1, 8, 8, 4)).astype(np.float32)
    context = rng.normal(size=(1, 5, 32)).astype(np.float32)
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, latents, 10, context) ** 2)
    remat_unet = sd.model.unet.clone(remat=True)
    assert "remat" in str(jax.make_jaxpr(loss(remat_unet))(sd.params["unet"]))
    assert "remat" not in str(jax.make_jaxpr(loss(sd.model.unet))(sd.params["unet"]))
    g_plain = jax.grad(loss(sd.model.unet))(sd.params["unet"])
    g_remat = jax.grad(loss(remat_unet))(sd.params["unet"])
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        assert rel_err(b, a) < 1e-5
