"""The shapes prompt-adherence judge: right on real and degraded dataset images, wrong exactly where an
image differs from its prompt, and its command's flag checks; evaluate_model on a tiny random model."""

import os
import subprocess
import sys
from collections import Counter

import jax
import numpy as np
import pytest
from scipy import ndimage

import sdjax
from sdjax import adherence
from sdjax.adherence import (ATTRIBUTES, NONE, all_prompts, analyse, dataset_accuracy, evaluate_model,
                             evaluation_prompts, judge, parse_prompt, score)
from cli_checks import assert_one_line_exit_2
from sdjax.data.shapes import BACKGROUNDS, COLORS, RGB, SHAPES, SIZES, caption, make_example

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("resolution", [64, 32])
@pytest.mark.parametrize("seed", [0, 7])
def test_real_images_are_judged_right(resolution, seed):
    result = dataset_accuracy(1000, resolution, seed)
    assert result["count"] == 1000
    assert min(result[k] for k in (*ATTRIBUTES, "all")) >= 0.99, result


def degrade(image: np.ndarray, rng: np.random.Generator, *, blur: float, noise: float, shift: float,
            contrast: float = 1.0, shading: float = 0.0, specks: int = 0) -> np.ndarray:
    """What a small generator's output may look like: soft edges, grain, a colour cast, washed-out
    contrast, a shading ramp across the background, a few stray specks. Levels in 0..255 units."""
    side = image.shape[0]
    x = ndimage.gaussian_filter(image.astype(np.float32) / 255, (blur, blur, 0))
    x = 0.5 + (x - 0.5) * contrast + rng.uniform(-shift, shift, 3) / 255
    yy, xx = np.mgrid[0:side, 0:side] / side - 0.5
    direction = rng.normal(size=2)
    x = x + shading / 255 * (direction[0] * yy + direction[1] * xx)[..., None]
    x = x + rng.normal(0, noise / 255, x.shape)
    for _ in range(specks):
        r, c = rng.integers(0, side - 2, 2)
        x[r:r + 2, c:c + 2] = np.array(RGB[COLORS[rng.integers(len(COLORS))]]) / 255
    return np.clip(x, 0, 1).astype(np.float32)


@pytest.mark.parametrize("resolution", [64, 32])
@pytest.mark.parametrize("kind", ["blur-noise-cast", "washed-shaded-specks"])
def test_degraded_images_are_still_judged_right(resolution, kind):
    rng = np.random.default_rng(1)
    px = resolution / 64  # blur in pixels of a 64 px image
    options = (dict(blur=1.0 * px, noise=8, shift=10) if kind == "blur-noise-cast" else
               dict(blur=1.0 * px, noise=6, shift=8, contrast=0.85, shading=25, specks=3))
    examples = [make_example(i, 3, resolution) for i in range(400)]
    result = score([degrade(e["image"], rng, **options) for e in examples], [e["caption"] for e in examples])
    assert result["all"] >= 0.97, result


def test_a_wrong_attribute_is_wrong_on_exactly_that_attribute():
    choices = {"shape": SHAPES, "color": COLORS, "size": SIZES, "background": BACKGROUNDS}
    for index in range(24):
        example = make_example(index, 11, 64)
        assert all(judge(example["image"], example["caption"]).values())
        for name in ATTRIBUTES:
            for value in choices[name]:
                asked = {k: example[k] for k in ATTRIBUTES} | {name: value}
                if value == example[name] or asked["color"] == asked["background"]:
                    continue
                verdict = judge(example["image"], caption(asked["shape"], asked["color"], asked["size"],
                                                          asked["background"]))
                assert [k for k in ATTRIBUTES if not verdict[k]] == [name], (example["caption"], name, value)
                assert not verdict["all"]


def test_large_circle_is_not_a_small_one():
    example = next(e for e in (make_example(i, 0, 64) for i in range(200))
                   if (e["shape"], e["color"], e["size"]) == ("circle", "red", "large"))
    verdict = judge(example["image"], f"a small red circle on a {example['background']} background")
    assert verdict == {"shape": True, "color": True, "size": False, "background": True, "all": False}


def test_blank_and_speckled_images_show_no_shape():
    blank = np.full((64, 64, 3), RGB["blue"], np.uint8)
    assert analyse(blank) == {"shape": NONE, "color": NONE, "size": NONE, "background": "blue"}
    assert judge(blank, "a small red circle on a blue background") == {
        "shape": False, "color": False, "size": False, "background": True, "all": False}
    specks = blank.copy()
    specks[10:12, 10:12] = RGB["red"]
    specks[40:42, 50:52] = RGB["yellow"]
    assert analyse(specks)["shape"] == NONE
    assert score([blank, specks], ["a large red square on a blue background"] * 2)["all"] == 0.0


def test_float_images_read_like_uint8():
    example = make_example(5, 0, 64)
    assert analyse(example["image"].astype(np.float32) / 255) == analyse(example["image"])
    with pytest.raises(ValueError, match="expected \\(H, W, 3\\)"):
        analyse(np.zeros((64, 64), np.uint8))


