"""LoRA training (config.lora, configs/lora_sd15.py): only the factors are trained and held by the optimizer,
the loss falls, and the kohya-format export is what diffusers' load_lora_weights reads."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

from cli_checks import train_tiny  # noqa: E402


def _train(workdir, folder: str, data_dir: str, *flags: str):
    return train_tiny("lora_sd15.py", workdir, folder, data_dir, *flags)


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_lora_sd15_tiny_trains_only_the_factors_and_exports_what_diffusers_reads(checkpoints, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    import sdjax
    from sdjax.conditioning import Conditioning, unet_call
    from sdjax.lora import resolve

    folder, parts = checkpoints["sd1"]
    workdir = tmp_path / "run"
    result = _train(workdir, folder, str(tmp_path / "data"), "--config.total_steps=30",
                    "--config.optimizer.learning_rate=1e-2", "--config.log.every_steps=1",
                    "--config.checkpoint.every_steps=30", "--config.lora.text_encoder=True")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "logs" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]
    assert len(losses) == 30 and np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
    # The checkpointed state: parameters, their EMA and Adam's moments are the LoRA factors alone.
    with open(workdir / "checkpoints" / "30" / "state" / "_METADATA") as f:
        paths = [eval(key) for key in json.load(f)["tree_metadata"]]  # noqa: S307 (tuples of names, our own file)
    held = [p for p in paths if p[0] in ("params", "ema") or p[:2] in (("opt_state", "mu"), ("opt_state", "nu"))]
    assert held and all("lora" in p[:3] for p in held)

    path = str(workdir / "export" / "lora.safetensors")
    state = load_file(path)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in state)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in state)
    ups = [v for k, v in state.items() if k.endswith("lora_up.weight")]
    assert all(float(v.abs().max()) > 0 for v in ups)  # every factor was trained away from zero

    sd = sdjax.load(folder)
    with_lora = sd.with_lora(path)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights({k: v for k, v in state.items() if k.startswith("lora_unet_")}, adapter_name="trained")
    pipe.fuse_lora(lora_scale=1.0, components=["unet"])
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, sd.model.unet.config.cross_attention_dim)).astype(np.float32)
    t = np.asarray([999, 37])
    ours = jax.jit(lambda p, x, t, c: unet_call(sd.model, resolve(p))(x, t, c))(
        dict(with_lora.params), latents, t, Conditioning(context, None, None))
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(t),
                        encoder_hidden_states=torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
        base = parts["unet"](torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(t),
                             encoder_hidden_states=torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
    assert _rel(ours, ref) <= 1e-4 and _rel(ref, base) > 1e-2
    # The text encoder's LoRA against the merge formula on the torch encoder (module names as kohya writes them).
    encoder = pipe.text_encoder
    modules = {"lora_te_" + ("" if n.startswith("text_model.") else "text_model_") + n.replace(".", "_"): m
               for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        for key in {k.split(".")[0] for k in state if k.startswith("lora_te_")}:
            down, up, alpha = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"], state[f"{key}.alpha"]
            modules[key].weight += alpha / down.shape[0] * up @ down
        ids = sd.tokenize(["a red circle", "a blue square"])["input_ids"]
        ref_hidden = encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    module = sd.model.networks["text_encoder"]
    hidden, _ = jax.jit(lambda p, ids: module.apply({"params": resolve(p)["text_encoder"]}, ids))(
        dict(with_lora.params), ids)
    assert _rel(hidden, ref_hidden) <= 1e-4


def test_lora_configs_are_checked_before_any_compute(checkpoints, tmp_path):
    folder, _ = checkpoints["sd1"]
    for flags, message in ((["--config.model.train_text_encoder=True"], "a LoRA run trains LoRAs only"),
                           (["--config.lora.unet_targets=nothing_matches"], "matches no layer of unet"),
                           (["--config.lora.unet_targets=("], "lora.unet_targets: not a regular expression"),
                           (["--config.lora.rank=-1"], "lora.rank and lora.alpha must be >= 0")):
        result = _train(tmp_path / "run", folder, str(tmp_path / "data"), *flags)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
        assert not (tmp_path / "run" / "checkpoints").exists()
