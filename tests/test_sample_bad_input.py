"""sample.py never exits 0 over a broken result, checks the whole job before the first image, and
gives every seed in [0, 2**64) its own stream (issue 17). The CLI runs in-process; `jax.jit` is
patched to fail, so an error that arrives as a one-line exit 2 arrived before any compile."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import sample
import sdjax
from cli_checks import assert_one_line_exit_2
from sdjax import batch_sampling
from sdjax.convert.safetensors_io import read_safetensors, write_safetensors
from sdjax.pipeline import SamplingError, image_keys, initial_noise
from sdjax.png_info import parse_parameters, read_parameters
from sdjax.seeds import seed_key

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)


@pytest.fixture
def no_compile(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("jax.jit was called before the input was refused")

    monkeypatch.setattr(jax, "jit", refuse)


def _lines(path, *lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return str(path)


def _image(path, height, width):
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(path)
    return str(path)


BIG = str(2**70)


@pytest.mark.parametrize("extra,message", [
    (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["--seed", BIG], f"--seed must be an integer in [0, 2**64), or -1 for a random seed; got {BIG}"),
    (["--seed", "-2"], "--seed must be an integer in [0, 2**64)"),
    (["--seed", str(2**64 - 1), "--num-images", "2"], f"--seed {2**64 - 1} + 1 more images: seeds must stay below"),
    (["--seed", "1.7"], "argument --seed: invalid int value: '1.7'"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--strength", "0.5"], "--strength given without --init-image"),
    (["--strength", "nan", "--init-image", "IMG"], "--strength must be in (0, 1], got nan"),
    (["--init-image", "IMG", "--strength", "0.1", "--steps", "5"], "--prompt: 5 steps at strength 0.1 leave no "
                                                                   "denoising step"),
    (["--init-image", "IMG", "--steps", "1"], "--prompt: 1 steps at strength 0.8 leave no denoising step"),
    (["--init-image", "IMG", "--size", "16"], "--init-image IMG: image is 32x32 (HxW); the job's size is 16x16"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--schedule", "fast"], "--schedule 'fast' is unknown; known: default, karras"),
    (["--schedule", "karras", "--scheduler", "ddim"], "--schedule karras: scheduler 'ddim' has no Karras schedule; "
                                                      "use one of lms, euler, heun, dpmpp_2m, unipc"),
])
def test_bad_flags(checkpoints, tmp_path, capsys, no_compile, extra, message):
    image = _image(tmp_path / "init.png", 32, 32)
    extra = [image if a == "IMG" else a for a in extra]
    out = tmp_path / "out"
    assert_one_line_exit_2(sample.main, ["--model", checkpoints["sd1"][0], "--prompt", "a", *extra, "--out", str(out)],
                           message.replace("IMG", image), capsys)
    assert not out.exists()


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "a"}', '{"prompt": "b", "scheduler": "nope"}'], "P:2: scheduler 'nope' is unknown; known: ddim"),
    (['{"prompt": "a", "steps": "ten"}'], 'P:1: steps must be an integer, got "ten"'),
    (['{"prompt": "a", "seed": 1.7}'], "P:1: seed must be an integer, got 1.7"),
    (['{"prompt": "a", "seed": true}'], "P:1: seed must be an integer, got true"),
    ([f'{{"prompt": "a", "seed": {BIG}}}'], "P:1: seed must be an integer in [0, 2**64)"),
    (['{"prompt": "a", "guidance": "7"}'], 'P:1: guidance must be a number, got "7"'),
    (['{"prompt": "a", "size": 30}'], "P:1: size 30: height and width must be positive multiples of 8"),
    (['{"prompt": "a", "num_images": 0}'], "P:1: num_images must be >= 1, got 0"),
    (['{"prompt": "a", "strength": 0.5}'], "P:1: strength given without an init image"),
    (['{"prompt": "a"}', '{"prompt": "b", "init_image": "missing.png"}'], "P:2: init_image missing.png: cannot read"),
    (['{"prompt": "a", "init_image": "IMG", "size": 16}'], "P:1: init_image IMG: image is 32x32 (HxW); the job's "
                                                           "size is 16x16"),
    (['{"prompt": "a", "lr": 1}'], "P:1: unknown key(s) ['lr']"),
    ([b"a prompt", b"\xff\xfe"], "P:2: not UTF-8 text (byte 0xff at column 1)"),
])
def test_bad_prompts_file_lines(checkpoints, tmp_path, capsys, no_compile, lines, message):
    """Every line is checked up front: a bad line 2 fails before line 1's image is made."""
    image = _image(tmp_path / "init.png", 32, 32)
    lines = [line.replace("IMG", image) if isinstance(line, str) else line for line in lines]
    name = "p.txt" if isinstance(lines[0], bytes) else "p.jsonl"
    path = _lines(tmp_path / name, *lines)
    out = tmp_path / "out"
    assert_one_line_exit_2(sample.main, ["--model", checkpoints["sd1"][0], "--prompts-file", path,
                                         "--out", str(out)], message.replace("P", path).replace("IMG", image), capsys)
    assert not out.exists()


