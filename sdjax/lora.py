"""LoRA: low-rank deltas on a model's weights, W + scale · (alpha / rank) · up @ down, read from the files
people hold, several at once, each with its own scale.

    kohya     lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha    (text: lora_te_, SDXL lora_te1_ /
              lora_te2_); <module> is the diffusers module path with "_" for "." (SD 1.x) or the original
              LDM one (SDXL: input_blocks_4_1_...); 3x3 conv LoRA (LoCon): a 3x3 down and a 1x1 up.
    PEFT      unet.<module>.lora_A.weight / .lora_B.weight (text_encoder. / text_encoder_2.), alpha from the
              file's lora_adapter_metadata (diffusers writes it) or the rank.

A file is matched onto a model strictly: every key must name a weight of it, and fit its shape. LyCORIS
files (LoHa, LoKr, DoRA, ...) are refused by name.

Two forms, one formula (`delta`):
    merged      `merge(params, loras)`: new weights with the deltas added (fastest sampling); the caller keeps
                the original tree, so removing the LoRAs gives the original weights back bitwise.
    run time    `with_runtime(params, loras)`: the factors and scales ride in params["loras"] and `resolve`
                adds the deltas inside the compiled program, so a new scale does not recompile; training
                trains the factors this way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from sdjax import storage
from sdjax.convert.diffusers import COMPONENTS, read_pickle_weights
from sdjax.convert.ldm import ldm_keys
from sdjax.convert.safetensors_io import CheckpointError, read_safetensors, read_safetensors_metadata
from sdjax.convert.state_dict import torch_key, torch_shape
from sdjax.models.params import abstract_params

RUNTIME = "loras"  # the params entry holding run-time LoRAs: {"factors": (tree, ...), "scales": (n,)}
TRAINED = "lora"   # a training run's LoRAFactors network: one factor tree, applied at alpha / rank
# kohya's default targets: the linear (and 1x1 conv) layers of the UNet's transformer blocks, and the
# text encoders' attention and MLP projections (diffusers / transformers module names, searched).
UNET_TARGETS = (r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)"
                r"|ff\.net\.(0\.proj|2)))$")
TEXT_TARGETS = r"self_attn\.(q|k|v|out)_proj$|mlp\.fc[12]$"
# kohya's prefixes -> network. SD 1.x/2.x text LoRAs use lora_te_, SDXL's lora_te1_ / lora_te2_.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# Key fragments of LyCORIS and other non-LoRA adapters, refused by name.
REFUSED = {"hada_w1_a": "LyCORIS LoHa", "hada_w2_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr",
           "lokr_w2": "LyCORIS LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
           "lora_mid.weight": "LyCORIS LoCon with a Tucker mid factor", ".diff": "a full weight difference (LyCORIS)",
           "on_input": "(IA)^3", "oft_blocks": "OFT", "oft_diag": "OFT", "lora_te3_": "SD3's third text encoder"}
_KOHYA_LEAF = re.compile(r"^(?P<module>lora_(?:unet|te|te1|te2)_[^.]+)\."
                         r"(?P<leaf>lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT_LEAF = re.compile(r"^(?P<module>.+)\.(?P<leaf>lora_A\.weight|lora_B\.weight|alpha)$")


@dataclasses.dataclass(frozen=True, eq=False)
class LoRA:
    """A LoRA file matched onto a model. `factors[network]` is a tree like that network's parameters,
    holding {"down": (..., in, rank), "up": (rank, out)} (float32, our layout, alpha / rank folded into
    "up") where the file changes a kernel. `name` is the file's stem (A1111's <lora:name:scale>), `keys`
    how many tensors of the file were used (all of them). a1111_hash(path) gives A1111's short hash."""

    name: str
    path: str
    factors: Mapping[str, Any]
    keys: int


