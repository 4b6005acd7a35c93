"""Textual inversion embeddings loaded into sdjax give the text-encoder outputs of diffusers'
load_textual_inversion on tiny SD 1.x and SDXL pipelines; A1111's formats load to the same vectors; bad
files and tokens are refused with one line."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

import sdjax
from sdjax.conditioning import encode_text
from sdjax.convert.safetensors_io import CheckpointError, write_safetensors
from sdjax.textual_inversion import read_embedding

PROMPTS = ["a photo of <tri> on a red square", "<tri>"]


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _vectors(count, width, seed):
    return np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32) * 0.5


def _encode(sd, prompts):
    return encode_text(sd.model, sd.params, sd.tokenize(prompts))


@pytest.mark.parametrize("count", [1, 3])
def test_sd1_embedding_matches_diffusers(checkpoints, tmp_path, count):
    from diffusers import StableDiffusionPipeline

    folder = checkpoints["sd1"][0]
    vectors = _vectors(count, 32, count)
    path = str(tmp_path / "learned_embeds.safetensors")
    write_safetensors(path, {"<tri>": vectors})
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(path)
    with torch.no_grad():
        reference, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    sd = sdjax.load(folder).with_textual_inversion(path)
    assert sd.model.embeddings == {"<tri>": ("<tri>",) + tuple(f"<tri>_{i}" for i in range(1, count))}
    ours = _encode(sd, PROMPTS).context
    assert _rel(ours, reference) <= 1e-5
    # The token changed the encoding: the same prompts without the embedding differ.
    plain = _encode(sdjax.load(folder), PROMPTS).context
    assert _rel(plain, reference) > 1e-2
    # Prompts without the token encode exactly as before.
    np.testing.assert_array_equal(_encode(sd, ["a red circle"]).context, _encode(sdjax.load(folder), ["a red circle"]).context)


def test_a1111_formats_load_the_same_vectors(checkpoints, tmp_path):
    folder = checkpoints["sd1"][0]
    vectors = _vectors(2, 32, 7)
    diffusers_file = str(tmp_path / "d.safetensors")
    write_safetensors(diffusers_file, {"<tri>": vectors})
    a1111 = str(tmp_path / "tri.safetensors")
    write_safetensors(a1111, {"emb_params": vectors})
    pt = str(tmp_path / "legacy.pt")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors)},
                "name": "<tri>", "step": 500}, pt)
    assert read_embedding(a1111).name == "tri"  # A1111 names an embedding by its file
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="garbage.pt: cannot read as a PyTorch embedding"):
        read_embedding(str(garbage), allow_pickle=True)
    assert read_embedding(pt, allow_pickle=True).name == "<tri>"
    with pytest.raises(CheckpointError, match="legacy.pt: pickled embeddings are not read by default"):
        read_embedding(pt)
    base = sdjax.load(folder)
    expected = _encode(base.with_textual_inversion(diffusers_file), PROMPTS).context
    for sd in (base.with_textual_inversion(a1111, "<tri>"), base.with_textual_inversion(pt, allow_pickle=True)):
        np.testing.assert_array_equal(_encode(sd, PROMPTS).context, expected)


def test_sdxl_embedding_matches_diffusers(sdxl_checkpoints, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = sdxl_checkpoints["base"][0]
    clip_l, clip_g = _vectors(2, 32, 1), _vectors(2, 40, 2)
    path = str(tmp_path / "tri_xl.safetensors")
    write_safetensors(path, {"clip_l": clip_l, "clip_g": clip_g})
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_textual_inversion(torch.from_numpy(clip_l), token="<tri>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(torch.from_numpy(clip_g), token="<tri>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    sd = sdjax.load(folder).with_textual_inversion(path, "<tri>")
    cond = _encode(sd, PROMPTS)
    assert _rel(cond.context, context) <= 1e-5
    assert _rel(cond.pooled, pooled) <= 1e-5
    images = sd.generate(PROMPTS[:1], num_steps=2)
    assert np.isfinite(images).all()


def test_bad_embeddings_are_refused(checkpoints, sdxl_checkpoints, tmp_path):
    sd1 = sdjax.load(checkpoints["sd1"][0])
    xl = str(tmp_path / "xl.safetensors")
    write_safetensors(xl, {"clip_l": _vectors(1, 32, 0), "clip_g": _vectors(1, 40, 0)})
    with pytest.raises(CheckpointError, match="xl.safetensors: an SDXL embedding .clip_l, clip_g. does not fit this "
                                              "model's text encoders .text_encoder."):
        sd1.with_textual_inversion(xl, "<x>")
    wide = str(tmp_path / "wide.safetensors")
    write_safetensors(wide, {"<w>": _vectors(1, 768, 0)})
    with pytest.raises(CheckpointError, match="wide.safetensors: vectors of 768 values; text_encoder takes 32"):
        sd1.with_textual_inversion(wide)
    single = str(tmp_path / "single.safetensors")
    write_safetensors(single, {"<s>": _vectors(1, 32, 0)})
    with pytest.raises(CheckpointError, match="single.safetensors: one set of vectors, but this model has 2 text "
                                              "encoders"):
        sdjax.load(sdxl_checkpoints["base"][0]).with_textual_inversion(single)
    # A word of the vocabulary: refused, unless overridden.
    word = str(tmp_path / "word.safetensors")
    write_safetensors(word, {"red</w>": _vectors(1, 32, 3)})
    with pytest.raises(ValueError, match="word.safetensors: token 'red</w>' is already in tokenizer's vocabulary"):
        sd1.with_textual_inversion(word)
    overridden = sd1.with_textual_inversion(word, override=True)
    assert overridden.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"].shape == \
        sd1.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"].shape
    assert _rel(_encode(overridden, ["a red circle"]).context, _encode(sd1, ["a red circle"]).context) > 1e-3
    other = str(tmp_path / "other.safetensors")
    write_safetensors(other, {"a": _vectors(1, 32, 0), "b": _vectors(1, 32, 0)})
    with pytest.raises(CheckpointError, match="other.safetensors: not a textual-inversion embedding: 2 tensors"):
        read_embedding(other)
    with pytest.raises(ValueError, match="token 'two words' must be one word"):
        sd1.with_textual_inversion(single, "two words")
    assert not os.path.exists(tmp_path / "out")


def test_sample_cli_embedding(tmp_path, capsys):
    """sample.py --embedding FILE[:TOKEN] on the shipped model: the word draws its vectors, the PNG records
    A1111's TI hashes; a file for another model family is refused before anything is written."""
    import hashlib

    import sample
    from cli_checks import assert_one_line_exit_2
    from sdjax.png_info import parse_parameters, read_parameters

    path = str(tmp_path / "tri.safetensors")
    write_safetensors(path, {"emb_params": _vectors(2, 64, 5)})
    out = tmp_path / "out"
    assert sample.main(["--embedding", f"{path}:<tri>", "--prompt", "a large <tri> on a white background",
                        "--prompt", "a red circle", "--steps", "2", "--out", str(out)]) == 0
    first, second = sorted(os.listdir(out))
    settings = parse_parameters(read_parameters(out / first))[2]
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:12]
    assert settings["TI hashes"] == f"<tri>: {digest}"
    assert "TI hashes" not in parse_parameters(read_parameters(out / second))[2]  # its prompt has no <tri>
    wide = str(tmp_path / "wide.safetensors")
    write_safetensors(wide, {"emb_params": _vectors(1, 768, 5)})
    bad = tmp_path / "bad"
    capsys.readouterr()  # the first run's progress
    assert_one_line_exit_2(sample.main, ["--embedding", wide, "--prompt", "a", "--out", str(bad)],
                           f"{wide}: vectors of 768 values; text_encoder takes 64", capsys)
    assert_one_line_exit_2(sample.main, ["--embedding", str(tmp_path / "missing.safetensors"), "--prompt", "a",
                                         "--out", str(bad)], "missing.safetensors: file not found", capsys)
    twin = str(tmp_path / "twin.safetensors")
    write_safetensors(twin, {"emb_params": _vectors(1, 64, 6)})
    assert_one_line_exit_2(sample.main, ["--embedding", f"{path}:<x>", "--embedding", f"{twin}:<x>", "--prompt", "a",
                                         "--out", str(bad)], "word '<x>' is also", capsys)
    assert not bad.exists()


