"""plan.py: per-device memory and FLOPs of the train step and the sampling program, compiled ahead of
time with abstract parameters on 8 forced host devices (the tiny model; full-size SD 1.5 is slow)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (f"--config={ROOT}/configs/tiny.py", "--config.batch_size=8")


def _plan(*args, devices=8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, os.path.join(ROOT, "plan.py"), *args], capture_output=True, text=True,
                          env=env, timeout=1800)


def _report(path, *args, devices=8):
    result = _plan(*args, f"--json={path}", devices=devices)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(path) as f:
        return result.stdout, json.load(f)


def test_tiny_plan_reports_memory_and_flops(tmp_path):
    table, report = _report(tmp_path / "plan.json", *TINY, "--mesh=data=2,fsdp=4")
    assert report["mesh_shape"] == {"data": 2, "fsdp": 4, "tensor": 1} and report["devices"] == 8
    assert "XLA CPU" in table and "fits" in table
    for name in ("train", "sample"):
        program = report[name]
        m = program["memory"]
        assert m["argument_bytes"] > 0 and m["output_bytes"] > 0 and m["temp_bytes"] > 0
        assert m["total_bytes"] == m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"]
        assert 0 < program["flops_per_step"] <= program["flops_per_call"]
        assert program["flops_per_device_per_call"] == pytest.approx(program["flops_per_call"] / 8)
        assert program["verdict"]["fits"] and program["verdict"]["device_memory_bytes"] == 16 * 2 ** 30
    train = report["train"]
    state = sum(group["per_device_bytes"] for group in train["state"].values())
    # The state is donated: its buffers are reused for the new state instead of being held twice.
    assert train["memory"]["alias_bytes"] >= state
    assert train["memory"]["argument_bytes"] > state  # plus this device's rows of the batch
    # 4 DDIM steps: the scan's body, which XLA's cost analysis counts once, is added for every step.
    sample = report["sample"]
    assert sample["steps"] == 4 and sample["flops_per_call"] > 4 * sample["flops_per_step"]


def test_fsdp_shards_the_state_that_data_parallelism_replicates(tmp_path):
    _, data = _report(tmp_path / "data.json", *TINY, "--mesh=data=8", "--nosample")
    _, fsdp = _report(tmp_path / "fsdp.json", *TINY, "--mesh=fsdp=8", "--nosample")
    replicated, sharded = data["train"]["state"], fsdp["train"]["state"]
    for group in ("params", "opt_state", "ema"):
        assert replicated[group]["per_device_bytes"] == replicated[group]["global_bytes"]
        assert sharded[group]["global_bytes"] == replicated[group]["global_bytes"]
        assert sharded[group]["per_device_bytes"] < replicated[group]["per_device_bytes"] / 2
    assert fsdp["train"]["memory"]["argument_bytes"] < data["train"]["memory"]["argument_bytes"]


def test_plans_a_pretrained_folder_from_its_configs(tmp_path, checkpoints):
    folder, _ = checkpoints["sd1"]
    table, report = _report(tmp_path / "plan.json", f"--config={ROOT}/configs/sd15_finetune.py:tiny",
                            f"--config.model.pretrained={folder}", "--mesh=data=8", "--notrain")
    assert report["model"].startswith(folder) and "train" not in report
    assert report["sample"]["resolution"] == 32 and report["sample"]["flops_per_call"] > 0


def test_plans_sdxl_fine_tuning_with_both_text_encoders(tmp_path, sdxl_checkpoints):
    """An SDXL folder plans as it trains: both text encoders trained, the batch's size and crop
    conditioning in the step; and its sampler (guided, pooled embedding, time ids) compiles."""
    folder, _ = sdxl_checkpoints["base"]
    table, report = _report(tmp_path / "plan.json", f"--config={ROOT}/configs/sdxl_finetune.py:tiny",
                            f"--config.model.pretrained={folder}", "--config.batch_size=8",
                            "--config.model.train_text_encoder=True", "--mesh=fsdp=8", "--guidance=5")
    train, sample = report["train"], report["sample"]
    assert train["trained"] == ["text_encoder", "text_encoder_2", "unet"]
    assert 0 < train["model_flops_per_step"] and train["memory"]["temp_bytes"] > 0
    assert sample["guidance"] and sample["resolution"] == 32 and sample["flops_per_call"] > sample["flops_per_step"]


def test_lora_plan_holds_only_the_factors_in_the_optimizer(tmp_path, checkpoints):
    """A config.lora run plans as it trains: the factors are the trained parameters (and the optimizer's
    state), every network is frozen, and the state is far smaller than full fine-tuning's."""
    folder, _ = checkpoints["sd1"]
    args = (f"--config={ROOT}/configs/lora_sd15.py:tiny", f"--config.model.pretrained={folder}", "--mesh=data=2",
            "--nosample", "--config.lora.text_encoder=True")
    _, lora = _report(tmp_path / "lora.json", *args, devices=2)
    _, full = _report(tmp_path / "full.json", *args, "--config.lora.rank=0", devices=2)
    assert lora["train"]["trained"] == ["lora"] and full["train"]["trained"] == ["unet"]
    lora_state, full_state = lora["train"]["state"], full["train"]["state"]
    assert lora_state["opt_state"]["global_bytes"] < full_state["opt_state"]["global_bytes"] / 4
    assert lora_state["frozen"]["global_bytes"] > full_state["frozen"]["global_bytes"]  # the UNet joins them


