"""sample.py end to end on a tiny saved checkpoint: PNGs, their `parameters` chunk, reruns, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdjax.png_info import format_parameters, parse_parameters, read_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                          timeout=600)


def test_parameters_round_trip():
    settings = {"Steps": 3, "Sampler": "DDIM", "CFG scale": 7.5, "Seed": 42, "Size": "32x32", "Model": "m"}
    text = format_parameters("a red circle, detailed", "blurry, dark", settings)
    prompt, negative, parsed = parse_parameters(text)
    assert (prompt, negative) == ("a red circle, detailed", "blurry, dark")
    assert parsed == {k: str(v) for k, v in settings.items()}


def test_sample_writes_pngs_and_never_overwrites(checkpoints, tmp_path):
    folder, _ = checkpoints["sd1"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle", "seed": 100, "num_images": 2}) + "\n" +
                       json.dumps({"prompt": "ciron", "negative_prompt": "blue", "guidance": 1.0}) + "\n")
    out = tmp_path / "out"
    args = ["--model", folder, "--prompts-file", str(prompts), "--steps", "2", "--size", "32", "--scheduler", "ddim",
            "--batch-size", "2", "--seed", "7", "--out", str(out)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout
    names = sorted(os.listdir(out))
    assert names == ["00000-100.png", "00001-101.png", "00002-9.png"]
    prompt, negative, settings = parse_parameters(read_parameters(str(out / "00002-9.png")))
    assert (prompt, negative) == ("ciron", "blue")
    assert settings == {"Steps": "2", "Sampler": "DDIM", "CFG scale": "1.0", "Seed": "9", "Size": "32x32",
                        "Model": "sd1"}
    with Image.open(out / "00000-100.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        first = np.asarray(im)
    assert run_cli(*args).returncode == 0
    assert len(os.listdir(out)) == 6  # the rerun added, nothing replaced
    with Image.open(out / "00003-100.png") as im:
        np.testing.assert_array_equal(np.asarray(im), first)  # same seed, same image


@pytest.mark.parametrize("extra,message", [
    (["--size", "30"], "multiples of 8"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--scheduler", "nope"], "--scheduler 'nope' is unknown; known: ddim"),
    (["--prompt", "x", "--prompt", "y", "--num-images", "0"], "--num-images must be >= 1"),
])
def test_bad_flags_fail_cleanly(checkpoints, tmp_path, extra, message):
    folder, _ = checkpoints["sd1"]
    args = ["--model", folder, "--out", str(tmp_path / "out")]
    if "--prompt" not in extra:
        args += ["--prompt", "a red circle"]
    result = run_cli(*args, *extra)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_no_prompts_and_unwritable_out(checkpoints, tmp_path):
    folder, _ = checkpoints["sd1"]
    result = run_cli("--model", folder, "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no prompts" in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("--model", folder, "--prompt", "a", "--out", str(blocker / "sub"))
    assert result.returncode == 2 and "cannot be created" in result.stderr


def test_img2img_and_inpainting_flags(checkpoints, tmp_path):
    folder, _ = checkpoints["sd1"]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 8:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(mask[:, :40]).save(tmp_path / "small_mask.png")
    common = ["--model", folder, "--prompt", "a red circle", "--steps", "4", "--scheduler", "ddim"]

    result = run_cli(*common, "--init-image", str(tmp_path / "init.png"), "--strength", "0.5",
                     "--out", str(tmp_path / "i2i"))
    assert result.returncode == 0, result.stderr
    (name,) = os.listdir(tmp_path / "i2i")
    with Image.open(tmp_path / "i2i" / name) as im:
        assert im.size == (48, 32)  # the init image's size
    _, _, settings = parse_parameters(read_parameters(str(tmp_path / "i2i" / name)))
    assert settings["Denoising strength"] == "0.5" and settings["Size"] == "48x32"

    result = run_cli(*common, "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                     "--out", str(tmp_path / "inpaint"))
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(tmp_path / "inpaint")) == 1

    for extra, message in [(["--mask", str(tmp_path / "mask.png")], "without an init image"),
                           (["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "small_mask.png")],
                            "small_mask.png: image is 32x40 (HxW); the job's size is 32x48"),
                           (["--init-image", str(tmp_path / "init.png"), "--size", "32"], "the job's size is 32x32"),
                           (["--init-image", str(tmp_path / "init.png"), "--strength", "1.5"], "strength must be in"),
                           (["--init-image", str(tmp_path / "missing.png")], "missing.png: cannot read image")]:
        out = tmp_path / "bad"
        result = run_cli(*common, *extra, "--out", str(out))
        assert result.returncode == 2, extra
        assert message in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0
        assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_images_get_the_mode_of_any_new_file(tmp_path, umask):
    from sdjax.png_info import save_png

    previous = os.umask(umask)
    try:
        save_png(str(tmp_path / "a.png"), np.zeros((8, 8, 3)), "p")
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "a.png").st_mode & 0o777 == 0o666 & ~umask


def test_sdxl_base_with_refiner(sdxl_checkpoints, checkpoints, tmp_path):
    """An SDXL base hands over to its refiner at --refiner-switch; the PNG is the API's image and its
    parameters name the refiner as A1111 does. A refiner on a non-SDXL model is refused."""
    import sdjax
    from sdjax.png_info import read_parameters

    base, refiner = sdxl_checkpoints["base"][0], sdxl_checkpoints["refiner"][0]
    out = tmp_path / "out"
    result = run_cli("--model", base, "--refiner", refiner, "--refiner-switch", "0.7", "--prompt", "a red circle",
                     "--steps", "5", "--size", "32", "--seed", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    (name,) = os.listdir(out)
    _, negative, settings = parse_parameters(read_parameters(str(out / name)))
    assert negative == "" and settings["Refiner"] == "refiner" and settings["Refiner switch at"] == "0.7"
    kwargs = dict(num_steps=5, guidance_scale=7.5, height=32, width=32, seed=[3])
    latents = sdjax.load(base).generate(["a red circle"], denoising_end=0.7, output="latents", **kwargs)
    expected = sdjax.load(refiner).generate(["a red circle"], init_latents=latents, denoising_start=0.7, **kwargs)
    with Image.open(out / name) as im:
        assert np.abs(np.asarray(im).astype(np.float32) / 255 - expected[0]).max() <= 1.5 / 255
    # DPM++ 2M Karras, as A1111 names it in the PNG, is the API's dpmpp_2m with Karras sigmas.
    karras = tmp_path / "karras"
    result = run_cli("--model", base, "--prompt", "a red circle", "--steps", "4", "--size", "32", "--seed", "3",
                     "--scheduler", "dpmpp_2m", "--schedule", "karras", "--guidance", "5", "--out", str(karras))
    assert result.returncode == 0, result.stderr
    (name,) = os.listdir(karras)
    _, _, settings = parse_parameters(read_parameters(str(karras / name)))
    assert (settings["Sampler"], settings["Schedule type"]) == ("DPM++ 2M", "Karras")
    common = dict(num_steps=4, guidance_scale=5.0, height=32, width=32, seed=[3], scheduler="dpmpp_2m")
    sd = sdjax.load(base)
    expected = sd.generate(["a red circle"], scheduler_options={"use_karras_sigmas": True}, **common)[0]
    plain = sd.generate(["a red circle"], **common)[0]
    assert np.abs(expected - plain).max() > 10 / 255  # the schedule matters on this model
    with Image.open(karras / name) as im:
        assert np.abs(np.asarray(im).astype(np.float32) / 255 - expected).max() <= 1.5 / 255
    result = run_cli("--model", checkpoints["sd1"][0], "--refiner", refiner, "--prompt", "x", "--out",
                     str(tmp_path / "none"))
    assert result.returncode == 2 and "--model: not an SDXL model" in result.stderr
    assert not (tmp_path / "none").exists()


def test_single_file_model(checkpoints, tmp_path):
    """--model FILE.safetensors with --model-config FOLDER draws the same pixels as the folder it was exported
    from, and names the file (without extension) as the model; single-file flags on a folder, and a file
    that the family's shipped configs do not fit, are one-line errors before anything is written."""
    import sdjax

    folder, _ = checkpoints["sd1"]
    path = str(tmp_path / "tiny-sd1.safetensors")
    sdjax.load(folder).save(path, layout="single_file")
    common = ["--prompt", "a red circle", "--steps", "2", "--size", "32", "--seed", "3"]
    assert run_cli("--model", folder, *common, "--out", str(tmp_path / "a")).returncode == 0
    result = run_cli("--model", path, "--model-config", folder, *common, "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    a, b = (np.asarray(Image.open(tmp_path / d / "00000-3.png")) for d in "ab")
    np.testing.assert_array_equal(a, b)
    _, _, parameters = parse_parameters(read_parameters(str(tmp_path / "b" / "00000-3.png")))
    assert parameters["Model"] == "tiny-sd1"
    for args, message in ((["--model", folder, "--ema"], "--model-config and --ema are for a single-file --model"),
                          (["--model", path], "has shape (32,), which does not hold the (320,) of unet's "
                           "'conv_in.bias' (read as the sd1 model sdjax ships; for another architecture give its diffusers folder "
                           "as config=, in sample.py --model-config)")):
        result = run_cli(*args, *common, "--out", str(tmp_path / "c"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "c").exists()


def test_loras_flags_prompts_file_and_png_parameters(checkpoints, tmp_path):
    """--lora FILE[:SCALE] (repeated) merges LoRAs into the model; a prompts-file line's "lora" replaces them
    for that line; the PNG records them as A1111 does: <lora:name:scale> after the prompt and Lora hashes
    (the first 12 hex digits of the SHA-256 of the file's data after its safetensors header). A scale that
    is not a number, or a missing file, is a one-line error naming the flag's value, before any image."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    import sdjax

    folder, parts = checkpoints["sd1"]
    g = torch.Generator().manual_seed(0)
    files = []
    for name in ("style", "detail"):
        state = {}
        for module, m in parts["unet"].named_modules():
            if isinstance(m, torch.nn.Linear) and module.endswith(("to_q", "to_v")):
                key = "lora_unet_" + module.replace(".", "_")
                state[key + ".lora_down.weight"] = torch.randn(2, m.in_features, generator=g)
                state[key + ".lora_up.weight"] = torch.randn(m.out_features, 2, generator=g)
        files.append(str(tmp_path / f"{name}.safetensors"))
        save_file(state, files[-1])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle"}) + "\n" +
                       json.dumps({"prompt": "a red circle", "lora": f"{files[1]}:0.5"}) + "\n")
    common = ["--model", folder, "--steps", "2", "--size", "32", "--seed", "3", "--scheduler", "ddim"]
    assert run_cli(*common, "--prompt", "a red circle", "--out", str(tmp_path / "plain")).returncode == 0
    result = run_cli(*common, "--prompts-file", str(prompts), "--lora", f"{files[0]}:0.7", "--lora", files[1],
                     "--out", str(tmp_path / "lora"))
    assert result.returncode == 0, result.stderr

    def addnet(path):
        raw = open(path, "rb").read()
        return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()[:12]

    first, second = (read_parameters(str(tmp_path / "lora" / name)) for name in ("00000-3.png", "00001-4.png"))
    prompt, _, settings = parse_parameters(first)
    assert prompt == "a red circle <lora:style:0.7> <lora:detail:1>"
    assert settings["Lora hashes"] == f"style: {addnet(files[0])}, detail: {addnet(files[1])}"
    prompt, _, settings = parse_parameters(second)
    assert prompt == "a red circle <lora:detail:0.5>" and settings["Lora hashes"] == f"detail: {addnet(files[1])}"
    plain = np.asarray(Image.open(tmp_path / "plain" / "00000-3.png"), np.float32)
    with_lora = np.asarray(Image.open(tmp_path / "lora" / "00000-3.png"), np.float32)
    assert np.abs(plain - with_lora).max() > 10  # the LoRAs change the image
    expected = sdjax.load(folder).with_lora(files[0], 0.7).with_lora(files[1]).generate(
        ["a red circle"], num_steps=2, height=32, width=32, seed=3, scheduler="ddim")
    np.testing.assert_allclose(with_lora, np.clip(expected[0], 0, 1) * 255, atol=1.01)
    for value, message in ((f"{files[0]}:abc", f"--lora '{files[0]}:abc': scale 'abc' is not a number"),
                           (str(tmp_path / "none.safetensors"), "none.safetensors: LoRA file not found")):
        result = run_cli(*common, "--prompt", "x", "--lora", value, "--out", str(tmp_path / "bad"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "bad").exists()
