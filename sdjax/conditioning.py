"""Text conditioning as one piece: prompts -> token ids per tokenizer -> (context sequence, pooled embedding).

A model conditions on one or more (tokenizer, text encoder) pairs of its folder:

    SD 1.x/2.x    tokenizer + text_encoder: the last hidden state after the final LayerNorm
    SDXL base     tokenizer + text_encoder and tokenizer_2 + text_encoder_2: each one's penultimate hidden
                  state, concatenated on features (768 + 1280); pooled: text_encoder_2's projected EOS
    SDXL refiner  tokenizer_2 + text_encoder_2 alone, the same way

A UNet with SDXL's added conditioning also takes time ids (sizes and crop, or the aesthetic score),
which the sampler or the training batch supplies with the text. Sampling, training, plan.py and the
benchmarks all go through `tokenizer_fn`, `encode_text` and `unet_call`, so a family changes this
file, not its callers.

Token ids travel as a dict keyed by batch name: the ids of tokenizer `tokenizer` as "input_ids", of
`tokenizer_2` as "input_ids_2", the keys the data pipeline's batches use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.params import abstract_params
from sdjax.tokenizer import tokenize


@dataclasses.dataclass(frozen=True)
class TextEncoding:
    """One (tokenizer, text encoder) pair of a model folder and what the conditioning takes from it."""

    tokenizer: str         # component names in the folder
    encoder: str
    hidden_layer: int | None = None  # None: the last hidden state (final LayerNorm); k: hidden_states[k]
    pooled: bool = False   # contributes the pooled embedding

    @property
    def ids(self) -> str:
        """The batch key of this tokenizer's ids: input_ids, input_ids_2, ..."""
        return "input_ids" + self.tokenizer.removeprefix("tokenizer")

    @property
    def weights(self) -> str:
        """The batch key of per-token weights (A1111's prompt syntax): token_weights, token_weights_2, ..."""
        return "token_weights" + self.tokenizer.removeprefix("tokenizer")


def text_encodings(networks: Sequence[str]) -> tuple[TextEncoding, ...]:
    """The text pairs of a model with these networks (component names); text_encoder's tokenizer is
    `tokenizer`, text_encoder_2's `tokenizer_2`, as diffusers names them."""
    if "text_encoder_2" in networks:  # SDXL: the penultimate layers, the pooled output of the second
        first = (TextEncoding("tokenizer", "text_encoder", -2),) if "text_encoder" in networks else ()
        return first + (TextEncoding("tokenizer_2", "text_encoder_2", -2, pooled=True),)
    if "text_encoder" in networks:
        return (TextEncoding("tokenizer", "text_encoder"),)
    raise ValueError(f"no text encoder among the networks {sorted(networks)}")


class Conditioning(NamedTuple):
    """What the UNet is conditioned on, per image. A pytree: guidance concatenates it leaf by leaf."""

    context: jax.Array                # (N, L, D): the cross-attention sequence
    pooled: jax.Array | None = None   # (N, P): the pooled text embedding (SDXL)
    time_ids: jax.Array | None = None  # (N, n): SDXL's micro-conditioning (see unet_call)


class TokenizerFn:
    """prompts -> {batch key: int32 ids (N, L)} for each of a model's tokenizers. A plain object so that
    grain's worker processes can pickle it (it holds the tokenizers, not the model or its weights).
    `words` are the model's multi-vector textual-inversion words, expanded to their tokens first."""

    def __init__(self, tokenizers: Mapping[str, tuple[Any, int]], words: Mapping[str, tuple[str, ...]] = {}):
        self.tokenizers = dict(tokenizers)  # batch key -> (tokenizer, sequence length)
        self.words = dict(words)

    def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        prompts = _expand(prompts, self.words)
        return {key: tokenize(tok, prompts, length) for key, (tok, length) in self.tokenizers.items()}


def _expand(prompts: Sequence[str], words: Mapping[str, tuple[str, ...]]) -> list[str]:
    if not words:
        return list(prompts)
    from sdjax.textual_inversion import expand

    return [expand(p, words) for p in prompts]


def _id_lengths(model) -> dict[str, int]:
    """Batch key -> sequence length of each text encoding of `model` (its encoder's max_position_embeddings)."""
    return {enc.ids: model.networks[enc.encoder].config.max_position_embeddings for enc in model.text}


def tokenizer_fn(model) -> TokenizerFn:
    """The tokenizers of `model` (a sdjax.Model), each padding to its encoder's max_position_embeddings."""
    lengths = _id_lengths(model)
    return TokenizerFn({enc.ids: (model.tokenizers[enc.tokenizer], lengths[enc.ids]) for enc in model.text},
                       model.embeddings)


