"""A1111's prompt syntax: the parser (A1111's own docstring examples as test vectors), chunking of long
prompts, and the weighted encoding against the weighting computed by hand."""

import os
import re

import numpy as np
import pytest

import sdjax
from sdjax.conditioning import encode_text, tokenize_prompts
from sdjax.prompt_syntax import PromptSyntaxError, batch, chunk, parse
from sdjax.tokenizer import write_bpe_tokenizer

pytestmark = pytest.mark.compat  # torch-free: also run under the newest jax (CI phase 2)


def fragments(prompt):
    return [(f.text, f.weight) for f in parse(prompt)]


# The examples of parse_prompt_attention's docstring in A1111's modules/prompt_parser.py, weights as A1111
# computes them (repeated float products, so equality is exact).
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.1 / 1.1), (" a ", 1.1), ("hill", 0.5 * 1.1),
      (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)]),
]


@pytest.mark.parametrize("prompt,expected", A1111_EXAMPLES)
def test_parser_matches_a1111_docstring(prompt, expected):
    got = fragments(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


def test_parser_nesting_escapes_and_break():
    assert fragments("((a)) [[b]] (c:1.5) [(d)]") == [
        ("a", 1.1 * 1.1), (" ", 1.0), ("b", 1 / 1.1 / 1.1), (" ", 1.0), ("c", 1.5), (" d", 1.0)]  # x1.1 then /1.1 is 1 again
    assert fragments("((a:2) b)") == [("a", 2 * 1.1), (" b", 1.1)]
    assert fragments("\\(a\\) \\\\ b\\:c") == [("(a) \\ b:c", 1.0)]
    assert fragments("time: noon (a:2)") == [("time: noon ", 1.0), ("a", 2.0)]  # a colon in text is text
    assert fragments("a BREAK b") == [("a", 1.0), (None, 1.0), ("b", 1.0)]
    assert fragments("BREAKFAST") == [("BREAKFAST", 1.0)]  # only the whole word
    assert fragments("") == [("", 1.0)]
    assert fragments("(a:-0.5)") == [("a", -0.5)]


@pytest.mark.parametrize("prompt,position,what", [
    ("a cat)", 5, "')' closes no '('"),
    ("a [cat)", 6, "')' closes no '('"),
    ("a cat]", 5, "']' closes no '['"),
    ("(cat:abc)", 5, "weight 'abc' is not a number"),
    ("(cat:1.2.3)", 5, "weight '1.2.3' is not a number"),
    ("(cat:)", 4, "weight '' is not a number"),
])
def test_parser_errors_name_the_position(prompt, position, what):
    with pytest.raises(PromptSyntaxError, match=re.escape(f"prompt position {position}: {what}")):
        parse(prompt)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level CLIP tokenizer (one token per character, plus a few merges) with 77 positions."""
    return write_bpe_tokenizer(str(tmp_path_factory.mktemp("tok")), [("c", "a"), ("ca", "t</w>")], "eos", 77)


def plain_tokens(tokenizer, text):
    return tokenizer([text], add_special_tokens=False)["input_ids"][0]


def test_long_prompt_in_chunks_of_75(tokenizer):
    text = "x" * 100  # one token per character in this vocabulary: 100 tokens
    laid = chunk(tokenizer, text, 77, backtrack=0)
    assert laid.ids.shape == (2, 77) and laid.weights.shape == (2, 77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokens = plain_tokens(tokenizer, text)
    assert laid.ids[0].tolist() == [bos] + tokens[:75] + [eos]
    assert laid.ids[1].tolist() == [bos] + tokens[75:] + [eos] + [tokenizer.pad_token_id] * 50
    np.testing.assert_array_equal(laid.weights, 1.0)
    # A prompt that fits is laid out exactly as the plain tokenizer pads it.
    one = chunk(tokenizer, "a cat", 77)
    np.testing.assert_array_equal(one.ids[0], tokenizer(["a cat"], padding="max_length", max_length=77)["input_ids"][0])


def test_weights_follow_their_tokens(tokenizer):
    laid = chunk(tokenizer, "a (cat:1.5) [b]", 77)
    ids, weights = laid.ids[0].tolist(), laid.weights[0].tolist()
    cat = plain_tokens(tokenizer, "cat")
    assert len(cat) == 1  # the merge makes "cat</w>" one token
    assert weights[ids.index(cat[0])] == pytest.approx(1.5)
    b = plain_tokens(tokenizer, "b")[0]
    assert weights[ids.index(b)] == pytest.approx(1 / 1.1)
    assert sum(w != 1.0 for w in weights) == 2


def test_break_and_comma_backtracking(tokenizer):
    laid = chunk(tokenizer, "a BREAK b", 77)
    assert laid.ids.shape == (2, 77)
    assert laid.ids[0, 1] == plain_tokens(tokenizer, "a")[0] and laid.ids[1, 1] == plain_tokens(tokenizer, "b")[0]
    # 70 tokens, a comma, 10 more: the chunk breaks after the comma (10 + 1 tokens back <= 20), carrying
    # the last 10 tokens into the second chunk.
    text = "x" * 70 + "," + "y" * 10
    laid = chunk(tokenizer, text, 77)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    first = laid.ids[0].tolist()
    assert first[1:72] == plain_tokens(tokenizer, "x" * 70 + ",")[:71] and first[71] == comma
    assert first[72] == tokenizer.eos_token_id
    assert laid.ids[1, 1:11].tolist() == plain_tokens(tokenizer, "y" * 10)
    # Off: the first chunk is filled to 75 tokens.
    assert chunk(tokenizer, text, 77, backtrack=0).ids[0, 75] != tokenizer.eos_token_id


def test_batch_pads_with_empty_chunks(tokenizer):
    ids, weights = batch(tokenizer, ["x" * 100, "a cat"], 77)
    assert ids.shape == weights.shape == (2, 154)
    empty = chunk(tokenizer, "", 77)
    np.testing.assert_array_equal(ids[1, 77:], empty.ids[0])
    assert batch(tokenizer, ["a"], 77, count=3)[0].shape == (1, 231)


@pytest.fixture(scope="module")
def shipped():
    return sdjax.load(sdjax.DEFAULT_MODEL)


def test_weighted_embeddings_equal_the_hand_computed_weighting(shipped):
    model, params = shipped.model, shipped.params
    prompt = "a (large:1.4) red [triangle] on a white background, sharp edges, many shapes BREAK (circle)"
    inputs = tokenize_prompts(model, [prompt], "a1111")
    ids, weights = inputs["input_ids"], inputs["token_weights"]
    window = model.networks["text_encoder"].config.max_position_embeddings
    chunks = ids.shape[1] // window
    assert chunks >= 3  # 14 tokens per window on the shipped encoder, and a BREAK
    got = np.asarray(encode_text(model, params, inputs).context)
    plain = np.asarray(encode_text(model, params, {"input_ids": ids.reshape(chunks, window)}).context)
    expected = []
    for k in range(chunks):
        z = plain[k].astype(np.float64)
        w = weights[0, k * window:(k + 1) * window].astype(np.float64)
        weighted = z * w[:, None]
        expected.append(weighted * (z.mean() / weighted.mean()))
    # float32 vs float64: the means of hidden states are small against their entries, so their ratio
    # carries ~1e-5 relative rounding, the same factor for every entry of a window.
    np.testing.assert_allclose(got[0], np.concatenate(expected), rtol=1e-4, atol=1e-6)
    assert not np.allclose(got[0], plain.reshape(-1, plain.shape[-1]), atol=1e-3)  # the weights did something


def test_weight_one_is_the_plain_prompt_exactly(shipped):
    model, params = shipped.model, shipped.params
    prompt = "a large red triangle on a white background"
    plain = encode_text(model, params, tokenize_prompts(model, [prompt], "plain"))
    for written in ("a large red (triangle:1) on a white background", "(a large red triangle on a white background:1)"):
        weighted = encode_text(model, params, tokenize_prompts(model, [written], "a1111"))
        np.testing.assert_array_equal(np.asarray(weighted.context), np.asarray(plain.context))


def test_generate_a1111_long_prompt_and_negative_share_a_window_count(shipped):
    prompt = "a large red triangle on a white background, " * 3  # 3+ windows on the shipped encoder
    images = shipped.generate([prompt], ["blurry"], num_steps=2, seed=0, prompt_syntax="a1111")
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    short = "a large red triangle"
    plain = shipped.generate([short], num_steps=2, seed=0)
    a1111 = shipped.generate([f"({short}:1)"], num_steps=2, seed=0, prompt_syntax="a1111")
    np.testing.assert_array_equal(plain, a1111)
    with pytest.raises(ValueError, match="prompt_syntax 'sdxl' is unknown"):
        shipped.generate([short], num_steps=2, prompt_syntax="sdxl")
    with pytest.raises(PromptSyntaxError, match="prompt position 1"):
        shipped.generate(["a)"], num_steps=2, prompt_syntax="a1111")


def test_sample_cli_a1111_syntax(tmp_path, capsys):
    import jax

    import sample
    from cli_checks import assert_one_line_exit_2
    from sdjax.png_info import parse_parameters, read_parameters

    out = tmp_path / "bad"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "ok", "negative_prompt": "blurry (x:abc)"}\n')
    jit = jax.jit
    try:
        jax.jit = None  # refused before any compile: a compile would fail loudly
        assert_one_line_exit_2(sample.main, ["--prompt-syntax", "a1111", "--prompt", "a ((cat)", "--prompt", "b]",
                                             "--out", str(out)], "--prompt: prompt position 1: ']' closes no '['",
                               capsys)
        assert_one_line_exit_2(sample.main, ["--prompt-syntax", "a1111", "--prompts-file", str(prompts),
                                             "--out", str(out)], f"{prompts}:2: negative_prompt: prompt position 10: "
                                                                 "weight 'abc' is not a number", capsys)
    finally:
        jax.jit = jit
    assert not out.exists()
    out = tmp_path / "out"
    long = "a large (green:1.2) triangle on a white background, " * 2 + "BREAK [blurry]"
    assert sample.main(["--prompt-syntax", "a1111", "--prompt", long, "--prompt", "a red circle", "--steps", "2",
                        "--out", str(out)]) == 0
    names = sorted(os.listdir(out))
    assert len(names) == 2
    assert parse_parameters(read_parameters(out / names[0]))[0] == long  # as written


def test_new_weighted_prompts_of_the_same_window_count_reuse_the_program(shipped):
    from sdjax.pipeline import _PROGRAMS

    sd = sdjax.StableDiffusion(shipped.model.replace(), shipped.params)  # a Model of its own: an empty cache
    kw = dict(num_steps=2, seed=0, prompt_syntax="a1111")
    sd.generate(["a (large:1.2) red triangle"], **kw)
    ((_, program),) = _PROGRAMS[sd.model].items()
    sd.generate(["a [small] (blue:0.8) circle on a (white:1.4) background"], ["(blurry)"], **kw)
    assert program._cache_size() == 1  # new words and weights: inputs of the same program
    sd.generate(["a large red triangle on a white background, " * 3], **kw)
    assert program._cache_size() == 2  # more windows: a new shape
