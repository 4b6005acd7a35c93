"""Training a CLIP byte-level BPE tokenizer: the merges, and how CLIPTokenizer applies them."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sdjax.data.shapes import make_example
from sdjax.tokenizer import load_tokenizer, pre_tokenize, tokenize, train_bpe, train_tokenizer

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

UNSEEN = [
    "a purple hexagon near 4 café ☃ zebras",
    "Two LARGE circles, it's 3:45pm!! naïve co-op <b>bold</b>",
    "an orange   square\ton a\nwhite background",
    "日本語のテキスト and emoji 🎨🖌️",
]


@pytest.fixture(scope="module")
def captions():
    return [make_example(i, seed=0, resolution=8)["caption"] for i in range(2000)]


@pytest.fixture(scope="module")
def trained(captions, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("trained_tokenizer"))
    train_tokenizer(captions, folder)
    return load_tokenizer(folder)


def reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE application, written independently: a word's byte symbols, the last one with
    "</w>"; repeatedly merge every occurrence (left to right) of the lowest-ranked pair present."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def test_every_caption_word_is_one_token(trained, captions):
    words = sorted({w for c in captions for w in c.split()})
    for word in words:
        assert len(trained(word, add_special_tokens=False)["input_ids"]) == 1, word
    for caption in captions[:50]:
        ids = trained(caption)["input_ids"]
        assert len(ids) == 1 + len(caption.split()) + 1  # BOS, one token a word, EOS
        assert ids[0] == trained.bos_token_id and ids[-1] == trained.eos_token_id
        assert trained.decode(ids, skip_special_tokens=True) == caption
    assert len(trained(captions[0])["input_ids"]) == 10  # "a small red circle on a blue background"


def test_unseen_text_falls_back_to_pieces_and_bytes(trained):
    ids = trained(UNSEEN[0])["input_ids"]
    tokens = trained.convert_ids_to_tokens(ids)
    assert "purple</w>" in tokens and "hexagon</w>" not in tokens  # seen word whole, unseen in pieces
    assert trained.unk_token_id not in ids[1:-1]  # every byte is in the vocabulary
    assert trained.decode(ids, skip_special_tokens=True) == UNSEEN[0]
    # The byte-level fallback covers any text: decoding gives back the normalized words.
    for text in UNSEEN:
        ids = trained(text, add_special_tokens=False)["input_ids"]
        assert "".join(trained.decode(ids).split()) == "".join(text.lower().split())


def test_tokenize_gives_ids_in_vocabulary(trained, captions):
    ids = tokenize(trained, captions[:8] + UNSEEN)
    assert ids.shape == (12, 77) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < len(trained)
    assert (ids[:8, 10:] == trained.pad_token_id).all()


def test_shapes_vocabulary_size(captions, trained):
    merges = train_bpe(captions)
    assert len(merges) == 59
    assert len(trained) == 256 * 2 + len(merges) + 2  # bytes, word-final bytes, merges, BOS/EOS


def test_training_is_deterministic_and_order_free(captions):
    merges = train_bpe(captions)
    assert train_bpe(captions) == merges
    shuffled = list(captions)
    random.Random(1).shuffle(shuffled)
    assert train_bpe(iter(shuffled)) == merges  # any iterable, any order
    # Ties go to the lexicographically smallest pair.
    assert train_bpe(["cd ab"], min_frequency=1) == [("a", "b</w>"), ("c", "d</w>")]


def test_known_merges_and_min_frequency():
    assert train_bpe(["red red red bed"]) == [("e", "d</w>"), ("r", "ed</w>")]
    assert train_bpe(["red red red bed"], min_frequency=1) == [("e", "d</w>"), ("r", "ed</w>"), ("b", "ed</w>")]
    assert train_bpe(["red red red bed"], min_frequency=4) == [("e", "d</w>")]
    assert train_bpe(["red red red bed"], min_frequency=5) == []
    assert train_bpe(["a b c", "   "]) == []  # one-symbol words have no pairs


def test_num_merges_is_a_prefix(captions):
    full = train_bpe(captions)
    assert train_bpe(captions, num_merges=0) == []
    assert train_bpe(captions, num_merges=7) == full[:7]
    assert train_bpe(captions, num_merges=10_000) == full


def test_unlimited_merges_make_each_word_one_token(tmp_path):
    texts = ["Zebras graze; the zebra's stripes!", "zebras 42 ½"]
    tok = train_tokenizer(texts, str(tmp_path), min_frequency=1, pad="!")
    for word in pre_tokenize(" ".join(texts)):
        assert len(tok.backend_tokenizer.model.tokenize(word)) == 1, word
    assert tokenize(tok, ["zebras"])[0, 3] == 0  # pad "!" is id 0 (SD2 style)


def test_merges_apply_as_clip_applies_them(captions, tmp_path):
    """Our own application of the merges equals CLIPTokenizer's, seen and unseen words alike, so
    the trainer's symbols ("</w>" on the last byte, byte alphabet) are CLIP's conventions."""
    texts = captions + UNSEEN[1:] + ["the orange's rim", "blackboard greenish whiteness"]
    for num_merges in (25, None):
        folder = str(tmp_path / f"m{num_merges}")
        merges = train_bpe(texts, num_merges=num_merges, min_frequency=1)
        tok = train_tokenizer(texts, folder, num_merges=num_merges, min_frequency=1)
        ranks = {pair: rank for rank, pair in enumerate(merges)}
        vocab = tok.get_vocab()
        backend = tok.backend_tokenizer
        for text in texts[:20] + UNSEEN + ["circles squares triangles backgrounds", "reddish bluegreen"]:
            words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
            expected = [vocab[s] for w in words for s in reference_bpe(w, ranks)]
            assert tok(text, add_special_tokens=False)["input_ids"] == expected, text


def test_pre_tokenize_matches_clip_tokenizer(trained):
    backend = trained.backend_tokenizer
    texts = UNSEEN + [
        "x<|ENDOFTEXT|>! !!<|StartOfText|>a <|bogus|> <|EndOfText|>?",
        "it's ''s !'s 'll 'RE don't I'M 'x",
        "½² é\x1cb\x1fc\u00a0d\u2003e\u3000f",
        "ΣΑΣ ŞİŞ ǅ ﬃ 3.14 e\u0301",
        "",
    ]
    for text in texts:
        expected = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
        assert pre_tokenize(text) == expected, text
    # Exact special tokens are split off before normalization, as the tokenizer does.
    assert pre_tokenize("red<|endoftext|>bed") == ["red", "bed"]
    assert trained("red<|endoftext|>", add_special_tokens=False)["input_ids"][-1] == trained.eos_token_id


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(texts=["a b"], num_merges=-1), ValueError, "num_merges must be None or an integer >= 0"),
    (dict(texts=["a b"], num_merges=2.5), ValueError, "num_merges must be None or an integer >= 0"),
    (dict(texts=["a b"], min_frequency=0), ValueError, "min_frequency must be an integer >= 1"),
    (dict(texts=[]), ValueError, "texts is empty"),
    (dict(texts=iter(())), ValueError, "texts is empty"),
    (dict(texts="a red circle"), TypeError, "not one string"),
    (dict(texts=["a", 3]), TypeError, "got int at position 1"),
])
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        train_bpe(**kwargs)
