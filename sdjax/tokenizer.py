"""Prompt tokenization with the checkpoint's CLIP BPE tokenizer (transformers, tokenizer only)."""

from __future__ import annotations

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
