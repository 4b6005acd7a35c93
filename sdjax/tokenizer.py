"""Prompt tokenization with the checkpoint's CLIP BPE tokenizer (transformers, tokenizer only)."""

from __future__ import annotations

import functools
import gzip
import heapq
import json
import os
import posixpath
import re
import sys
import tempfile
import unicodedata
import warnings
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

from sdjax import storage
from sdjax.convert.safetensors_io import CheckpointError


def _clip_tokenizer_class():
    """transformers' CLIPTokenizer. Without PyTorch (a TPU VM needs none) transformers advises at import that
    its models are unavailable; sdjax uses only its tokenizers, so that advice is kept out of the terminal."""
    if "transformers" not in sys.modules:
        previous = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"  # read when the advice is logged, at import
        try:
            import transformers  # noqa: F401
        finally:
            if previous is None:
                os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS")
            else:
                os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = previous
    from transformers import CLIPTokenizer

    return CLIPTokenizer


# The files of a tokenizer folder transformers' from_pretrained reads.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def load_tokenizer(folder: str):
    """transformers' CLIPTokenizer from a tokenizer/ folder (vocab.json + merges.txt, or tokenizer.json),
    local or remote (gs://...).

    Always through `from_pretrained(folder)`: in transformers 5, CLIPTokenizer(vocab_file=...,
    merges_file=...) silently builds a 3-token vocabulary.
    """
    CLIPTokenizer = _clip_tokenizer_class()
    remote = storage.is_remote(folder)
    names = set(storage.listdir(folder)) if remote else None
    if remote:  # a cut-off upload of this folder, or of the model folder it is part of
        storage.check_complete(folder)
        storage.check_complete(posixpath.dirname(folder.rstrip("/")))
    has = (lambda name: name in names) if remote else (lambda name: os.path.isfile(os.path.join(folder, name)))
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        raise CheckpointError(f"{folder}: no tokenizer found (needs vocab.json and merges.txt, or tokenizer.json)")
    if not remote:
        return CLIPTokenizer.from_pretrained(folder)
    # transformers reads local files only: the folder's few small tokenizer files are copied first.
    with tempfile.TemporaryDirectory(prefix="sdjax-tokenizer-") as local:
        for name in sorted(names & set(TOKENIZER_FILES)):
            with open(os.path.join(local, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(folder, name)))
        tokenizer = CLIPTokenizer.from_pretrained(local)
    tokenizer.name_or_path = folder
    return tokenizer


def save_tokenizer(tokenizer, folder: str) -> None:
    """Writes tokenizer.json and configs (transformers 5) plus vocab.json and merges.txt (older readers)."""
    tokenizer.save_pretrained(folder)
    tokenizer.backend_tokenizer.model.save(folder)


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = 77) -> np.ndarray:
    """Prompts -> int32 token ids (N, max_length): BOS, tokens, EOS, then the checkpoint's pad token.

    Prompts longer than max_length are truncated, as CLIP does, with a warning naming them.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    full = tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
    too_long = [p for p, ids in zip(prompts, full) if len(ids) > max_length]
    if too_long:
        warnings.warn(f"{len(too_long)} prompt(s) exceed {max_length} tokens and were truncated, e.g. "
                      f"{too_long[0][:60]!r}", stacklevel=2)
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def byte_characters() -> list[str]:
    """The GPT-2/CLIP mapping of the 256 bytes onto printable characters, in CLIP's vocab order:
    printable bytes as themselves first ("!" gets id 0), then the rest shifted past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def write_bpe_tokenizer(folder: str, merges: Sequence[tuple[str, str]] = (), pad: str = "eos",
                        max_length: int = 77):
    """Writes a CLIP BPE tokenizer over the byte alphabet plus `merges` to `folder` and returns it.

    Every byte is a token alone and word-final ("x</w>"), so any text is covered; each merge adds
    its joined token. pad is "eos" (SD1 style) or a token such as "!" (SD2 style, id 0).
    """
    CLIPTokenizer = _clip_tokenizer_class()
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token=SPECIAL_TOKENS[1] if pad == "eos" else pad,
                                              model_max_length=max_length)
    save_tokenizer(tokenizer, folder)
    return load_tokenizer(folder)


