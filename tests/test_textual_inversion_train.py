"""Textual-inversion training (configs/textual_inversion.py:tiny): the shipped shapes model learns a new word
"<tri>" for triangles, started from a neutral word; only the new rows are trained and held by the optimizer;
the exports (diffusers' and A1111's) load back; images of "a ... <tri> on a ... background" show triangles,
judged by sdjax.adherence against the untrained word as the baseline."""

import json

import numpy as np
import pytest

import sdjax
from cli_checks import train_tiny
from sdjax import adherence
from sdjax.convert.safetensors_io import read_safetensors
from sdjax.textual_inversion import placeholder, read_embedding

pytestmark = pytest.mark.compat  # torch-free: also run under the newest jax (CI phase 2)


def _triangle_prompts(count: int) -> list[str]:
    prompts = [p for p in adherence.evaluation_prompts(200, seed=1) if "triangle" in p]
    assert len(prompts) >= count
    return prompts[:count]


def _shapes_seen(images) -> dict[str, int]:
    seen = [adherence.analyse(image)["shape"] for image in images]
    return {shape: seen.count(shape) for shape in sorted(set(seen))}


def test_tiny_run_teaches_the_shipped_model_a_word_for_triangles(tmp_path):
    workdir = tmp_path / "run"
    result = train_tiny("textual_inversion.py", workdir, sdjax.DEFAULT_MODEL, str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr[-3000:]
    # The checkpointed state: parameters, their EMA and Adam's moments are the new rows alone.
    with open(workdir / "checkpoints" / "300" / "state" / "_METADATA") as f:
        paths = [eval(key) for key in json.load(f)["tree_metadata"]]  # noqa: S307 (tuples of names, our own file)
    held = [p for p in paths if p[0] in ("params", "ema") or p[:2] in (("opt_state", "mu"), ("opt_state", "nu"))]
    assert held and all("textual_inversion" in p[:3] for p in held)

    export = workdir / "export"
    diffusers_file, a1111_file = str(export / "learned_embeds.safetensors"), str(export / "tri.safetensors")
    assert list(read_safetensors(diffusers_file)) == ["<tri>"]
    assert list(read_safetensors(a1111_file)) == ["emb_params"]
    np.testing.assert_array_equal(read_embedding(a1111_file).vectors[None], read_embedding(diffusers_file).vectors[None])

    base = sdjax.load(sdjax.DEFAULT_MODEL)
    trained = base.with_textual_inversion(diffusers_file)
    start_model, start_params, rows = placeholder(base.model, base.params, "<tri>", "shape", 1)
    untrained = sdjax.StableDiffusion(start_model, start_params)
    # Only the new row differs from the shipped weights (and from where it started).
    table = np.asarray(trained.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
    shipped = np.asarray(base.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(table[:len(shipped)], shipped)
    assert np.abs(table[len(shipped)] - rows["text_encoder"][0]).max() > 1e-2

    prompts = _triangle_prompts(32)
    asked = [p.replace("triangle", "<tri>") for p in prompts]
    before = untrained.generate(asked, num_steps=20, seed=0)
    after = trained.generate(asked, num_steps=20, seed=0)
    baseline, learned = adherence.score(before, prompts)["shape"], adherence.score(after, prompts)["shape"]
    # Measured here: 0.19 before (mostly circles), 1.00 after.
    assert baseline <= 0.4, (baseline, _shapes_seen(before))
    assert learned >= 0.8, (learned, _shapes_seen(after))


@pytest.mark.parametrize("overrides,message", [
    ({"textual_inversion.initializer": ""}, "textual_inversion.initializer: required with textual_inversion.token"),
    ({"textual_inversion.vectors": 0}, "textual_inversion.vectors must be >= 1, got 0"),
    ({"textual_inversion.template": "a photo"}, "needs one {} where the token goes"),
    ({"textual_inversion.template": "a {x} of {}"}, "needs one {} where the token goes"),
    ({"textual_inversion.template": "a {{}} photo"}, "needs one {} where the token goes"),
    ({"textual_inversion.template": "a {}", "data.caption_dropout": 0.1}, "set data.caption_dropout=0"),
    ({"textual_inversion.template": "a {}", "textual_inversion.replace": "x"}, "give one"),
    ({"lora.rank": 4}, "a textual-inversion run trains the new word alone"),
    ({"model.pretrained": ""}, "set model.pretrained"),
    ({"textual_inversion.token": ""}, "set textual_inversion.token to train a new word"),
])
def test_bad_textual_inversion_configs(overrides, message):
    import configs.textual_inversion as recipe
    from sdjax.train.config import apply_overrides
    from sdjax.train.tasks import unet

    config = apply_overrides(recipe.get_config("tiny"), overrides)
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        unet.check(config)