def test_parse_prompt():
    assert parse_prompt("a small red circle on a blue background") == {
        "shape": "circle", "color": "red", "size": "small", "background": "blue"}
    for prompt in all_prompts():
        attrs = parse_prompt(prompt)
        assert caption(attrs["shape"], attrs["color"], attrs["size"], attrs["background"]) == prompt
    for bad in ["a red circle", "a huge red circle on a blue background", "a small red hexagon on a blue background",
                "a small red circle on blue", ""]:
        with pytest.raises(ValueError, match="prompt '" + bad):
            parse_prompt(bad)


def test_evaluation_prompts_are_fixed_distinct_and_balanced():
    assert len(all_prompts()) == 336
    prompts = evaluation_prompts(48)
    assert prompts == evaluation_prompts(48) and prompts[:5] == evaluation_prompts(5)
    assert len(set(prompts)) == 48
    attrs = [parse_prompt(p) for p in prompts]
    for name, values in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("background", BACKGROUNDS)):
        counts = Counter(a[name] for a in attrs)
        assert set(counts) == set(values) and max(counts.values()) - min(counts.values()) <= 1, (name, counts)
    for n in (0, 337):
        with pytest.raises(ValueError, match="number of prompts"):
            evaluation_prompts(n)


def test_score_counts_and_checks_lengths():
    examples = [make_example(i, 0, 32) for i in range(4)]
    images = [e["image"] for e in examples]
    prompts = [e["caption"] for e in examples]
    prompts[0] = prompts[1] if examples[0]["caption"] != examples[1]["caption"] else prompts[2]
    result = score(images, prompts)
    assert result["count"] == 4 and result["all"] == 0.75
    with pytest.raises(ValueError, match="3 images given for 4 prompts"):
        score(images[:3], prompts)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sdjax.adherence", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "--model '/no/such/model' is not a folder"),
    (["--model", ".", "--scheduler", "nope"], "--scheduler 'nope' is unknown; known: ddim"),
])
def test_cli_bad_flags_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.strip().count("\n") == 0  # one line


@pytest.mark.parametrize("args,message", [
    (["--model", "{tmp}", "--num-prompts", "0"], "--num-prompts must be in [1, 336], got 0"),
    (["--model", "{tmp}", "--seeds", "0"], "--seeds must be >= 1"),
    (["--model", "{tmp}", "--guidance", "1,x"], "expected comma-separated numbers"),
    (["--model", "{tmp}", "--num-prompts", "many"], "invalid int value"),
    (["--model", "{tmp}"], "model_index.json not found"),
    (["--data-check", "0"], "--data-check must be >= 1"),
])
def test_main_bad_flags_exit_2(args, message, tmp_path, capsys):
    assert_one_line_exit_2(adherence.main, [a.format(tmp=tmp_path) for a in args], message, capsys)


def test_main_data_check(capsys):
    assert adherence.main(["--data-check", "20", "--resolution", "32"]) == 0
    out = capsys.readouterr().out
    assert "32px" in out and "1.000" in out


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """The tiny from-scratch architecture with random weights (32 x 32 images). Drawn on the host from
    the parameter shapes: initialising through the networks would compile for ~20 s."""
    from sdjax.train.build import build_model, initial_params
    from sdjax.train.config import base_config

    import sdjax

    model = build_model(base_config().model, str(tmp_path_factory.mktemp("tiny"))).model
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: initial_params(dict(model.networks), 0))
    return sdjax.StableDiffusion(model, jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                                                     shapes))


def test_evaluate_model_runs_and_counts(tiny_sd):
    prompts = evaluation_prompts(2)
    # Both scales > 1 share one compiled program (the scale is an argument of it).
    out = evaluate_model(tiny_sd, prompts, seeds=1, guidance=[2.0, 3.0], steps=2, scheduler="ddim", batch_size=2)
    assert out["prompts"] == prompts and out["seeds"] == [0, 1]
    assert list(out["results"]) == [2.0, 3.0]
    for g in (2.0, 3.0):
        result = out["results"][g]
        assert set(result) == {*ATTRIBUTES, "all", "count"} and result["count"] == 2
        assert all(0.0 <= result[k] <= 1.0 for k in (*ATTRIBUTES, "all"))
        assert out["images"][g].shape == (2, 32, 32, 3) and out["images"][g].dtype == np.uint8
    with pytest.raises(ValueError, match="shapes caption grammar"):
        evaluate_model(tiny_sd, ["a red circle"], seeds=1, guidance=2.0, steps=2)


def test_main_prints_table_and_contact_sheets(tiny_sd, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sdjax, "load", lambda path: tiny_sd)  # the folder check still runs on a real folder
    out_dir = tmp_path / "sheets"
    code = adherence.main(["--model", str(tmp_path), "--num-prompts", "2", "--seeds", "1", "--guidance", "2,3",
                           "--steps", "2", "--scheduler", "ddim", "--out", str(out_dir)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split("|")[0].strip() == "2.0" and line.split("|")[1].strip() == "2" for line in lines), lines
    assert sorted(os.listdir(out_dir)) == ["contact-guidance-2.png", "contact-guidance-3.png",
                                           "grid-guidance-2.png", "grid-guidance-3.png"]
