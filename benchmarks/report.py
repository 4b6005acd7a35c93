"""The results as a markdown table, and BENCHMARKS.md kept as hand-written text plus one generated section per
machine class (CPU by its widest ISA extension, GPU) between HTML comment markers: a run replaces only its own
class's section, so each kind of machine keeps its row."""

from __future__ import annotations

import datetime
import os
import statistics

from benchmarks.inputs import CONTEXT_TOKENS, TIMESTEP
from benchmarks.machine import describe_cpu_kernels, describe_machine, describe_versions, section
from benchmarks.settings import PEAK_MATMUL_SIDE, ROWS, SIDES, Settings

TITLE = """# Benchmarks: sdjax vs diffusers (PyTorch)

Regenerate with `python -m benchmarks.run`; a run replaces only its machine class's section below
(CPUs by their widest ISA extension: AVX2, AVX-512, AMX), so each kind of machine keeps its table.

## Notes

(Hand-written; kept when the tables are regenerated.)
"""
HEADER = ("| measurement | workload | sdjax | torch | speed sdjax/torch | GFLOP/item | MFU sdjax | MFU torch "
          "| peak mem sdjax | peak mem torch |\n|---|---|---|---|---|---|---|---|---|---|")
# Published figures for the SD 1.5 networks (per item, at the given side in pixels), to sanity-check XLA's counts.
REFERENCE_FLOPS = {"unet": (0.677e12, 512, "UNet forward"), "vae": (2.48e12, 512, "VAE decode")}
# Row label and throughput unit of each measurement (compile rows report seconds only).
LABELS = {"unet": ("UNet forward", "latents/s"), "sampling": ("sampling", "img/s"), "vae": ("VAE decode", "img/s"),
          "train": ("train step", "img/s"), "compile_cold": ("compile, cold", ""),
          "compile_warm": ("compile, warm", "")}


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def workload(measure: str, s: Settings) -> str:
    """What one timed call does, in a table cell."""
    images = f"{s.resolution}², batch {s.batch}"
    return {
        "unet": f"{s.unet_latent_side}² latents, batch {2 * s.batch}, text {CONTEXT_TOKENS} tokens, t={TIMESTEP}",
        "sampling": f"txt2img {images}, {plural(s.steps, 'DDIM step')}, CFG {s.guidance:g}",
        "vae": f"decode to {images}",
        "train": f"{images}, AdamW, frozen VAE + text encoder",
        "compile_cold": "first sampling call, empty persistent cache",
        "compile_warm": "first sampling call, filled persistent cache",
    }[measure]


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _bytes(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def seconds(result: dict) -> float:
    """The median of a result's timed calls."""
    return statistics.median(result["seconds"])


def throughput(result: dict) -> float:
    """Items per second at the median call time."""
    return result["items"] / seconds(result)


def _cell(result: dict | None, unit: str) -> str:
    if result is None:
        return "—"
    if "error" in result:  # the worker's last stderr line, kept from breaking the table
        return "error: " + result["error"].replace("|", "/")[:160]
    return f"{_num(seconds(result))} s" + (f" · {_num(throughput(result))} {unit}" if unit else "")


def _ok(result: dict | None) -> bool:
    return result is not None and "error" not in result


def row(measure: str, s: Settings, ours: dict | None, theirs: dict | None, peak_flops: float | None) -> str:
    """One table row from the sdjax and torch results (None: not measured on that side)."""
    label, unit = LABELS[measure]
    flops = ours.get("flops_per_item") if _ok(ours) else None
    mfu = lambda r: (f"{100 * flops * throughput(r) / peak_flops:.3g}%" if flops and peak_flops and _ok(r)
                     else "—")
    ratio = f"{seconds(theirs) / seconds(ours):.3g}×" if _ok(ours) and _ok(theirs) else "—"
    memory = lambda r: _bytes(r["peak_memory_bytes"]) if _ok(r) else "—"
    cells = [label, workload(measure, s), _cell(ours, unit), _cell(theirs, unit), ratio,
             _num(flops / 1e9) if flops else "—", mfu(ours), mfu(theirs), memory(ours), memory(theirs)]
    return "| " + " | ".join(cells) + " |"


def flops_checks(s: Settings, results: dict) -> list[str]:
    """Lines comparing XLA's per-item FLOPs with published SD 1.5 figures (scaled by area); sd15 only."""
    lines = []
    sides = {"unet": s.unet_resolution, "vae": s.resolution}
    for measure, (reference, side, name) in REFERENCE_FLOPS.items():
        result = results.get((measure, "sdjax"))
        if s.preset != "sd15" or not _ok(result):
            continue
        expected = reference * (sides[measure] / side) ** 2
        ratio = result["flops_per_item"] / expected
        verdict = "ok" if 0.8 <= ratio <= 1.25 else "WILDLY DIFFERENT: check the FLOP counting"
        lines.append(f"FLOPs check, {name}: {result['flops_per_item'] / 1e12:.3g} TFLOP per item vs reference "
                     f"{expected / 1e12:.3g} at {sides[measure]}² ({ratio:.2f}×, {verdict})")
    return lines


def render(s: Settings, only: tuple[str, ...], results: dict, command: str) -> str:
    """The generated markdown of one run: how and where it ran, the table, and notes on reading it."""
    peaks = {side: results[("peak", side)].get("flops_per_second") for side in SIDES}
    peak = max((p for p in peaks.values() if p), default=None)
    fmt_peak = lambda p: f"{p / 1e9:,.0f} GFLOP/s" if p else "failed"
    vae_attention = f", in the VAE {s.attention_of('vae')!r}" if s.attention_of("vae") != s.attention else ""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"Run {now}: `{command}`",
        f"Machine: {describe_machine()}",
        f"Versions: {describe_versions()}",
        f"Model: preset {s.preset} with random weights, shared as one diffusers folder; sdjax {s.sdjax_dtype} "
        f"(jitted, attention {s.attention!r}{vae_attention}{describe_cpu_kernels(s.device)}), torch {s.torch_dtype} "
        "(eager, diffusers' default SDPA attention)",
        f"Times: median of {plural(s.repeats, 'timed call')} after {plural(s.warmup, 'warm-up call')}; "
        "each measurement and framework runs in a fresh process",
        f"Matmul peak ({PEAK_MATMUL_SIDE[s.device]}², own dtype): sdjax {fmt_peak(peaks['sdjax'])}, "
        f"torch {fmt_peak(peaks['torch'])}; MFU is achieved FLOP/s over the larger of the two, taken as the machine's "
        "peak",
    ]
    rows = [row(r, s, results.get((r, "sdjax")), results.get((r, "torch")), peak) for name in only for r in ROWS[name]]
    notes = ["speed sdjax/torch: torch's time over sdjax's (> 1: sdjax is faster)",
             "GFLOP/item: XLA's cost analysis of the sdjax programs, credited to torch too (same networks); it counts "
             "elementwise work too, so it runs above matmul/convolution-only figures; sampling counts the text "
             "encoder twice (prompt, negative) + steps x the guided UNet + the VAE decode",
             "peak mem: " + ("peak bytes allocated on the GPU (jax memory_stats, torch.cuda.max_memory_allocated)"
                             if s.device == "gpu" else
                             "peak RSS of the measuring process, loading the weights included")]
    cold, warm = (results.get((r, "sdjax")) for r in ROWS["compile"])
    if _ok(cold) and _ok(warm):
        notes.append(f"compile: seconds the first sampling call spends tracing, lowering and compiling (warm: "
                     f"{warm['cache_hits']} programs loaded from the persistent cache); first call minus a steady "
                     f"call: {cold['first_call_minus_steady_s']:.3g} s cold, {warm['first_call_minus_steady_s']:.3g} "
                     "s warm; torch runs eagerly, without a compile step")
    notes += flops_checks(s, results)
    bullets = lambda lines: "\n".join(f"- {line}" for line in lines)
    return (f"## {section(s.device, preset=s.preset)[1]}\n\n{bullets(header)}\n\n{HEADER}\n" + "\n".join(rows)
            + f"\n\n{bullets(notes)}\n")


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- benchmarks:{key}:begin -->", f"<!-- benchmarks:{key}:end -->"


def merge(existing: str | None, key: str, generated: str) -> str:
    """The file's new text: `generated` replaces section `key`'s (or is appended); all else is kept."""
    begin, end = _markers(key)
    block = f"{begin}\n{generated}{end}"
    if existing is None:
        return f"{TITLE}\n{block}\n"
    start, stop = existing.find(begin), existing.find(end)
    if 0 <= start < stop:
        return existing[:start] + block + existing[stop + len(end):]
    return existing.rstrip("\n") + f"\n\n{block}\n"


def write(path: str, key: str, generated: str) -> None:
    """Writes `generated` as section `key` (machine.section) of the markdown file at `path`, keeping the rest."""
    existing = None
    if os.path.exists(path):
        with open(path) as f:
            existing = f.read()
    text = merge(existing, key, generated)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # a crash mid-write must not lose the hand-written notes
