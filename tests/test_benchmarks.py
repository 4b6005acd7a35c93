"""The benchmark suite end to end on the tiny preset (every measurement, both frameworks), the markdown it
keeps, and its errors for bad flags."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # benchmarks/ sits beside the installed sdjax package, not inside it

from benchmarks import report, run  # noqa: E402
from cli_checks import assert_one_line_exit_2  # noqa: E402

NOTES = "## Notes\n\nHand-written: keep me.\n"
GPU_SECTION = "<!-- benchmarks:gpu:begin -->\n## GPU\n\n| a table from another machine |\n<!-- benchmarks:gpu:end -->"
TIMED = {"UNet forward": "latents/s", "sampling": "img/s", "VAE decode": "img/s", "train step": "img/s"}
POSITIVE = r"(\d[\d,]*\.?\d*(?:e[-+]\d+)?)"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


def _positive(pattern: str, cell: str) -> None:
    match = re.fullmatch(pattern, cell)
    assert match, f"{cell!r} does not match {pattern!r}"
    assert all(float(g.replace(",", "")) > 0 for g in match.groups()), cell


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of everything into a file that already holds hand-written notes and a GPU section."""
    pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "BENCHMARKS.md"
    out.write_text(f"# Benchmarks\n\n{NOTES}\n{GPU_SECTION}\n")
    result = run_cli("--preset", "tiny", "--repeats", "1", "--warmup", "1", "--steps", "1", "--device", "cpu",
                     "--out", str(out), "--cache-dir", str(tmp / "weights"))
    return result, out.read_text()


def test_every_measurement_has_numbers_for_both_frameworks(tiny_run):
    result, text = tiny_run
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in {*TIMED, "compile, cold", "compile, warm"}:
            rows[cells[0]] = cells
    assert set(rows) == {*TIMED, "compile, cold", "compile, warm"}
    for label, unit in TIMED.items():
        _, _, ours, theirs, ratio, gflop, mfu_ours, mfu_theirs, mem_ours, mem_theirs = rows[label]
        for cell in (ours, theirs):
            _positive(rf"{POSITIVE} s · {POSITIVE} {re.escape(unit)}", cell)
        _positive(rf"{POSITIVE}×", ratio)
        _positive(POSITIVE, gflop)
        for cell in (mfu_ours, mfu_theirs):
            _positive(rf"{POSITIVE}%", cell)
        for cell in (mem_ours, mem_theirs):
            _positive(rf"{POSITIVE} (?:MiB|GiB)", cell)
    for label in ("compile, cold", "compile, warm"):
        _positive(rf"{POSITIVE} s", rows[label][2])
        assert rows[label][3] == "—"
    assert "programs loaded from the persistent cache" in text
    assert "| UNet forward |" in result.stdout  # the table is printed too


def test_markdown_keeps_notes_and_the_other_device(tiny_run):
    _, text = tiny_run
    assert text.startswith(f"# Benchmarks\n\n{NOTES}\n")
    assert GPU_SECTION in text
    from benchmarks.machine import section

    key, title = section("cpu", preset="tiny")  # this machine's ISA class; presets but sd15 apart
    assert key.endswith("-tiny") and title.endswith(": tiny preset")
    cpu = text[text.index(f"<!-- benchmarks:{key}:begin -->"):text.index(f"<!-- benchmarks:{key}:end -->")]
    assert f"## {title}\n" in cpu and "- Machine: " in cpu and "logical CPUs (ISA: " in cpu
    versions = next(line for line in cpu.splitlines() if line.startswith("- Versions: "))
    for name in ("python", "jax", "jaxlib", "flax", "torch", "diffusers", "transformers"):
        assert f" {name} " in versions
    assert report.HEADER in cpu


