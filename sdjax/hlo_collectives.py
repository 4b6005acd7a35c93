"""The collectives (and custom calls) of a compiled program, read from its optimized HLO text (compiled.as_text()).

Counts are static: an instruction inside a loop body (lax.scan over micro-batches or denoising steps)
counts once, however often the loop runs. Bytes are each instruction's result per device (for an
all-gather the gathered array, for a reduce-scatter this device's shard).
"""

from __future__ import annotations

import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
# TPU lowers a reduce-scatter to a fusion of an all-reduce and a slice, in a computation of this name.
_FUSED_REDUCE_SCATTER = "all-reduce-scatter"


_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def custom_calls(hlo_text: str) -> dict[str, int]:
    """{target: count} of the custom calls in the HLO (e.g. "tpu_custom_call": a Pallas / Mosaic kernel)."""
    out: dict[str, int] = {}
    for target in _CUSTOM_CALL_TARGET.findall(hlo_text):
        out[target] = out.get(target, 0) + 1
    return out


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (an array or a tuple of them); sub-byte / fp8 types count as 1 byte."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith(("f8", "s4", "u4", "f4")) else 0)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} for every collective kind in KINDS (zeros included), per device."""
    out = {kind: {"count": 0, "bytes": 0} for kind in KINDS}
    current, fused_reduce_scatter = "", set()
    found: list[tuple[str, str, str, str]] = []  # (computation, opcode, shape, rest of the line)
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and (m := _COMPUTATION.match(line)):
            current = m.group(1)
            continue
        if m := _INSTRUCTION.match(line):
            shape, opcode, rest = m.groups()
            found.append((current, opcode, shape, rest))
            called = _CALLS.search(rest)
            if opcode == "fusion" and called and called.group(1).startswith(_FUSED_REDUCE_SCATTER):
                fused_reduce_scatter.add(called.group(1))
    for computation, opcode, shape, rest in found:
        if opcode == "fusion":
            called = _CALLS.search(rest)
            if called and called.group(1) in fused_reduce_scatter:
                out["reduce-scatter"]["count"] += 1
                out["reduce-scatter"]["bytes"] += shape_bytes(shape)
            continue
        if computation in fused_reduce_scatter:
            continue  # counted as the reduce-scatter fusion that calls it
        base = opcode.removesuffix("-start").removesuffix("-done")
        if base not in out:
            continue
        # Async pairs: the start counts the collective, the done's result is its output (a start's
        # result also carries the operands).
        if not opcode.endswith("-done"):
            out[base]["count"] += 1
        if not opcode.endswith("-start"):
            out[base]["bytes"] += shape_bytes(shape)
    return out


__all__ = ["KINDS", "collectives", "shape_bytes"]