@pytest.mark.parametrize("mesh,message", [
    ("data=2,fsdp=2", "multiply to 4, but there are 8 devices"),
    ("data=2,model=4", "unknown mesh axis 'model' (known: data, fsdp, tensor)"),
    ("data8", "expected AXIS=SIZE"),
])
@pytest.mark.compat
def test_bad_mesh_is_one_line_error(mesh, message):
    result = _plan(*TINY, f"--mesh={mesh}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("plan.py: error: ") and message in lines[-1], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sd15_finetune_plan_at_full_size(tmp_path):
    """The full SD 1.5 fine-tuning step (batch 32 at 512px, bf16, remat) under FSDP over 8 devices,
    from the preset architecture: nothing full-size is allocated, so it runs on a CPU host."""
    table, report = _report(tmp_path / "plan.json", f"--config={ROOT}/configs/sd15_finetune.py",
                            "--mesh=data=1,fsdp=8", "--nosample")
    assert report["model"].startswith("sd15 preset")
    train = report["train"]
    assert (train["batch_size"], train["resolution"], train["dtype"], train["remat"]) == (32, 512, "bfloat16", True)
    unet, vae, text_encoder = 859_520_964, 83_653_863, 123_060_480  # float32 parameters
    state = train["state"]
    assert state["params"]["global_bytes"] == 4 * unet
    assert state["frozen"]["global_bytes"] == 4 * (vae + text_encoder)
    assert state["opt_state"]["global_bytes"] >= 2 * 4 * unet  # Adam's mu and nu
    # FSDP splits nearly every byte 8 ways (a few small or indivisible arrays stay replicated).
    assert state["params"]["per_device_bytes"] < 1.02 * 4 * unet / 8
    m = train["memory"]
    assert m["alias_bytes"] >= sum(group["per_device_bytes"] for group in state.values())
    assert m["temp_bytes"] > 0 and m["total_bytes"] > m["argument_bytes"]
    # The UNet's forward is ~0.8 TFLOP per 512px image; forward + backward (+ remat) is over 3x that.
    assert train["flops_per_step"] > 32 * 3 * 0.7e12
    verdict = train["verdict"]
    assert verdict["fits"] == (m["total_bytes"] <= 16 * 2 ** 30)
    assert verdict["margin_bytes"] == 16 * 2 ** 30 - m["total_bytes"]
    assert ("fits (" if verdict["fits"] else "does not fit (") in table