PROMPT_SYNTAXES = ("plain", "a1111")


def tokenize_prompts(model, prompts: Sequence[str], syntax: str = "plain") -> dict[str, np.ndarray]:
    """Prompts -> the token inputs of `encode_text`, for each of `model`'s tokenizers.

    syntax "plain": the text as written, one window (longer prompts are truncated, as CLIP does).
    "a1111": A1111's weighting brackets, BREAK and long prompts (sdjax.prompt_syntax): ids and
    per-token weights (N, chunks x positions), every prompt padded with empty chunks to the largest
    chunk count among `prompts` (pass a prompt and its negative together to give them one count).
    """
    if syntax == "plain":
        return tokenizer_fn(model)(prompts)
    if syntax != "a1111":
        raise ValueError(f"prompt syntax {syntax!r} is unknown; known: {', '.join(PROMPT_SYNTAXES)}")
    from sdjax import prompt_syntax

    out, lengths = {}, _id_lengths(model)
    prompts = _expand(prompts, model.embeddings)
    for enc in model.text:
        out[enc.ids], out[enc.weights] = prompt_syntax.batch(model.tokenizers[enc.tokenizer], prompts,
                                                             lengths[enc.ids])
    return out


def prompt_chunks(model, prompt: str, syntax: str = "plain") -> int:
    """How many encoder windows `prompt` takes in `syntax` (1 for plain prompts)."""
    if syntax == "plain":
        return 1
    from sdjax import prompt_syntax

    enc = model.text[0]
    (prompt,) = _expand([prompt], model.embeddings)
    return prompt_syntax.chunk_count(model.tokenizers[enc.tokenizer], prompt, _id_lengths(model)[enc.ids])


def abstract_ids(model, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of `tokenizer_fn(model)`'s output for `batch` prompts (for lowering without data)."""
    return {key: jax.ShapeDtypeStruct((batch, length), jnp.int32) for key, length in _id_lengths(model).items()}


def abstract_conditioning(model, batch: int) -> Conditioning:
    """The shapes of the Conditioning of `batch` images (for lowering without data)."""
    params = {enc.encoder: abstract_params(model.networks[enc.encoder]) for enc in model.text}
    cond = jax.eval_shape(lambda p, ids: encode_text(model, p, ids), params, abstract_ids(model, batch))
    if takes_added_conditions(model):
        cond = cond._replace(time_ids=jax.ShapeDtypeStruct((batch, time_id_count(model)), jnp.float32))
    return cond


def time_id_count(model) -> int:
    """How many time ids `model`'s UNet takes per image (SDXL base 6, refiner 5), checked as `time_ids` does."""
    return len(time_ids(model, MicroConditioning(), 8, 8))  # the count does not depend on the size


def encode_text(model, params: Mapping[str, Any], ids: Mapping[str, jax.Array]) -> Conditioning:
    """Token ids (as from `tokenizer_fn` or `tokenize_prompts`) -> Conditioning, with `params` holding
    each text encoder's.

    Ids longer than the encoder's window are windows laid end to end: each is encoded alone and the
    hidden states concatenated along the sequence; the pooled embedding is the first window's (as A1111
    does). With per-token weights (A1111's syntax), each window's hidden states are scaled per token and
    then rescaled so that their mean over tokens and features is what it was (A1111's "original"
    emphasis, per prompt and window).
    """
    contexts, pooled = [], None
    for enc in model.text:
        module = model.networks[enc.encoder]
        tokens = ids[enc.ids]
        n, total = tokens.shape
        window = module.config.max_position_embeddings
        if total % window:
            raise ValueError(f"{enc.ids} has {total} positions, not a multiple of the text encoder's {window}")
        chunks = total // window
        hidden, pool = module.apply({"params": params[enc.encoder]}, tokens.reshape(n * chunks, window),
                                    enc.hidden_layer)
        if enc.weights in ids:
            hidden = emphasize(hidden, ids[enc.weights].reshape(n * chunks, window))
        contexts.append(hidden.reshape(n, chunks * window, hidden.shape[-1]))
        if enc.pooled:
            pooled = pool.reshape(n, chunks, -1)[:, 0]
    context = contexts[0] if len(contexts) == 1 else jnp.concatenate(contexts, axis=-1)
    return Conditioning(context, pooled)


def emphasize(hidden: jax.Array, weights: jax.Array) -> jax.Array:
    """Hidden states (B, L, D) scaled by per-token weights (B, L), each row's mean then restored."""
    z = hidden.astype(jnp.float32)
    weighted = z * weights.astype(jnp.float32)[..., None]
    ratio = z.mean(axis=(1, 2), keepdims=True) / weighted.mean(axis=(1, 2), keepdims=True)
    return (weighted * ratio).astype(hidden.dtype)


def zeroes_empty_prompts(model) -> bool:
    """Whether `model` (model_index.json's force_zeros_for_empty_prompt, SDXL) stands for "no prompt" with
    zeroed text embeddings rather than the encoded empty string: sampling without a negative prompt,
    and training with a dropped caption."""
    return bool(model.model_index.get("force_zeros_for_empty_prompt", False))


def batch_conditioning(model, params: Mapping[str, Any], batch: Mapping[str, jax.Array],
                       size: tuple[int, int]) -> Conditioning:
    """The conditioning of a training batch of size[0] x size[1] images: its ids encoded, with SDXL's
    additions as SDXL trains them: the text zeroed (context and pooled) where "caption_dropped", and
    time ids from each example's "original_size" and "crop_top_left" with `size` as the target size."""
    cond = encode_text(model, params, batch)
    if zeroes_empty_prompts(model):
        keep = 1.0 - batch["caption_dropped"].astype(jnp.float32)
        cond = jax.tree.map(lambda x: x * keep.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), cond)
    if takes_added_conditions(model):
        if uses_aesthetic_score(model):  # the build of a training task refuses these first
            raise ValueError("training a UNet conditioned on aesthetic scores (an SDXL refiner) needs a score "
                             "per image, which the training data does not carry")
        target = jnp.broadcast_to(jnp.asarray(size, jnp.float32), batch["original_size"].shape)
        ids = [batch["original_size"].astype(jnp.float32), batch["crop_top_left"].astype(jnp.float32), target]
        cond = cond._replace(time_ids=jnp.concatenate(ids, axis=-1))
    return cond


