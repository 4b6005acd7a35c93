"""Textual inversion embeddings: new words for the text encoders, read from the files users hold.

An embedding is one or more vectors per text encoder that a new token stands for. Loading one adds the
token to each tokenizer and its vectors as new rows of each text encoder's token-embedding table (as
diffusers' load_textual_inversion does), so a prompt then uses the token like any word. An embedding of
n > 1 vectors adds the tokens TOKEN, TOKEN_1, ..., TOKEN_{n-1}; prompts name TOKEN alone and are expanded
before tokenizing (`expand`).

Files read (safetensors by default; pickles only with allow_pickle, and they need PyTorch):
    diffusers   learned_embeds.safetensors / .bin: {token: (D,) or (n, D)}
    A1111       .safetensors {"emb_params": (n, D)}; .pt {"string_to_param": {"*": (n, D)}, "name": ...}
    SDXL        {"clip_l": (n, 768), "clip_g": (n, 1280)} (A1111's and kohya's), for text_encoder / text_encoder_2
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from tokenizers import AddedToken

from sdjax import storage
from sdjax.convert.safetensors_io import CheckpointError, read_safetensors

# SDXL embedding keys -> the text encoder they belong to.
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
SINGLE_KEYS = ("emb_params", "*")  # single-tensor keys that are not a token's name (A1111's)


@dataclasses.dataclass(frozen=True)
class Embedding:
    """A textual-inversion file's vectors: `vectors[encoder]` is (n, D); `encoder` None is the single text
    encoder of an SD 1.x/2.x model. `name` is the token the file names (its key, its "name", or its stem)."""

    path: str
    name: str
    vectors: Mapping[str | None, np.ndarray]

    @property
    def count(self) -> int:
        """Vectors per text encoder (tokens the word stands for)."""
        return len(next(iter(self.vectors.values())))


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _matrix(path: str, key: str, value: Any) -> np.ndarray:
    array = np.asarray(value, np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not array.size:
        raise CheckpointError(f"{path}: {key!r} has shape {tuple(np.shape(value))}; an embedding is (D,) or (n, D)")
    return array


def _read_pickle(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading a pickled embedding needs PyTorch installed") from None
    try:
        data = torch.load(storage.readable(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean the same to the user
        raise CheckpointError(f"{path}: cannot read as a PyTorch embedding ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a textual-inversion embedding (a {type(data).__name__}, not a dict)")

    def plain(value):
        if isinstance(value, torch.Tensor):
            return value.float().numpy()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(data)


def read_embedding(path: str, *, allow_pickle: bool = False) -> Embedding:
    """The vectors of a textual-inversion file in diffusers', A1111's or SDXL's format (module docstring)."""
    path = os.fspath(path)
    if not storage.isfile(path):
        raise CheckpointError(f"{path}: embedding file not found")
    if path.endswith(".safetensors"):
        data: dict[str, Any] = read_safetensors(path)
    elif path.endswith((".pt", ".bin")):
        if not allow_pickle:
            raise CheckpointError(f"{path}: pickled embeddings are not read by default because unpickling can run "
                                  "code; pass allow_pickle=True if you trust this file")
        data = _read_pickle(path)
    else:
        raise CheckpointError(f"{path}: not an embedding file sdjax reads (.safetensors, or .pt/.bin with "
                              "allow_pickle)")
    name = data.get("name") if isinstance(data.get("name"), str) else _stem(path)
    params = data.get("string_to_param")
    if isinstance(params, dict):  # A1111's .pt
        if len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param holds {len(params)} tensors; expected one")
        key, value = next(iter(params.items()))
        return Embedding(path, name, {None: _matrix(path, f"string_to_param.{key}", value)})
    tensors = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    sdxl = {k: v for k, v in tensors.items() if k in SDXL_KEYS}
    if sdxl:
        if len(sdxl) != len(tensors):
            raise CheckpointError(f"{path}: keys {sorted(tensors)}: an SDXL embedding holds clip_l and clip_g only")
        vectors = {SDXL_KEYS[k]: _matrix(path, k, v) for k, v in sdxl.items()}
        counts = {len(v) for v in vectors.values()}
        if len(counts) != 1:
            raise CheckpointError(f"{path}: clip_l and clip_g hold different numbers of vectors "
                                  f"({', '.join(f'{k} {len(v)}' for k, v in sdxl.items())})")
        return Embedding(path, name, vectors)
    if len(tensors) != 1:
        raise CheckpointError(f"{path}: not a textual-inversion embedding: {len(tensors)} tensors "
                              f"({', '.join(sorted(tensors)[:4])}{', ...' if len(tensors) > 4 else ''}); expected "
                              "one (diffusers' {token: vectors}, A1111's emb_params) or SDXL's clip_l and clip_g")
    key, value = next(iter(tensors.items()))
    return Embedding(path, name if key in SINGLE_KEYS else key, {None: _matrix(path, key, value)})