# OpenAI CLIP's BPE merges (the 48,894 that CLIP's tokenizer uses, from OpenCLIP's MIT-licensed
# bpe_simple_vocab_16e6.txt.gz), shipped for single-file checkpoints, which carry no tokenizer. Every
# Stable Diffusion tokenizer (SD 1.x, 2.x, both of SDXL's) is this vocabulary; they differ in the pad token.
CLIP_MERGES = os.path.join(os.path.dirname(__file__), "assets", "clip", "merges.txt.gz")


@functools.cache
def _clip_merges() -> tuple[tuple[str, str], ...]:
    with gzip.open(CLIP_MERGES, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]  # after the "#version" line
    return tuple(tuple(line.split(" ")) for line in lines if line)


def clip_tokenizer(pad: str = "eos", max_length: int = 77):
    """A new copy of CLIP's tokenizer (49,408 tokens) padding with `pad` ("eos", or "!" as OpenCLIP does)."""
    with tempfile.TemporaryDirectory() as folder:
        return write_bpe_tokenizer(folder, _clip_merges(), pad, max_length)


# --- Training a byte-level BPE vocabulary the way CLIPTokenizer applies one ----------------------

END_OF_WORD = "</w>"
# CLIP's pre-tokenizer keeps these contractions as words of their own (ASCII apostrophe only).
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# str.isspace() counts the separators U+001C..U+001F as whitespace; the tokenizers library's regex
# \s (Unicode White_Space) does not, so CLIP treats them as punctuation.
_NOT_SPACE = frozenset("\x1c\x1d\x1e\x1f")
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_char_kinds: dict[str, str] = {}


def _byte_table() -> list[str]:
    """byte value -> its character in byte_characters()' alphabet: printable bytes map to themselves,
    the others, in increasing byte order, to the characters from chr(256) on."""
    chars = byte_characters()
    kept = [ord(c) for c in chars if ord(c) < 256]
    order = kept + sorted(set(range(256)) - set(kept))
    table = [""] * 256
    for byte, char in zip(order, chars):
        table[byte] = char
    return table


_BYTE_TABLE = _byte_table()


def _kind(char: str) -> str:
    """"L" letter, "N" number, " " whitespace, "P" anything else (the classes of CLIP's regex)."""
    kind = _char_kinds.get(char)
    if kind is None:
        if char.isspace() and char not in _NOT_SPACE:
            kind = " "
        else:
            category = unicodedata.category(char)[0]
            kind = category if category in ("L", "N") else "P"
        _char_kinds[char] = kind
    return kind


def _split_words(text: str) -> list[str]:
    """CLIP's word split of normalized text: at each position the first of <|startoftext|>,
    <|endoftext|> (both then split again into "<|", name, "|>" by the byte-level step), the
    contractions, a run of letters, one number character, or a run of other non-space characters."""
    words: list[str] = []
    kinds = [_kind(c) for c in text]
    i, n = 0, len(text)
    while i < n:
        kind = kinds[i]
        if kind == " ":
            i += 1
            continue
        special = next((t for t in SPECIAL_TOKENS if text.startswith(t, i)), None) if text[i] == "<" else None
        if special:
            words += ["<|", special[2:-2], "|>"]
            i += len(special)
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None) if text[i] == "'" else None
        if contraction:
            words.append(contraction)
            i += len(contraction)
            continue
        j = i + 1
        if kind != "N":
            while j < n and kinds[j] == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def pre_tokenize(text: str) -> list[str]:
    """The words CLIPTokenizer runs BPE on, each as byte_characters() symbols of its UTF-8 bytes.

    Like transformers' CLIPTokenizer: exact <|startoftext|>/<|endoftext|> are special tokens and
    split the text; the rest is NFC-normalized and lowercased (its whitespace runs -> " " step
    changes no word) and split into words by CLIP's regex. Character classes come from Python's
    unicodedata, so characters whose Unicode properties differ between its Unicode version and the
    tokenizers library's (mostly ones assigned recently) may be split differently; the merges
    learned stay valid, they only fit such words less well.
    """
    words = []
    for segment in _SPECIAL_SPLIT.split(text):
        # Lowercased a character at a time, as tokenizers does: no final-sigma rule (Σ -> σ always).
        for word in _split_words(unicodedata.normalize("NFC", segment).replace("Σ", "σ").lower()):
            words.append("".join(_BYTE_TABLE[b] for b in word.encode("utf-8")))
    return words