def takes_added_conditions(model) -> bool:
    """Whether `model`'s UNet takes SDXL's pooled embedding and time ids."""
    return model.unet.config.addition_embed_type == "text_time"


def unet_call(model, params: Mapping[str, Any]) -> Callable[[jax.Array, jax.Array, Conditioning], jax.Array]:
    """unet_fn(x, t, conditioning) -> the prediction of `model`'s UNet with `params["unet"]`."""
    unet, variables = model.unet, {"params": params["unet"]}
    if takes_added_conditions(model):
        return lambda x, t, cond: unet.apply(variables, x, t, cond.context, cond.pooled, cond.time_ids)
    return lambda x, t, cond: unet.apply(variables, x, t, cond.context)


@dataclasses.dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning of one side of guidance (diffusers' names and defaults):
    original_size and target_size default to the image's (height, width), the crop to (0, 0); the
    refiner takes an aesthetic score instead of the target size."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0


def _pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum for v in value)):
        kind = "positive" if minimum > 0 else "non-negative"
        raise ValueError(f"{name}: expected a pair of {kind} integers (height, width), got {value!r}")
    return int(value[0]), int(value[1])


def uses_aesthetic_score(model) -> bool:
    """Whether `model`'s UNet takes an aesthetic score in place of the target size (SDXL's refiner)."""
    return bool(model.model_index.get("requires_aesthetics_score", False))


def time_ids(model, micro: MicroConditioning, height: int, width: int, prefix: str = "") -> np.ndarray:
    """The time ids (float32 (n,)) of `micro` for a height x width image, checked against `model`'s UNet:
    original size + crop top-left + target size (base), or + aesthetic score (refiner)."""
    original = _pair(prefix + "original_size", micro.original_size or (height, width), 1)
    crop = _pair(prefix + "crops_coords_top_left", micro.crops_coords_top_left, 0)
    if uses_aesthetic_score(model):
        if not np.isfinite(micro.aesthetic_score):
            raise ValueError(f"{prefix}aesthetic_score must be a finite number, got {micro.aesthetic_score}")
        last = (float(micro.aesthetic_score),)
    else:
        last = _pair(prefix + "target_size", micro.target_size or (height, width), 1)
    ids = np.asarray(original + crop + last, np.float32)
    cfg = model.unet.config
    pooled = sum(model.networks[e.encoder].config.projection_dim for e in model.text if e.pooled)
    if pooled + len(ids) * cfg.addition_time_embed_dim != cfg.projection_class_embeddings_input_dim:
        raise ValueError(f"the UNet takes {cfg.projection_class_embeddings_input_dim} added features, not the "
                         f"{pooled} pooled + {len(ids)} time ids x {cfg.addition_time_embed_dim} of "
                         f"{'an aesthetic score' if uses_aesthetic_score(model) else 'a target size'}: "
                         "model_index.json's requires_aesthetics_score does not match the UNet")
    return ids
