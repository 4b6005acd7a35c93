"""TPU target names, mesh checks and the largest-batch search: plain logic, no compiler (runs without libtpu).
The compiles themselves are tests/test_plan_tpu.py."""

import importlib.util
import os
import subprocess
import sys

import pytest

from sdjax import tpu_targets
from sdjax.find_batch import largest_fitting_batch

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,topology,chips,slices,wrap", [
    ("v4-8", "v4:2x2x1", 4, 1, (False, False, False)),       # v4 names count TensorCores: 2 per chip
    ("v5p-8", "v5p:2x2x1", 4, 1, (False, False, False)),
    ("v5p-128", "v5p:4x4x4", 64, 1, (True, True, True)),     # a full cube closes the 3D torus
    ("v5e-8", "v5e:2x4", 8, 1, (False, False, False)),
    ("v6e-8", "v6e:2x4", 8, 1, (False, False, False)),
    ("v5e-256", "v5e:16x16", 256, 1, (True, True, False)),   # the full 2D torus pod
    ("2xv5e-16", "v5e:4x4", 32, 2, (False, False, False)),
])
def test_targets(name, topology, chips, slices, wrap):
    target = tpu_targets.parse_target(name)
    assert (target.topology, target.chips, target.devices, target.num_slices, target.wrap) == \
        (topology, chips, chips, slices, wrap)
    args = target.topology_args()
    assert args["chip_config_name"] == ("megacore" if name.startswith(("v4", "v5p")) else "default")


@pytest.mark.parametrize("name", ["v9-8", "v5e-7", "v4-7", "0xv5e-8", "v5e"])
def test_unknown_target_lists_the_known_ones(name):
    with pytest.raises(ValueError, match=r"unknown TPU target \(known: v4-8, .*v5e-8, .*2xv5e-16"):
        tpu_targets.parse_target(name)


def test_mesh_must_match_the_target():
    v5e8 = tpu_targets.parse_target("v5e-8")
    assert tpu_targets.check_mesh({"data": -1, "fsdp": 2, "tensor": 1}, v5e8) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="v5e-8 has 8 devices .* multiplies to 4"):
        tpu_targets.check_mesh({"data": 2, "fsdp": 2, "tensor": 1}, v5e8)
    with pytest.raises(ValueError, match="data axis spans the 2 slices"):
        tpu_targets.check_mesh({"data": 1, "fsdp": 32, "tensor": 1}, tpu_targets.parse_target("2xv5e-16"))


def test_missing_libtpu_names_the_extra(monkeypatch):
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"needs libtpu.*pip install 'sdjax\[tpu\]'"):
        tpu_targets.require_libtpu()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_plan_target_without_libtpu_is_one_line_error():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "plan.py"), f"--config={ROOT}/configs/tiny.py",
                             "--target=v5e-8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("plan.py: error: --target needs libtpu")
    assert "sdjax[tpu]" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("per_row,fixed,capacity,expected", [
    (10, 100, 155, 5),      # exactly linear: the line's prediction is the answer
    (10, 100, 100, 0),      # not even one row fits
    (10, 100, 115, 1),
    (10, 100, 10 ** 9, 4096),  # everything up to the limit fits
])
def test_largest_fitting_batch_on_a_line(per_row, fixed, capacity, expected):
    found = largest_fitting_batch(lambda b: fixed + per_row * b, capacity)
    assert found["batch_per_chip"] == expected
    if expected == 5:
        assert found["compiles"] == 4 and found["predicted"] == 5  # 1 and 2 give the line, 5 and 6 confirm it


@pytest.mark.parametrize("capacity", [150, 400, 1000, 5000])
def test_largest_fitting_batch_when_the_line_misleads(capacity):
    memory = lambda b: 100 + 10 * b + (b * b if b > 3 else 0)  # grows faster past 3 rows than the line says
    found = largest_fitting_batch(memory, capacity)
    b = found["batch_per_chip"]
    assert memory(b) <= capacity < memory(b + 1)
    assert found["bytes"] == memory(b) and found["next_bytes"] == memory(b + 1)


LIBTPU_NOISE = ("Failed to find host bounds", "unexpected worker hostname", "TPU_ACCELERATOR_TYPE", "InitGoogle")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed here")
def test_tools_start_jax_without_libtpus_errors_on_a_machine_without_tpus(tmp_path):
    """With the tpu extra installed on a machine without TPU chips, a JAX start would print libtpu's errors;
    sample.py (as every tool) keeps JAX off the TPU backend there, and its terminal shows only its own lines.
    Torch-free installs also show no transformers advice about PyTorch."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--prompt", "a red circle",
                             "--steps", "2", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in LIBTPU_NOISE + ("PyTorch was not found",):
        assert noise not in result.stderr + result.stdout
    assert os.listdir(tmp_path / "out") == ["00000-0.png"]


def test_largest_fitting_batch_when_the_compiler_refuses_large_batches():
    """The TPU compiler refuses a program over the chip's HBM (no memory figure at all): such a batch does not
    fit. Flat memory up to 40 rows (the line predicts nothing), refused from 41 on: the probes climb from 2
    and never compile a batch much past the answer (a jump to the 4096 limit took 10+ minutes of TPU
    compiles of the tiny sampler)."""
    found = largest_fitting_batch(lambda b: 1000 if b <= 40 else None, capacity=2000)
    assert found["batch_per_chip"] == 40 and found["bytes"] == 1000 and found["next_bytes"] is None
    assert 41 in found["refused"] and all(b > 40 for b in found["refused"])
    assert found["predicted"] is None and max(found["refused"]) <= 2 * 40
    assert largest_fitting_batch(lambda b: None, capacity=2000)["batch_per_chip"] == 0
