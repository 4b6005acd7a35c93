"""LoRA (sdjax.lora): kohya- and PEFT-format files written here from the same nonzero random factors (alpha !=
rank, 3x3 conv LoRA on every resnet convolution) on tiny SD 1.x and SDXL models.

References: the merge formula W + scale * alpha / rank * up @ down applied to the torch modules the test
itself named (UNet and text encoders), and diffusers' own load_lora_weights + fuse_lora, which must give the
UNet those very weights from the same kohya file (diffusers' text-encoder LoRA path needs a newer peft than
the registry has, so the text encoders are checked against the formula alone).
"""

import copy

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

import sdjax  # noqa: E402
from sdjax.conditioning import Conditioning, unet_call  # noqa: E402
from sdjax.lora import read_lora  # noqa: E402

TOL = 1e-4
RANK, ALPHA = 4, 3.0


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _targets(module) -> dict:
    """Every Linear and Conv2d of a torch network, by module name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _factors(module, seed: int) -> dict:
    """name -> (down, up) in PyTorch layout: conv LoRA as kohya's LoCon (k x k down, 1x1 up)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in _targets(module).items():
        w = m.weight
        tail = tuple(w.shape[2:])
        down = torch.randn(RANK, w.shape[1], *tail, generator=g) * 0.3
        up = torch.randn(w.shape[0], RANK, *(1,) * len(tail), generator=g) * 0.3
        out[name] = (down, up)
    return out


def _merged(module, factors: dict, scale: float):
    """A copy of the torch module with W + scale * alpha / rank * up @ down on every factor's target."""
    merged = copy.deepcopy(module)
    targets = _targets(merged)
    with torch.no_grad():
        for name, (down, up) in factors.items():
            w = targets[name].weight
            w += scale * ALPHA / RANK * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return merged


def _te_name(name: str) -> str:
    """transformers 4's module path (kohya's and diffusers' files name text modules by it)."""
    return name if name.startswith("text_model.") or name == "text_projection" else "text_model." + name


def _kohya(unet_factors: dict, text_factors: dict, unet_name=lambda n: n) -> dict:
    """A kohya file: lora_unet_/lora_te*_ + module path with "_", lora_down/lora_up/alpha."""
    state = {}
    groups = [("lora_unet_", unet_name, unet_factors)] + [(p, _te_name, f) for p, f in text_factors.items()]
    for prefix, rename, factors in groups:
        for name, (down, up) in factors.items():
            key = prefix + rename(name).replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": torch.tensor(ALPHA)})
    return state


def _peft(unet_factors: dict, text_factors: dict) -> tuple[dict, dict]:
    """The same factors as a diffusers/PEFT file: unet./text_encoder*. + module path, lora_A/lora_B, alpha in
    the metadata diffusers writes."""
    state, metadata = {}, {}
    for prefix, factors in [("unet", unet_factors)] + list(text_factors.items()):
        rename = (lambda n: n) if prefix == "unet" else _te_name
        for name, (down, up) in factors.items():
            state[f"{prefix}.{rename(name)}.lora_A.weight"] = down.contiguous()
            state[f"{prefix}.{rename(name)}.lora_B.weight"] = up.contiguous()
        metadata[f"{prefix}.lora_alpha"], metadata[f"{prefix}.r"] = ALPHA, RANK
    import json

    return state, {"format": "pt", "lora_adapter_metadata": json.dumps(metadata)}


def _save(path, state: dict, metadata: dict | None = None) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata or {"format": "pt"})
    return str(path)


def _unet_inputs(sd, seed: int = 0):
    rng = np.random.default_rng(seed)
    config = sd.model.unet.config
    latents = rng.standard_normal((2, 16, 16, config.in_channels)).astype(np.float32)
    context = rng.standard_normal((2, 77, config.cross_attention_dim)).astype(np.float32)
    if config.addition_embed_type != "text_time":
        return latents, np.asarray([999, 37]), context, None, None
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    pooled = rng.standard_normal((2, pooled_dim)).astype(np.float32)
    time_ids = np.asarray([[768, 512, 16, 48, 1024, 896], [300, 1000, 0, 8, 512, 512]], np.float32)
    return latents, np.asarray([999, 37]), context, pooled, time_ids


def _ours_unet(sd, inputs) -> np.ndarray:
    latents, t, context, pooled, time_ids = inputs
    from sdjax.lora import resolve

    return np.asarray(jax.jit(lambda p, x, t, c: unet_call(sd.model, resolve(p))(x, t, c))(
        dict(sd.params), latents, t, Conditioning(context, pooled, time_ids)))


def _torch_unet(unet, inputs) -> np.ndarray:
    latents, t, context, pooled, time_ids = inputs
    kwargs = {} if pooled is None else {"added_cond_kwargs": {"text_embeds": torch.from_numpy(pooled),
                                                              "time_ids": torch.from_numpy(time_ids)}}
    with torch.no_grad():
        out = unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(t),
                   encoder_hidden_states=torch.from_numpy(context), **kwargs)
    return out.sample.permute(0, 2, 3, 1).numpy()