def file_hash(path: str) -> str:
    """A1111's short hash of an embedding file, as its PNG parameters give it ("TI hashes"): the first 12
    hex digits of the SHA-256 of the whole file."""
    return storage.sha256(path)[:12]


def tokens_of(token: str, count: int) -> tuple[str, ...]:
    """The tokens an embedding of `count` vectors adds for `token`: TOKEN, TOKEN_1, ... (diffusers' names)."""
    return (token,) + tuple(f"{token}_{i}" for i in range(1, count))


def expand(prompt: str, words: Mapping[str, tuple[str, ...]]) -> str:
    """`prompt` with each multi-vector word replaced by all of its tokens ("<cat>" -> "<cat> <cat>_1")."""
    for word, tokens in words.items():
        if len(tokens) > 1:  # where the tokenizer matches the word: standing alone, in any case
            joined = " ".join(tokens)
            prompt = re.sub(r"(?<!\w)" + re.escape(word) + r"(?!\w)", lambda _: joined, prompt, flags=re.I)
    return prompt


def words_in(tokenizer) -> dict[str, tuple[str, ...]]:
    """The multi-vector words a saved tokenizer holds as added tokens W, W_1, W_2, ... (what with_textual_inversion
    adds and a saved model keeps), so that a reloaded model expands them again, as diffusers does."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if not t.special}
    words = {}
    for word in added:
        tokens = tokens_of(word, 1)
        while f"{word}_{len(tokens)}" in added:
            tokens += (f"{word}_{len(tokens)}",)
        if len(tokens) > 1 and not re.fullmatch(r".+_\d+", word):
            words[word] = tokens
    return words


def _vectors_for(embedding: Embedding, model) -> dict[str, np.ndarray]:
    """Encoder name -> (n, D) of `embedding` on `model`'s text encoders; the sizes must match."""
    encoders = [enc.encoder for enc in model.text]
    path = embedding.path
    if None in embedding.vectors:
        if len(encoders) != 1:
            raise CheckpointError(f"{path}: one set of vectors, but this model has {len(encoders)} text encoders "
                                  f"({', '.join(encoders)}); an SDXL embedding holds clip_l and clip_g")
        vectors = {encoders[0]: embedding.vectors[None]}
    else:  # SDXL's: the base takes clip_l and clip_g, the refiner (text_encoder_2 alone) clip_g
        missing = [enc for enc in encoders if enc not in embedding.vectors]
        if missing or "text_encoder_2" not in encoders:
            held = ", ".join(k for k, e in SDXL_KEYS.items() if e in embedding.vectors)
            raise CheckpointError(f"{path}: an SDXL embedding ({held}) does not fit this model's text encoders "
                                  f"({', '.join(encoders)})")
        vectors = {enc: embedding.vectors[enc] for enc in encoders}
    for encoder, matrix in vectors.items():
        width = model.networks[encoder].config.hidden_size
        if matrix.shape[1] != width:
            raise CheckpointError(f"{path}: vectors of {matrix.shape[1]} values; {encoder} takes {width} "
                                  "(an embedding for another model family)")
    return vectors


def add_embedding(model, params: Mapping[str, Any], embedding: Embedding, token: str | None = None,
                  override: bool = False) -> tuple[Any, dict[str, Any]]:
    """(model, params) with `embedding`'s word added to every tokenizer and text encoder.

    The token is `token`, else the name the file gives. A token the tokenizer already has (a word of its
    vocabulary, or an embedding loaded before) is refused unless `override`, which then puts the new vectors
    in that token's rows (an earlier embedding must have as many vectors).
    """
    token = embedding.name if token is None else token
    if not token or re.search(r"\s", token):
        raise ValueError(f"{embedding.path}: token {token!r} must be one word without spaces")
    vectors = _vectors_for(embedding, model)
    tokens = tokens_of(token, embedding.count)
    previous = model.embeddings.get(token)
    if previous is not None and len(previous) != len(tokens) and override:
        raise ValueError(f"{embedding.path}: token {token!r} was loaded with {len(previous)} vectors; this embedding "
                         f"has {len(tokens)}")
    tokenizers, networks, params = dict(model.tokenizers), dict(model.networks), dict(params)
    for enc in model.text:
        tokenizer = copy.deepcopy(model.tokenizers[enc.tokenizer])
        known = [t for t in tokens if t in tokenizer.get_vocab()]
        if known and not override:
            raise ValueError(f"{embedding.path}: token {known[0]!r} is already in {enc.tokenizer}'s vocabulary; "
                             "choose another token (sample.py --embedding FILE:TOKEN), or override=True")
        # single_word: the word matches only standing alone, so "tri" never takes the start of "triangle"
        tokenizer.add_tokens([AddedToken(t, single_word=True) for t in tokens])
        ids = np.asarray(tokenizer.convert_tokens_to_ids(list(tokens)))
        module = model.networks[enc.encoder]
        encoder_params = dict(params[enc.encoder])
        embeddings = dict(encoder_params["embeddings"])
        table = embeddings["token_embedding"]["embedding"]
        rows = max(len(tokenizer), table.shape[0])
        grown = jnp.zeros((rows, table.shape[1]), table.dtype).at[:table.shape[0]].set(table)
        grown = grown.at[ids].set(jnp.asarray(vectors[enc.encoder], table.dtype))
        embeddings["token_embedding"] = {"embedding": grown}
        encoder_params["embeddings"] = embeddings
        params[enc.encoder] = encoder_params
        config = module.config
        # transformers' legacy eos id 2 pools at the highest token id, which a new token would now be:
        # pool at the tokenizer's real end token instead (the same position for every prompt without one).
        eos = tokenizer.eos_token_id if config.eos_token_id == 2 else config.eos_token_id
        networks[enc.encoder] = module.clone(config=dataclasses.replace(config, vocab_size=rows, eos_token_id=eos))
        tokenizers[enc.tokenizer] = tokenizer
    words = {**model.embeddings, token: tokens}
    return model.replace(networks=networks, tokenizers=tokenizers, embeddings=words), params


