"""A1111's prompt syntax: words weighted by brackets, BREAK, and prompts longer than one text-encoder window.

    (word)  x1.1     ((word))  x1.21     (word:1.3)  x1.3     [word]  /1.1
    \\( \\) \\[ \\] \\\\  the literal character     BREAK  ends the current chunk

A prompt is split into weighted fragments (`parse`), each fragment tokenized alone, and the tokens laid
out in chunks of (positions - 2) tokens (75 for CLIP's 77) that are each encoded as a prompt of their
own: BOS, the chunk's tokens, EOS, padding (`chunk`). The encoder's outputs of all chunks are concatenated
along the sequence and weighted per token with the mean restored (sdjax.conditioning.encode_text).

These are the rules of AUTOMATIC1111's modules/prompt_parser.py (parse_prompt_attention) and
modules/sd_hijack_clip.py (chunking with comma backtracking), written anew. Two deliberate
differences: a closing bracket with nothing open and a bracketed weight that is not a number
("(word:abc)") are errors naming their position (A1111 keeps them as literal text), and `\\:` is a
literal colon. Opening brackets left open weigh everything to the end of the prompt, as in A1111.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

ROUND = 1.1        # (word) multiplies by this, [word] divides by it
COMMA_BACKTRACK = 20  # a full chunk breaks after its last comma if that is at most this many tokens back


class PromptSyntaxError(ValueError):
    """A prompt that A1111's syntax cannot weigh: the message names the position (0-based) and the problem."""


_TOKEN = re.compile(r"""
    \\[()\[\]\\:]            # an escaped bracket, backslash or colon: the literal character
  | \\                      # a lone backslash: dropped, as A1111 does
  | \(                      # opens a group weighted x1.1, or by its ':number)'
  | \[                      # opens a group weighted /1.1
  | :\s*([^\s()\[\]:\\]*)\s*\)   # ':weight)' closing a round group
  | \)
  | \]
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon inside text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")


@dataclasses.dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one weight; `text` None is a BREAK."""

    text: str | None
    weight: float = 1.0


def parse(prompt: str) -> list[Fragment]:
    """`prompt` -> its fragments with their weights, neighbours of equal weight merged (A1111's rules).

    >>> [(f.text, round(f.weight, 4)) for f in parse("an (important) word")]
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text or None, weight]
    round_open: list[int] = []   # indices into pieces where each open group starts
    square_open: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(prompt):
        text, at = match.group(0), match.start()
        if text.startswith("\\"):
            pieces.append([text[1:], 1.0])
        elif text == "(":
            round_open.append(len(pieces))
        elif text == "[":
            square_open.append(len(pieces))
        elif match.group(1) is not None:  # ':weight)'
            if not round_open:
                raise PromptSyntaxError(f"prompt position {at}: ')' closes no '(' in {_excerpt(prompt, at)}")
            value = match.group(1)
            if not _NUMBER.fullmatch(value):
                raise PromptSyntaxError(f"prompt position {at + text.index(value) if value else at}: weight "
                                        f"{value!r} is not a number in {_excerpt(prompt, at)} (a literal colon "
                                        "is written \\:)")
            weigh(round_open.pop(), float(value))
        elif text in ")]":
            stack = round_open if text == ")" else square_open
            if not stack:
                opener = "(" if text == ")" else "["
                raise PromptSyntaxError(f"prompt position {at}: {text!r} closes no {opener!r} in "
                                        f"{_excerpt(prompt, at)} (a literal bracket is written \\{text})")
            weigh(stack.pop(), ROUND if text == ")" else 1 / ROUND)
        else:
            for i, part in enumerate(_BREAK.split(text)):
                if i:
                    pieces.append([None, -1.0])
                pieces.append([part, 1.0])
    for start in round_open:  # left open: weighs to the end, as A1111 does
        weigh(start, ROUND)
    for start in square_open:
        weigh(start, 1 / ROUND)
    fragments: list[Fragment] = []
    for text, weight in pieces:  # neighbours merge only when adjacent (an empty piece between keeps them apart)
        if text is None:
            fragments.append(Fragment(None))
        elif fragments and fragments[-1].text is not None and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight)
        else:
            fragments.append(Fragment(text, weight))
    fragments = [f for f in fragments if f.text != ""]
    return fragments or [Fragment("", 1.0)]


def _excerpt(prompt: str, at: int, width: int = 24) -> str:
    """The prompt around position `at`, for error messages."""
    start = max(0, at - width)
    return repr(("..." if start else "") + prompt[start:at + width] + ("..." if at + width < len(prompt) else ""))


@dataclasses.dataclass(frozen=True)
class Chunks:
    """One prompt laid out for a text encoder: ids and per-token weights, (chunks, positions) each."""

    ids: np.ndarray      # int32
    weights: np.ndarray  # float32; BOS, EOS and padding weigh 1


def chunk(tokenizer, prompt: str, positions: int, backtrack: int = COMMA_BACKTRACK) -> Chunks:
    """`prompt` in A1111's syntax as chunks for an encoder with `positions` positions (77 for CLIP).

    Each chunk holds up to positions - 2 tokens; BREAK starts a new one, and a chunk that fills up
    breaks after its last comma instead when that comma is at most `backtrack` tokens back (A1111's
    comma padding; 0 turns it off). An empty prompt is one chunk.
    """
    fragments = parse(prompt)
    texts = [f.text for f in fragments if f.text is not None]
    tokenized = iter(tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"] if texts else [])
    length = positions - 2
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        filler = positions - 2 - len(tokens)
        chunks.append(([bos] + tokens + [eos] + [pad] * filler, [1.0] + weights + [1.0] * (filler + 1)))
        tokens, weights, last_comma = [], [], -1

    for fragment in fragments:
        if fragment.text is None:
            close()
            continue
        for token in next(tokenized):
            if token == comma:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == length and last_comma != -1 and len(tokens) - last_comma <= backtrack:
                carried, carried_weights = tokens[last_comma + 1:], weights[last_comma + 1:]
                tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                close()
                tokens, weights = carried, carried_weights
            if len(tokens) == length:
                close()
            tokens.append(token)
            weights.append(fragment.weight)
    if tokens or not chunks:
        close()
    return Chunks(np.asarray([c[0] for c in chunks], np.int32), np.asarray([c[1] for c in chunks], np.float32))


def empty_chunk(tokenizer, positions: int) -> Chunks:
    """The chunk of the empty prompt: what shorter prompts are padded with to a common chunk count."""
    return chunk(tokenizer, "", positions)


def batch(tokenizer, prompts: Sequence[str], positions: int, count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> ids (int32) and weights (float32), each (N, chunks x positions): every prompt's chunks
    followed by empty ones up to the largest chunk count among them (at least `count`)."""
    laid = [chunk(tokenizer, p, positions) for p in prompts]
    count = max([count] + [len(c.ids) for c in laid])
    empty = empty_chunk(tokenizer, positions)
    ids = [np.concatenate([c.ids] + [empty.ids] * (count - len(c.ids))).reshape(-1) for c in laid]
    weights = [np.concatenate([c.weights] + [empty.weights] * (count - len(c.ids))).reshape(-1) for c in laid]
    return np.stack(ids), np.stack(weights)


def chunk_count(tokenizer, prompt: str, positions: int) -> int:
    """How many chunks `prompt` takes (prompts batched together are padded to the same count)."""
    return len(chunk(tokenizer, prompt, positions).ids)