def test_inpainting_model_without_mask_is_refused_up_front(inpaint_checkpoint, tmp_path, capsys, no_compile):
    out = tmp_path / "out"
    assert_one_line_exit_2(sample.main, ["--model", inpaint_checkpoint, "--prompt", "a", "--out", str(out)],
                           "--prompt: this model's UNet is an inpainting UNet (9 input channels)", capsys)
    assert not out.exists()


def test_seed_keys_extend_jax_keys_to_64_bits():
    for seed in (0, 1, 7, 2**31, 2**32 - 1):  # today's images: the same key as jax.random.key
        np.testing.assert_array_equal(jax.random.key_data(seed_key(seed)), jax.random.key_data(jax.random.key(seed)))
    seeds = [0, 2**32, 2**32 + 1, 1, 2**63, 2**64 - 1]
    data = [tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in image_keys(seeds)]
    assert data[1] == (1, 0) and data[-1] == (2**32 - 1, 2**32 - 1) and len(set(data)) == len(seeds)
    noise = initial_noise(seeds, (4, 4, 4))
    assert len({n.tobytes() for n in noise}) == len(seeds)  # distinct streams, 2**32 no longer seed 0's
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            seed_key(bad)


def test_random_seed_is_drawn_and_recorded(checkpoints, tmp_path, capsys):
    """--seed -1 draws a seed; the PNG (name and parameters) records the one that reproduces the image,
    and without --scheduler the sampler is named as A1111 names it."""
    folder = checkpoints["sd1"][0]
    common = ["--model", folder, "--prompt", "a red circle", "--steps", "2", "--size", "32"]
    assert sample.main([*common, "--seed", "-1", "--out", str(tmp_path / "a")]) == 0
    (name,) = os.listdir(tmp_path / "a")
    _, _, settings = parse_parameters(read_parameters(str(tmp_path / "a" / name)))
    seed = int(settings["Seed"])
    assert name == f"00000-{seed}.png" and 0 <= seed < 2**32
    assert settings["Sampler"] == "PLMS"  # the tiny checkpoint's PNDMScheduler, as the web UI writes it
    assert sample.main([*common, "--seed", str(seed), "--out", str(tmp_path / "b")]) == 0
    with Image.open(tmp_path / "a" / name) as a, Image.open(tmp_path / "b" / name) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_random_seeds_per_entry_and_counting(tmp_path):
    path = _lines(tmp_path / "p.jsonl", '{"prompt": "a", "seed": -1, "num_images": 2}', '{"prompt": "b"}',
                  '{"prompt": "c", "seed": 5}')
    draws = iter([1000, 2000, 3000])
    jobs = batch_sampling.expand_jobs(batch_sampling.read_prompt_file(path), {"seed": -1}, native_size=(32, 32),
                                      default_scheduler=lambda: "ddim", draw_seed=lambda: next(draws))
    # the flag's -1 is drawn once (1000) and counts up over the images without their own seed
    assert [j.seed for j in jobs] == [2000, 2001, 1002, 5]


def test_non_finite_images_are_refused_not_written(checkpoints, tmp_path, capsys):
    """A model whose output is NaN: exit 1, one line naming the seeds, no PNG (the folder stays empty)."""
    folder = str(tmp_path / "model")
    shutil.copytree(checkpoints["sd1"][0], folder)
    path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    tensors["decoder.conv_out.bias"][0] = np.nan
    write_safetensors(path, tensors)
    out = tmp_path / "out"
    code = sample.main(["--model", folder, "--prompt", "a", "--steps", "2", "--size", "32", "--seed", "3",
                        "--out", str(out)])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert code == 1 and last.startswith("sample.py: error: sampling produced non-finite values (NaN/inf) in 1 of "
                                          "1 images (seeds 3)"), last
    assert os.listdir(out) == []


def test_generate_refuses_non_finite_settings_and_results(checkpoints):
    sd = sdjax.load(checkpoints["sd1"][0])
    for kwargs, message in [(dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
                            (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
                            (dict(guidance_rescale=2.0), "guidance_rescale must be in [0, 1], got 2.0"),
                            (dict(seed=2**64), "seed 18446744073709551616 is out of range"),
                            (dict(seed=-1), "seed -1 is out of range")]:
        with pytest.raises(ValueError) as e:
            sd.generate(["a"], num_steps=2, height=32, width=32, **kwargs)
        assert message in str(e.value), str(e.value)
    latents = np.zeros((2, 16, 16, 4), np.float32)
    latents[1, 0, 0, 0] = np.inf
    with pytest.raises(SamplingError, match=r"in 1 of 2 images \(seeds 8\)"):
        sd.generate(["a", "b"], num_steps=2, height=32, width=32, seed=7, latents=latents)


def test_prompts_file_entries_share_the_flags_schema(tmp_path):
    """Each per-image setting is one Field: a flag and a prompts-file key, checked by the same rule."""
    import argparse

    parser = argparse.ArgumentParser()
    batch_sampling.add_field_flags(parser)
    for key, field in batch_sampling.FIELDS.items():
        assert parser.parse_args([]).__dict__[key] is None
        line = json.dumps({"prompt": "a", key: [1]})
        with pytest.raises(ValueError, match=rf"p.jsonl:1: {key} must be"):
            batch_sampling.read_prompt_file(_lines(tmp_path / "p.jsonl", line))