def _merge_pair(symbols: list[str], a: str, b: str) -> list[str]:
    """Replaces each (a, b) in symbols, left to right without overlap, by a + b."""
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i + 1 < n and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _learn_merges(word_counts: dict[str, int], num_merges: int | None, min_frequency: int) -> list[tuple[str, str]]:
    words = [list(w[:-1]) + [w[-1] + END_OF_WORD] for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)  # word indices holding the pair (a superset)
    for index, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[index]
            where[pair].add(index)
    # Max-heap on (count, then smallest pair); an entry is stale once its pair's count has changed.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and (num_merges is None or len(merges) < num_merges):
        negative, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -negative:
            continue
        if count < min_frequency:
            break
        merges.append(pair)
        delta: dict[tuple[str, str], int] = defaultdict(int)
        for index in where.pop(pair):
            symbols = words[index]
            merged = _merge_pair(symbols, *pair)
            if len(merged) == len(symbols):
                continue
            for old in zip(symbols, symbols[1:]):
                delta[old] -= freqs[index]
            for new in zip(merged, merged[1:]):
                delta[new] += freqs[index]
                where[new].add(index)
            words[index] = merged
        for changed, d in delta.items():
            if d == 0:
                continue
            pair_counts[changed] += d
            if pair_counts[changed] > 0:
                heapq.heappush(heap, (-pair_counts[changed], changed))
            else:
                del pair_counts[changed]
                where.pop(changed, None)
    return merges


def train_bpe(texts: Iterable[str], num_merges: int | None = None, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Learns byte-level BPE merges, in order, for a CLIPTokenizer built by write_bpe_tokenizer.

    Texts are split into words as CLIPTokenizer does (see pre_tokenize); a word is its byte
    symbols with "</w>" on the last ("red" -> r, e, d</w>). The most frequent adjacent pair over
    all words is merged, ties going to the lexicographically smallest pair, until num_merges
    merges (None: no limit) or no pair occurs min_frequency times. The result depends only on the
    multiset of words, not on the order of the texts.
    """
    if num_merges is not None and (isinstance(num_merges, bool) or not isinstance(num_merges, int)
                                   or num_merges < 0):
        raise ValueError(f"num_merges must be None or an integer >= 0, got {num_merges!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string")
    word_counts: Counter[str] = Counter()
    seen = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must hold strings, got {type(text).__name__} at position {seen}")
        word_counts.update(pre_tokenize(text))
        seen += 1
    if seen == 0:
        raise ValueError("texts is empty: nothing to train the tokenizer on")
    return _learn_merges(word_counts, num_merges, min_frequency)


def train_tokenizer(texts: Iterable[str], folder: str, num_merges: int | None = None, min_frequency: int = 2,
                    pad: str = "eos", max_length: int = 77):
    """train_bpe(texts, ...) written to `folder` by write_bpe_tokenizer; returns the loaded tokenizer."""
    return write_bpe_tokenizer(folder, train_bpe(texts, num_merges, min_frequency), pad, max_length)