# --- Training (config.textual_inversion of task "unet") --------------------------------------------------

TRAINED = "textual_inversion"  # the trained network's name: the new rows (sdjax.models.token_rows)


def initial_rows(model, params: Mapping[str, Any], initializer: str, vectors: int) -> dict[str, np.ndarray]:
    """Per text encoder (vectors, width) rows that all start as the mean embedding of `initializer`'s tokens."""
    rows = {}
    for enc in model.text:
        ids = model.tokenizers[enc.tokenizer]([initializer], add_special_tokens=False)["input_ids"][0]
        if not ids:
            raise ValueError(f"textual_inversion.initializer {initializer!r} has no tokens")
        table = np.asarray(params[enc.encoder]["embeddings"]["token_embedding"]["embedding"], np.float32)
        rows[enc.encoder] = np.repeat(table[ids].mean(axis=0, keepdims=True), vectors, axis=0)
    return rows


def placeholder(model, params: Mapping[str, Any], token: str, initializer: str,
                vectors: int) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
    """(model, params, rows): `model` with `token` added (`vectors` of them, started from `initializer`), and
    the rows the training starts from."""
    rows = initial_rows(model, params, initializer, vectors)
    start = Embedding("config.textual_inversion", token, {enc: rows[enc] for enc in rows} if len(rows) > 1
                      else {None: next(iter(rows.values()))})
    model, params = add_embedding(model, params, start, token)
    return model, params, rows


def row_ids(model, token: str) -> dict[str, np.ndarray]:
    """Text encoder -> the ids of `token`'s rows in its table (model.embeddings must hold the token)."""
    return {enc.encoder: np.asarray(model.tokenizers[enc.tokenizer].convert_tokens_to_ids(list(model.embeddings[token])))
            for enc in model.text}


def with_rows(params: Mapping[str, Any], ids: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A training run's parameters ({..., TRAINED: {encoder: rows}}) as the networks run with them: each
    text encoder's table with the trained rows in place of the token's."""
    out = {k: v for k, v in params.items() if k != TRAINED}
    for encoder, rows in params[TRAINED].items():
        encoder_params = out[encoder]
        table = encoder_params["embeddings"]["token_embedding"]["embedding"]
        table = table.at[ids[encoder]].set(rows.astype(table.dtype))
        out[encoder] = {**encoder_params, "embeddings": {**encoder_params["embeddings"],
                                                         "token_embedding": {"embedding": table}}}
    return out


def file_name(token: str) -> str:
    """The A1111 embedding file's name for `token`: A1111 names an embedding by its file, so the token,
    without the characters file systems refuse (<tri> -> tri.safetensors)."""
    stem = re.sub(r'[<>:"/\\|?*\s]', "", token) or "embedding"
    return stem + ".safetensors"


def save_embedding(folder: str, model, rows: Mapping[str, Any], token: str) -> list[str]:
    """Writes the trained rows as diffusers' learned_embeds.safetensors ({token: (n, D)}; SDXL's second
    encoder in learned_embeds_2.safetensors, as diffusers' SDXL script writes it) and as an A1111 embedding
    (emb_params, or SDXL's clip_l / clip_g). Returns the file names."""
    from sdjax.convert.safetensors_io import write_safetensors

    host = {encoder: np.asarray(value, np.float32) for encoder, value in rows.items()}
    names = []
    for enc in model.text:
        name = "learned_embeds" + enc.encoder.removeprefix("text_encoder") + ".safetensors"
        write_safetensors(os.path.join(folder, name), {token: host[enc.encoder]})
        names.append(name)
    if "text_encoder_2" in host:
        a1111 = {key: host[encoder] for key, encoder in SDXL_KEYS.items() if encoder in host}
    else:
        a1111 = {"emb_params": next(iter(host.values()))}
    names.append(file_name(token))
    write_safetensors(os.path.join(folder, names[-1]), a1111)
    return names
