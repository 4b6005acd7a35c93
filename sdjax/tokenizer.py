"""Prompt tokenization with the checkpoint's CLIP BPE tokenizer (transformers, tokenizer only)."""

from __future__ import annotations

import json
import os
import warnings
from typing import Sequence

import numpy as np

from sdjax.convert.safetensors_io import CheckpointError


def load_tokenizer(folder: str):
    """transformers' CLIPTokenizer from a tokenizer/ folder (vocab.json + merges.txt, or tokenizer.json).

    Always through `from_pretrained(folder)`: in transformers 5, CLIPTokenizer(vocab_file=...,
    merges_file=...) silently builds a 3-token vocabulary.
    """
    from transformers import CLIPTokenizer

    has = lambda name: os.path.isfile(os.path.join(folder, name))
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        raise CheckpointError(f"{folder}: no tokenizer found (needs vocab.json and merges.txt, or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(folder)


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
    from transformers import CLIPTokenizer

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
