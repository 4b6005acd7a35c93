"""plan.py --target: the tiny config's train step and sampler compiled by libtpu's TPU compiler for a v5e-8
slice on this CPU-only machine (no TPU). Each plan runs in its own process, as a user runs plan.py: libtpu
is set up before JAX loads it. The tiny model's train step takes 50-90 s to compile for TPU on 2 cores, the
sampler 20-50 s: the file takes 4-7 minutes there."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu (the TPU compiler) is not installed: pip install 'sdjax[tpu]'")

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (f"--config={ROOT}/configs/tiny.py", "--config.batch_size=8", "--target=v5e-8")
LIBTPU_NOISE = ("Failed to find host bounds", "unexpected worker hostname", "libtpu_lockfile")


def _plan(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "plan.py"), *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=1200)


# libtpu's own warnings (where XLA's partitioner reports an involuntary full rematerialization) reach
# stderr only at its most verbose log level.
VERBOSE = {"TPU_STDERR_LOG_LEVEL": "0", "TPU_MIN_LOG_LEVEL": "0"}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """mesh -> (plan.py's result, its JSON report): train step and sampler, data=8 and fsdp=8."""
    # Both at once: the TPU compiler works on about one core, and libtpu is loaded compile-only, so two
    # processes can hold it (ALLOW_MULTIPLE_LIBTPU_LOAD, which plan.py sets on a machine without TPUs).
    runs = {}
    for mesh in ("data=8", "fsdp=8"):
        path = tmp_path_factory.mktemp("plan") / "plan.json"
        runs[mesh] = path, subprocess.Popen([sys.executable, os.path.join(ROOT, "plan.py"), *TINY, f"--mesh={mesh}",
                                             f"--json={path}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, env=dict(os.environ, **VERBOSE))
    out = {}
    for mesh, (path, process) in runs.items():
        stdout, stderr = process.communicate(timeout=1200)
        assert process.returncode == 0, stderr[-3000:]
        with open(path) as f:
            out[mesh] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), json.load(f)
    return out


@pytest.mark.parametrize("mesh", ["data=8", "fsdp=8"])
def test_train_and_sampler_compile_for_v5e_8(plans, mesh):
    result, report = plans[mesh]
    assert report["backend"] == "tpu" and "TPU v5 lite" in report["backend_note"]
    assert report["target"]["name"] == "v5e-8" and report["devices"] == 8 == report["target"]["chips"]
    assert report["device_memory_gb"] == 16  # the chip's HBM
    assert report["attention"] == "splash (auto)"  # the default attention is the Pallas kernel on TPU
    for name in ("train", "sample"):
        program = report[name]
        assert program["memory"]["total_bytes"] > 0 and program["memory"]["peak_bytes"] > 0
        assert program["verdict"]["fits"] and program["verdict"]["device_memory_bytes"] == 16 * 2 ** 30
        assert program["cost"]["flops"] > 0 and program["flops_per_device_per_call"] >= program["cost"]["flops"]
        estimate = program["estimate"]
        assert estimate["source"].startswith("estimate: ") and estimate["estimated_seconds_per_call"] > 0
        assert 0 < estimate["estimated_mfu"] <= 1
        assert program["custom_calls"].get("tpu_custom_call", 0) > 0  # the Pallas kernel, compiled by Mosaic
    # The compiler does not count what runs inside the Pallas kernels (at full size about half of SD 1.5's
    # step); MFU takes the model FLOPs, traced with one-op attention.
    train, peak = report["train"], report["target"]["peak_flops"]
    assert train["model_flops_per_step"] > 0 and "model FLOPs / step" in result.stdout
    assert train["estimate"]["estimated_mfu"] == pytest.approx(
        train["model_flops_per_step"] / 8 / train["estimate"]["estimated_seconds_per_call"] / peak)
    collectives = report["train"]["collectives"]
    if mesh == "fsdp=8":  # sharded weights are gathered for use
        assert collectives["all-gather"]["count"] > 0
    else:  # replicated weights: the gradients are summed over the data axis
        assert collectives["all-reduce"]["count"] > 0 and collectives["all-gather"]["count"] == 0
    assert "ESTIMATE, not measured" in result.stdout and "MFU (estimate)" in result.stdout
    assert "attention splash (auto)" in result.stdout and "Pallas kernels (static)" in result.stdout
    assert "involuntary full rematerialization" not in result.stderr.lower()


def test_fsdp_holds_an_eighth_of_the_state(plans):
    replicated, sharded = plans["data=8"][1]["train"], plans["fsdp=8"][1]["train"]
    state = lambda plan: sum(plan["state"][group]["per_device_bytes"] for group in ("params", "opt_state"))
    # Small weights whose dimensions 8 does not divide (norm scales, 3-channel convs) stay replicated.
    assert state(sharded) == pytest.approx(state(replicated) / 8, rel=0.15)
    # The TPU compiler's own argument buffers agree.
    assert sharded["memory"]["argument_bytes"] < replicated["memory"]["argument_bytes"] / 4


def test_find_batch_under_a_small_cap(tmp_path, plans):
    # A cap a little above the sampler's memory at one row per chip (data=8, 8 images). With jax 0.10's
    # libtpu 2 rows then do not fit; jax 0.12's packs 2 rows of the tiny model in the same memory: so the
    # answer is some b >= 1 that fits where b + 1 does not (or is refused by the compiler).
    one_row = plans["data=8"][1]["sample"]
    assert one_row["batch_size"] == 8
    cap = max(one_row["memory"]["total_bytes"], one_row["memory"]["peak_bytes"]) + 2 ** 16
    path = tmp_path / "plan.json"
    result = _plan(*TINY, "--mesh=data=8", "--notrain", "--find_batch", f"--device_memory_gb={cap / 2 ** 30!r}",
                   f"--json={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(path) as f:
        report = json.load(f)
    found = report["find_batch"]["sample"]
    b = found["batch_per_chip"]
    assert b >= 1 and found["bytes"] <= found["capacity_bytes"]
    assert b + 1 in found["refused"] or found["capacity_bytes"] < found["next_bytes"]
    assert report["sample"]["batch_size"] == 8 * b and report["sample"]["verdict"]["fits"]
    assert "largest sample batch per chip within" in result.stdout
    progress = [line for line in result.stderr.splitlines() if line.startswith("find_batch: ")]
    assert len(progress) == len(found["compiled"]) + len(found["refused"]) >= 2, progress  # one line per compile
    assert progress[0].startswith("find_batch: 1 per chip: ")


@pytest.mark.parametrize("args,message", [
    (("--target=v9-8",), "unknown TPU target (known: v4-8,"),
    (("--target=v5e-8", "--mesh=data=2,fsdp=2"), "v5e-8 has 8 devices (8 chips), but the mesh"),
    (("--target=2xv5e-16", "--mesh=fsdp=32"), "the data axis spans the 2 slices over DCN"),
])
def test_bad_target_is_one_line_error(args, message):
    result = _plan(f"--config={ROOT}/configs/tiny.py", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan.py: error: ") and message in lines[0], result.stderr
    assert not any(noise in result.stderr for noise in LIBTPU_NOISE)