def a1111_hash(path: str) -> str:
    """A1111's short LoRA hash: the first 12 hex digits of the SHA-256 of a safetensors file's data after
    its header (the "addnet" hash kohya's scripts also store as sshs_model_hash); of the whole file for
    other formats."""
    start = 8 + int.from_bytes(storage.read_range(path, 0, 8), "little") if path.endswith(".safetensors") else 0
    return storage.sha256(path, start)[:12]


def module_names(network: str, config: Any, params: Any) -> dict[str, tuple[str, ...]]:
    """Every name a LoRA file may give a kernel of `network` -> its Flax path: the diffusers /
    transformers module path (PEFT; text encoders also without "text_model."), the same with "_" for "."
    (kohya), and for the UNet the original LDM path with "_" (kohya's SDXL files)."""
    kernels = {module_name(network, path): path for path in flatten_dict(unfreeze(params)) if path[-1] == "kernel"}
    ldm = ldm_keys(network, config, [torch_key(path) for path in kernels.values()]) if network == "unet" else {}
    names: dict[str, tuple[str, ...]] = {}
    for module, path in kernels.items():
        aliases = {module, module.replace(".", "_")}
        if module.startswith("text_model."):
            aliases.add(module.removeprefix("text_model."))
        if torch_key(path) in ldm:
            aliases.add(ldm[torch_key(path)].removesuffix(".weight").replace(".", "_"))
        for alias in aliases:
            if names.setdefault(alias, path) != path:
                raise AssertionError(f"LoRA module name {alias!r} is ambiguous in {network}")
    return names


def _read(path: str, allow_pickle: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if path.endswith(".safetensors"):
        return read_safetensors(path), read_safetensors_metadata(path)
    if path.endswith((".pt", ".ckpt", ".bin")):
        return read_pickle_weights(path, allow_pickle), {}
    raise CheckpointError(f"{path}: not a LoRA file sdjax reads (.safetensors, or .pt/.ckpt/.bin with allow_pickle)")


def _peft_alphas(metadata: Mapping[str, str], network: str) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) of a network from diffusers' lora_adapter_metadata, where present."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    config = json.loads(raw)
    prefix = f"{network}."
    return config.get(prefix + "lora_alpha"), dict(config.get(prefix + "alpha_pattern") or {})