def test_sdxl_textual_inversion_training_exports_both_encoders(sdxl_checkpoints, tmp_path):
    """configs/textual_inversion.py:tiny on a tiny SDXL base: one row per text encoder trained; the exports
    (diffusers' two files, A1111's clip_l/clip_g) load back into the model."""
    from cli_checks import train_tiny
    from sdjax.convert.safetensors_io import read_safetensors

    folder = sdxl_checkpoints["base"][0]
    workdir = tmp_path / "run"
    result = train_tiny("textual_inversion.py", workdir, folder, str(tmp_path / "data"), "--config.total_steps=4",
                        "--config.batch_size=2", "--config.data.resolution=32", "--config.data.shapes.num_examples=16",
                        "--config.checkpoint.every_steps=4", "--config.log.every_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    export = workdir / "export"
    first, second = read_safetensors(str(export / "learned_embeds.safetensors")), \
        read_safetensors(str(export / "learned_embeds_2.safetensors"))
    assert first["<tri>"].shape == (1, 32) and second["<tri>"].shape == (1, 40)
    a1111 = read_safetensors(str(export / "tri.safetensors"))
    np.testing.assert_array_equal(a1111["clip_l"], first["<tri>"])
    np.testing.assert_array_equal(a1111["clip_g"], second["<tri>"])
    sd = sdjax.load(folder).with_textual_inversion(str(export / "tri.safetensors"), "<tri>")
    table = sd.params["text_encoder_2"]["embeddings"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(np.asarray(table[-1]), second["<tri>"][0])
    assert np.isfinite(sd.generate(["a <tri>"], num_steps=2, height=32, width=32)).all()


def test_word_matches_alone_and_survives_save(checkpoints, tmp_path):
    """A loaded word takes no part of a longer word ("ron" leaves "ciron" alone), matches whatever its case,
    and a saved model keeps a multi-vector word's expansion."""
    base = sdjax.load(checkpoints["sd1"][0])
    path = str(tmp_path / "ron.safetensors")
    write_safetensors(path, {"emb_params": _vectors(3, 32, 9)})
    sd = base.with_textual_inversion(path)
    np.testing.assert_array_equal(_encode(sd, ["a ciron"]).context, _encode(base, ["a ciron"]).context)
    np.testing.assert_array_equal(_encode(sd, ["a RON"]).context, _encode(sd, ["a ron"]).context)
    assert _rel(_encode(sd, ["a ron"]).context, _encode(base, ["a ron"]).context) > 1e-2
    sd.save(str(tmp_path / "saved"))
    again = sdjax.load(str(tmp_path / "saved"))
    assert again.model.embeddings == {"ron": ("ron", "ron_1", "ron_2")}
    np.testing.assert_array_equal(_encode(again, ["a ron"]).context, _encode(sd, ["a ron"]).context)