def _ours_text(sd, name: str, ids: np.ndarray):
    from sdjax.lora import resolve

    module = sd.model.networks[name]
    return jax.jit(lambda p, ids: module.apply({"params": resolve(p)[name]}, ids))(dict(sd.params), ids)


def _torch_text(encoder, ids: np.ndarray):
    with torch.no_grad():
        out = encoder(torch.from_numpy(ids).long())
    return out.last_hidden_state.numpy(), getattr(out, "text_embeds", None)


FAMILIES = {  # family -> (text encoder names and their kohya prefixes)
    "sd1": {"text_encoder": "lora_te_"},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}


@pytest.fixture(scope="module")
def family_models(checkpoints, sdxl_checkpoints, tmp_path_factory):
    """family -> (folder, torch components, sdjax model). The SDXL UNet has one layers_per_block for every
    level, as real SDXL has (diffusers' reading of LDM-named LoRA keys assumes it)."""
    import builders
    from diffusers import StableDiffusionXLPipeline

    folder, parts = sdxl_checkpoints["base"]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.unet = builders.sdxl_unet(72, 24, 6, layers_per_block=2)
    xl_folder = str(tmp_path_factory.mktemp("lora") / "sdxl")
    pipe.save_pretrained(xl_folder)
    out = {"sd1": (*checkpoints["sd1"], sdjax.load(checkpoints["sd1"][0])),
           "sdxl": (xl_folder, {**parts, "unet": pipe.unet}, sdjax.load(xl_folder))}
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_files_match_the_merge_formula_and_diffusers(family, family_models, tmp_path):
    """kohya (SD 1.x: diffusers block names; SDXL: the original LDM names kohya's SDXL trainer writes) and
    PEFT files of the same factors give UNet and text-encoder outputs within 1e-4 of the torch models
    merged by the formula, at scales 0.7 and 1.0, merged or applied at run time; diffusers' own loader
    fuses the kohya file's UNet to the same weights; every tensor of each file is used; the LoRA moves
    the outputs by far more than the tolerance; removing it gives the original weights back bitwise."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sdjax.convert.ldm import ldm_keys

    folder, parts, sd = family_models[family]
    unet_factors = _factors(parts["unet"], seed=1)
    text_factors = {name: _factors(parts[name], seed=2 + i) for i, name in enumerate(FAMILIES[family])}
    unet_name = lambda n: n
    if family == "sdxl":  # kohya's SDXL files name UNet modules as the original (LDM) layout does
        mapping = ldm_keys("unet", sd.model.unet.config, [f"{n}.weight" for n in unet_factors])
        unet_name = lambda n: mapping[f"{n}.weight"].removesuffix(".weight")
    kohya_state = _kohya(unet_factors, {FAMILIES[family][n]: f for n, f in text_factors.items()}, unet_name)
    kohya = _save(tmp_path / "style.safetensors", kohya_state)
    peft = _save(tmp_path / "style_peft.safetensors", *_peft(unet_factors, text_factors))

    # diffusers reads the kohya file's UNet part to exactly the formula's weights.
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    pipe.load_lora_weights({k: v.clone() for k, v in kohya_state.items() if k.startswith("lora_unet_")},
                           adapter_name="style")
    pipe.fuse_lora(lora_scale=0.7, components=["unet"])
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if ".lora_" not in k}
    want = _merged(parts["unet"], unet_factors, 0.7).state_dict()
    assert set(fused) == set(want)
    assert max(_rel(fused[k], want[k]) for k in want) <= 1e-6

    inputs = _unet_inputs(sd)
    ids = sd.tokenize(["a red circle on a blue square", "x"])
    base_unet = _torch_unet(parts["unet"], inputs)
    for path in (kohya, peft):
        lora = read_lora(path, sd.model, sd.params)
        from safetensors import safe_open

        with safe_open(path, "np") as f:
            assert lora.keys == len(list(f.keys()))
        for scale in (0.7, 1.0):
            expected = _torch_unet(_merged(parts["unet"], unet_factors, scale), inputs)
            assert _rel(expected, base_unet) > 100 * TOL  # the LoRA is not invisible
            for merge in (True, False):
                with_lora = sd.with_lora(lora, scale, merge=merge)
                assert _rel(_ours_unet(with_lora, inputs), expected) <= TOL, (path, scale, merge)
                for name, factors in text_factors.items():
                    ref_hidden, ref_pooled = _torch_text(_merged(parts[name], factors, scale),
                                                         ids["input_ids" if name == "text_encoder" else "input_ids_2"])
                    hidden, pooled = _ours_text(with_lora, name,
                                                ids["input_ids" if name == "text_encoder" else "input_ids_2"])
                    assert _rel(hidden, ref_hidden) <= TOL, (name, path, scale, merge)
                    if ref_pooled is not None:
                        assert _rel(pooled, ref_pooled.numpy()) <= TOL
        restored = sd.with_lora(lora, 0.7).without_loras()
        for a, b in zip(jax.tree.leaves(dict(restored.params)), jax.tree.leaves(dict(sd.params)), strict=True):
            np.testing.assert_array_equal(a, b)


def test_two_stacked_loras_and_runtime_scales(family_models, tmp_path):
    """Two LoRAs at once, each at its own scale, equal the formula with both; at run time a new scale
    changes the output without compiling the sampler again, and scale 0 gives the model without them."""
    import sdjax.pipeline as pipeline

    folder, parts, sd = family_models["sd1"]
    factors = [_factors(parts["unet"], seed=s) for s in (5, 6)]
    paths = [_save(tmp_path / f"l{i}.safetensors", _kohya(f, {})) for i, f in enumerate(factors)]
    stacked = sd.with_lora(paths[0], 0.7).with_lora(paths[1], 1.0)
    merged = _merged(_merged(parts["unet"], factors[0], 0.7), factors[1], 1.0)
    inputs = _unet_inputs(sd)
    assert _rel(_ours_unet(stacked, inputs), _torch_unet(merged, inputs)) <= TOL
    assert [(lora.name, scale) for lora, scale in stacked.loras] == [("l0", 0.7), ("l1", 1.0)]

    runtime = sd.with_lora(paths[0], 0.7, merge=False).with_lora(paths[1], 1.0, merge=False)
    kwargs = dict(num_steps=2, height=32, width=32, seed=1, scheduler="ddim")
    first = runtime.generate(["a red circle"], **kwargs)
    np.testing.assert_allclose(first, stacked.generate(["a red circle"], **kwargs), atol=2e-5)
    program = next(iter(pipeline._PROGRAMS[sd.model].values()))
    compiled = program._cache_size()
    zero = runtime.with_lora_scales(0.0, 0.0).generate(["a red circle"], **kwargs)
    assert program._cache_size() == compiled  # new scales: the same compiled program
    np.testing.assert_allclose(zero, sd.generate(["a red circle"], **kwargs), atol=2e-5)
    assert np.abs(zero - first).max() > 0.01
    with pytest.raises(ValueError, match="merge=True, but the LoRAs already on this model are applied at run time"):
        runtime.with_lora(paths[0], 1.0)


def test_bad_lora_files_are_one_line_errors(family_models, tmp_path):
    """A LoRA of another family, factors that do not fit, LyCORIS files, keys that are not LoRA keys and a
    scale that is not a number: one line naming the file and the key (or the scale), nothing applied."""
    _, parts, sd1 = family_models["sd1"]
    _, xl_parts, sdxl = family_models["sdxl"]
    from sdjax.convert.ldm import ldm_keys

    factors = _factors(xl_parts["unet"], seed=1)
    mapping = ldm_keys("unet", sdxl.model.unet.config, [f"{n}.weight" for n in factors])
    xl = _save(tmp_path / "xl.safetensors", _kohya(factors, {"lora_te2_": _factors(xl_parts["text_encoder_2"], 2)},
                                                  lambda n: mapping[f"{n}.weight"].removesuffix(".weight")))
    good = _kohya(_factors(parts["unet"], seed=1), {})
    down_key = next(k for k in good if k.endswith("attn1_to_q.lora_down.weight"))
    cases = [
        (xl, "LoRA modules match nothing in this model"),
        (_save(tmp_path / "shape.safetensors", {**good, down_key: torch.zeros(RANK, 7)}),
         f"LoRA module '{down_key.split('.')[0].removeprefix('lora_unet_')}' (down (4, 7), up "),
        (_save(tmp_path / "loha.safetensors", {"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}),
         "a LyCORIS LoHa file"),
        (_save(tmp_path / "dora.safetensors", {**good, "lora_unet_conv_in.dora_scale": torch.zeros(2)}),
         "a DoRA file"),
        (_save(tmp_path / "other.safetensors", {"model.weight": torch.zeros(2)}),
         "key 'model.weight' is not a LoRA key"),
        (_save(tmp_path / "half.safetensors", {k: v for k, v in good.items() if "lora_up" not in k}),
         "has no up factor"),
    ]
    for path, message in cases:
        with pytest.raises(sdjax.CheckpointError) as error:
            sd1.with_lora(path)
        assert message in str(error.value) and str(error.value).startswith(path), str(error.value)
        assert "\n" not in str(error.value)
    with pytest.raises(sdjax.CheckpointError, match=r"\(the model has no text_encoder_2\)|match nothing"):
        sd1.with_lora(xl)
    with pytest.raises(ValueError, match="LoRA ok: scale must be a finite number, got 'x'"):
        sd1.with_lora(_save(tmp_path / "ok.safetensors", good), "x")