def _group(path: str, tensors: Mapping[str, np.ndarray]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """(network, module name in the file) -> {"down", "up", "alpha" where given, "peft": its format} of a
    kohya or PEFT file."""
    for key in tensors:
        refused = next((what for fragment, what in REFUSED.items() if fragment in key), None)
        if refused:
            raise CheckpointError(f"{path}: a {refused} file (key {key!r}); sdjax reads LoRA (kohya, PEFT) only")
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    leaf_names = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up",
                  "lora_B.weight": "up", "alpha": "alpha"}
    for key, value in tensors.items():
        match = _KOHYA_LEAF.match(key) or _PEFT_LEAF.match(key)
        module = match and match.group("module")
        prefixes = KOHYA_PREFIXES if module and module.startswith("lora_") else PEFT_PREFIXES
        prefix = next((p for p in prefixes if module and module.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(f"{path}: key {key!r} is not a LoRA key sdjax reads (kohya lora_unet_/lora_te*_ "
                                  "... .lora_down/.lora_up/.alpha, or PEFT unet./text_encoder*. ... .lora_A/.lora_B)")
        group = groups.setdefault((prefixes[prefix], module[len(prefix):]), {"peft": prefixes is PEFT_PREFIXES})
        group[leaf_names[match.group("leaf")]] = value
    return groups


def read_lora(path: str, model: Any, params: Mapping[str, Any], *, allow_pickle: bool = False) -> LoRA:
    """The LoRA file at `path` matched onto `model` (a sdjax Model) with `params` (for the kernel shapes):
    every key used, every factor shape fitting its weight, or a CheckpointError naming the key."""
    path = os.fspath(path)
    if not storage.isfile(path):
        raise CheckpointError(f"{path}: LoRA file not found")
    tensors, metadata = _read(path, allow_pickle)
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    groups = _group(path, tensors)
    names = {n: module_names(n, model.networks[n].config, params[n]) for n in {n for n, _ in groups}
             if n in model.networks}
    matched = sum(module in names.get(network, {}) for network, module in groups)
    unmatched = [(n, m) for n, m in groups if m not in names.get(n, {})]
    if unmatched:
        network, module = unmatched[0]
        raise CheckpointError(f"{path}: {len(groups) - matched} of its {len(groups)} LoRA modules match nothing in "
                              f"this model ({matched} matched), first {module!r} for {network}"
                              + ("" if network in model.networks else f" (the model has no {network})"))
    peft_alphas = {network: _peft_alphas(metadata, network) for network in names}
    flat: dict[str, dict[tuple, Any]] = {}
    for (network, module), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise CheckpointError(f"{path}: LoRA module {module!r} has no {'up' if 'down' in parts else 'down'} "
                                  "factor")
        kernel_path = names[network][module]
        kernel_shape = _kernel_shape(params[network], kernel_path)
        down, up = _factors(path, network, module, parts["down"], parts["up"], kernel_shape, kernel_path)
        rank = down.shape[-1]
        alpha = parts.get("alpha")
        if alpha is None and parts["peft"]:
            default, pattern = peft_alphas[network]
            alpha = next((a for p, a in pattern.items() if re.match(rf"(.*\.)?({p})$", module)), default)
        if alpha is not None and np.size(alpha) != 1:
            raise CheckpointError(f"{path}: LoRA module {module!r} has an alpha of shape {np.shape(alpha)}, not one "
                                  "number")
        alpha = rank if alpha is None else float(np.asarray(alpha, np.float32).reshape(()))
        flat.setdefault(network, {})[kernel_path + ("down",)] = down
        flat[network][kernel_path + ("up",)] = up * np.float32(alpha / rank)
    factors = {network: unflatten_dict(leaves) for network, leaves in flat.items()}
    return LoRA(os.path.splitext(os.path.basename(path))[0], path, factors, len(tensors))


def _kernel_shape(tree: Any, path: tuple[str, ...]) -> tuple[int, ...]:
    for name in path:
        tree = tree[name]
    return tuple(tree.shape)


def _factors(path: str, network: str, module: str, down: np.ndarray, up: np.ndarray, kernel_shape: tuple[int, ...],
             kernel_path: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The file's factors (PyTorch layout: down (r, in[, kh, kw]), up (out, r[, 1, 1])) in ours: down
    (..., in, r) shaped like the kernel's leading axes, up (r, out)."""
    down32, up32 = np.asarray(down, np.float32), np.asarray(up, np.float32)
    rank = down32.shape[0] if down32.ndim else 0
    ours_down = np.transpose(down32, (2, 3, 1, 0)) if down32.ndim == 4 else down32.T
    fits = (down32.ndim in (2, 4) and up32.ndim in (2, 4) and up32.shape[1] == rank
            and all(d == 1 for d in up32.shape[2:]) and up32.shape[0] == kernel_shape[-1]
            and int(np.prod(ours_down.shape)) == int(np.prod(kernel_shape[:-1])) * rank
            and (ours_down.shape[:-1] == kernel_shape[:-1] or ours_down.shape[-2] == kernel_shape[-2]))
    if not fits:
        raise CheckpointError(f"{path}: LoRA module {module!r} (down {tuple(down.shape)}, up {tuple(up.shape)}) does "
                              f"not fit {network}'s weight of shape {torch_shape(kernel_path, kernel_shape)}")
    return ours_down.reshape(*kernel_shape[:-1], rank), up32.reshape(up32.shape[0], rank).T


def delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """The weight change down @ up in our kernel layout (dense (in, out), conv (kh, kw, in, out)), float32."""
    return jnp.einsum("...ir,ro->...io", down.astype(jnp.float32), up.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def _add(weight: jax.Array, factors: Sequence[tuple[jax.Array, jax.Array]], scales: Sequence[jax.Array]) -> jax.Array:
    total = weight.astype(jnp.float32)
    for (down, up), scale in zip(factors, scales):
        total = total + scale * delta(down, up)
    return total.astype(weight.dtype)


def _targets(params: Mapping[str, Any], factor_trees: Sequence[Mapping[str, Any]]):
    """network -> kernel path -> [(index of the LoRA, (down, up))] over the given factor trees."""
    targets: dict[str, dict[tuple, list]] = {}
    for index, tree in enumerate(factor_trees):
        for network, sub in tree.items():
            if network not in params:
                raise ValueError(f"LoRA: the parameters have no {network}")
            leaves = flatten_dict(unfreeze(sub))
            for leaf_path in leaves:
                if leaf_path[-1] == "down":
                    kernel = leaf_path[:-1]
                    targets.setdefault(network, {}).setdefault(kernel, []).append(
                        (index, (leaves[kernel + ("down",)], leaves[kernel + ("up",)])))
    return targets


def _replaced(params: Mapping[str, Any], targets, new_leaf) -> dict[str, Any]:
    """params with each targeted kernel replaced by new_leaf(kernel, [(index, (down, up))]); the other leaves
    are the same objects."""
    out = dict(params)
    for network, kernels in targets.items():
        flat = flatten_dict(unfreeze(params[network]))
        for kernel_path, entries in kernels.items():
            flat[kernel_path] = new_leaf(flat[kernel_path], entries)
        out[network] = unflatten_dict(flat)
    return out


@jax.jit
def _merged_leaf(weight, factors, scales):
    return _add(weight, factors, scales)


def merge(params: Mapping[str, Any], loras: Sequence[tuple[LoRA, float]]) -> dict[str, Any]:
    """New parameters with each LoRA's delta added at its scale (in float32, cast back to each weight's
    dtype); untouched weights are shared with `params`, which stays as it is."""
    targets = _targets(params, [lora.factors for lora, _ in loras])
    scales = [float(scale) for _, scale in loras]

    def new_leaf(weight, entries):
        return _merged_leaf(weight, [f for _, f in entries], [jnp.float32(scales[i]) for i, _ in entries])

    return _replaced(params, targets, new_leaf)


def with_runtime(params: Mapping[str, Any], loras: Sequence[tuple[LoRA, float]]) -> dict[str, Any]:
    """`params` plus the LoRAs' factors and scales under params["loras"], for `resolve` to apply inside
    the compiled program (see runtime_scales to change the scales)."""
    return {**params, RUNTIME: {"factors": tuple(dict(lora.factors) for lora, _ in loras),
                                "scales": jnp.asarray([float(s) for _, s in loras], jnp.float32)}}


def runtime_scales(params: Mapping[str, Any], scales: Iterable[float]) -> dict[str, Any]:
    """params with run-time LoRA scales replaced (same shapes: the compiled programs are reused)."""
    scales = jnp.asarray(list(scales), jnp.float32)
    current = params[RUNTIME]["scales"]
    if scales.shape != current.shape:
        raise ValueError(f"LoRA scales: expected {current.shape[0]}, got {scales.shape[0]}")
    return {**params, RUNTIME: {**params[RUNTIME], "scales": scales}}


def resolve(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The weights the networks run with: params itself, or with params["loras"]'s deltas added (traced
    inside the caller's jit; float32 sums cast back to each weight's dtype)."""
    if RUNTIME not in params:
        return params
    runtime = params[RUNTIME]
    rest = {k: v for k, v in params.items() if k != RUNTIME}
    targets = _targets(rest, runtime["factors"])
    scales = runtime["scales"]
    return _replaced(rest, targets,
                     lambda w, entries: _add(w, [f for _, f in entries], [scales[i] for i, _ in entries]))


# --- Training and export ---------------------------------------------------------------------------------

def module_name(network: str, path: tuple[str, ...]) -> str:
    """The diffusers / transformers module path of the kernel at `path` ("...attn1.to_q")."""
    return COMPONENTS[network].export_key(torch_key(path)).removesuffix(".weight")


def train_targets(model: Any, patterns: Mapping[str, str]) -> tuple:
    """(network, kernel path, kernel shape) of every kernel of `model` whose module path a network's
    pattern (a regular expression, searched) matches."""
    targets = []
    for network, pattern in patterns.items():
        regex = re.compile(pattern)
        flat = flatten_dict(unfreeze(abstract_params(model.networks[network])))
        targets += [(network, path, tuple(leaf.shape)) for path, leaf in flat.items()
                    if path[-1] == "kernel" and regex.search(module_name(network, path))]
        if not any(t[0] == network for t in targets):
            raise ValueError(f"lora targets: {pattern!r} matches no layer of {network}")
    return tuple(targets)


def with_trained(params: Mapping[str, Any], multiplier: float) -> Mapping[str, Any]:
    """A training run's parameters ({..., "lora": factor tree}) as the networks run with them: the trained
    factors applied at `multiplier` (alpha / rank)."""
    rest = {k: v for k, v in params.items() if k != TRAINED}
    return resolve({**rest, RUNTIME: {"factors": (params[TRAINED],), "scales": jnp.asarray([multiplier], jnp.float32)}})


def _kohya_prefixes(model: Any) -> dict[str, str]:
    sdxl = "text_encoder_2" in model.networks
    return {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}


def kohya_state(model: Any, factors: Mapping[str, Any], alpha: float) -> dict[str, np.ndarray]:
    """One factor tree as a kohya LoRA file's tensors (float32): diffusers module names for SD 1.x/2.x UNets,
    the original LDM names for SDXL's (as kohya's SDXL trainer writes them), transformers' for the text
    encoders; down (rank, in[, kh, kw]), up (out, rank[, 1, 1]), the raw factors with their alpha."""
    prefixes, state = _kohya_prefixes(model), {}
    for network, tree in factors.items():
        flat = flatten_dict(unfreeze(tree))
        kernels = sorted({path[:-1] for path in flat})
        ldm = {}
        if network == "unet" and model.unet.config.addition_embed_type == "text_time":
            ldm = ldm_keys("unet", model.unet.config, [torch_key(k) for k in kernels])
        for kernel in kernels:
            down = np.asarray(flat[kernel + ("down",)], np.float32)
            up = np.asarray(flat[kernel + ("up",)], np.float32)
            name = ldm[torch_key(kernel)].removesuffix(".weight") if ldm else module_name(network, kernel)
            key = prefixes[network] + name.replace(".", "_")
            conv = down.ndim == 4
            torch_down = np.transpose(down, (3, 2, 0, 1)) if conv else down.T
            state[f"{key}.lora_down.weight"] = np.ascontiguousarray(torch_down)
            state[f"{key}.lora_up.weight"] = np.ascontiguousarray(up.T[:, :, None, None] if conv else up.T)
            state[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    return state


def save_kohya(path: str, model: Any, factors: Mapping[str, Any], alpha: float, rank: int) -> None:
    """Writes one factor tree as a new kohya-format .safetensors file (written beside it and renamed into
    place), with the metadata kohya writes that A1111 reads (network module, dim, alpha, base model)."""
    from sdjax.convert.safetensors_io import write_safetensors

    path = storage.absolute(path)
    if storage.exists(path):
        raise CheckpointError(f"{path}: already exists; export to a new file")
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha)}
    if "text_encoder_2" in model.networks:
        metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    elif model.networks["text_encoder"].config.hidden_act != "quick_gelu":
        metadata["ss_v2"] = "True"  # OpenCLIP text: SD 2.x
    with storage.staged_file(path, suffix=".safetensors") as staging:
        write_safetensors(staging, kohya_state(model, factors, alpha), metadata)