def test_a_second_write_replaces_only_its_own_section(tmp_path):
    path = str(tmp_path / "B.md")
    report.write(path, "cpu", "## CPU\n\nfirst\n")
    with open(path, "a") as f:
        f.write(f"\n{GPU_SECTION}\n\n{NOTES}")
    report.write(path, "cpu", "## CPU\n\nsecond\n")
    text = open(path).read()
    assert "second" in text and "first" not in text and text.count("## CPU") == 1
    assert GPU_SECTION in text and text.endswith(NOTES) and text.startswith(report.TITLE)


def test_a_bad_flag_exits_2_with_one_line():
    result = run_cli("--only", "nonsense")
    assert result.returncode == 2
    assert result.stderr == "benchmarks.run: error: argument --only: unknown measurement nonsense; known: unet, " \
                            "sampling, vae, train, compile\n"


@pytest.mark.parametrize("args,message", [
    (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["--warmup", "x"], "argument --warmup: invalid int value: 'x'"),
    (["--preset", "sd99"], "argument --preset: invalid choice"),
    (["--preset", "tiny", "--resolution", "30"], "--resolution must be a multiple of 8"),
    (["--preset", "sdxl", "--only", "unet,train"], "--only train: the torch side's train step is SD 1.x's"),
])
def test_bad_flags_in_process(args, message, capsys):
    assert_one_line_exit_2(run.main, args, message, capsys)


def test_device_defaults_and_the_float32_cudnn_pair(monkeypatch):
    monkeypatch.setattr(run, "gpu_visible", lambda asked=False: True)
    gpu = run.settings_from_args(run.parse_args(["--preset", "tiny", "--device", "gpu"]))
    assert (gpu.sdjax_dtype, gpu.torch_dtype, gpu.attention, gpu.batch, gpu.warmup, gpu.repeats) == \
        ("bfloat16", "float16", "cudnn", 8, 3, 10)
    # cuDNN's flash attention has no float32: the default kernel becomes "dot", an explicit one is refused.
    assert run.settings_from_args(run.parse_args(["--device", "gpu", "--dtype", "float32"])).attention == "dot"
    with pytest.raises(ValueError, match="--attention cudnn: cuDNN's flash attention takes bfloat16 or float16"):
        run.settings_from_args(run.parse_args(["--device", "gpu", "--dtype", "float32", "--attention", "cudnn"]))
    cpu = run.settings_from_args(run.parse_args(["--preset", "tiny", "--device", "cpu", "--repeats", "5"]))
    assert (cpu.sdjax_dtype, cpu.attention, cpu.batch, cpu.warmup, cpu.repeats) == ("float32", "xla", 1, 1, 5)


def test_isa_extensions_read_from_cpuinfo_flags():
    from benchmarks.machine import isa_extensions

    assert isa_extensions("fpu sse avx avx2 fma avx512f avx512bw amx_tile amx_bf16") == [
        "AVX2", "FMA", "AVX-512F", "AMX", "AMX-BF16"]
    assert isa_extensions("fpu sse sse2 avx") == []


def test_each_cpu_isa_class_keeps_its_own_section(tmp_path):
    from benchmarks.machine import section

    assert section("cpu", {"avx2", "fma"}) == ("cpu-avx2", "CPU with AVX2, no AVX-512")
    assert section("cpu", {"avx2", "avx512f"}) == ("cpu-avx512", "CPU with AVX-512, no AMX")
    assert section("cpu", {"avx2", "avx512f", "amx_tile"}) == ("cpu-amx", "CPU with AMX")
    assert section("gpu") == ("gpu", "GPU")
    assert section("cpu", {"avx2"}, preset="sdxl") == ("cpu-avx2-sdxl", "CPU with AVX2, no AVX-512: sdxl preset")
    path = str(tmp_path / "B.md")
    report.write(path, "cpu-avx512", "## CPU with AVX-512, no AMX\n\nwide\n")
    report.write(path, "cpu-avx2", "## CPU with AVX2, no AVX-512\n\nnarrow\n")
    text = open(path).read()
    assert "wide" in text and "narrow" in text
