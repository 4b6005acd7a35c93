"""train.py with its workdir in a bucket (gs://, served by a local GCS emulator): checkpoints, logs and the
export land there, kills mid-run while a checkpoint is written and mid-export resume bitwise exactly, and a
bucket that does not exist or missing credentials fail at once in one line."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sdjax import storage
from sdjax.convert.safetensors_io import read_safetensors
from sdjax.train.checkpoint import read_state

# compat: also run under the newest jax/orbax (CI phase 2). Two processes writing one checkpoint into a
# bucket: test_parallel.py.
compat = pytest.mark.compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.log.progress_bar=False", "--config.log.every_steps=2", "--config.checkpoint.every_steps=4",
        "--config.log.preview_every_steps=12", "--config.total_steps=12"]
UNET = "export/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets"))


def run_train(workdir, data_dir, cwd, *flags, fault=None, env=None):
    env = dict(os.environ if env is None else env, SDJAX_DATA_DIR=data_dir)
    env.pop("SDJAX_FAULT", None)
    if fault:
        env["SDJAX_FAULT"] = fault
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py",
                           f"--workdir={workdir}", *FAST, *flags], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=900)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@compat
def test_run_in_a_bucket_lands_there_and_resumes_bitwise_after_kills(tmp_path, data_dir, gcs):
    straight = tmp_path / "straight"  # on the local disk
    assert run_train(straight, data_dir, tmp_path).returncode == 0
    workdir = gcs.bucket("runs") + "/tiny"
    # killed mid-run, while the step-8 checkpoint is being written (after the step-4 one finished)
    first = run_train(workdir, data_dir, tmp_path, fault="save:8")
    assert first.returncode == -9, first.stderr[-2000:]
    second = run_train(workdir, data_dir, tmp_path, fault="export:12")  # trained to the end, killed mid-upload
    assert second.returncode == -9, second.stderr[-2000:]
    assert f"resumed from {workdir}/checkpoints at step 4" in second.stdout
    cut = gcs.objects("runs", "tiny/export/")
    assert "tiny/export/.sdjax-partial" in cut
    with pytest.raises(storage.StorageError, match="upload that did not finish"):
        storage.check_complete(f"{workdir}/export")
    third = run_train(workdir, data_dir, tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints at step 12" in third.stdout
    assert f"exported the EMA weights to {workdir}/export" in third.stdout

    names = gcs.objects("runs", "tiny/")
    assert "tiny/config.json" in names and "tiny/logs/metrics.jsonl" in names
    assert sum(n.startswith("tiny/logs/events.out.tfevents") for n in names) == 3  # one per run
    assert {n.split("/")[2] for n in names if n.startswith("tiny/checkpoints/") and n.split("/")[2].isdigit()} \
        == {"4", "8", "12"}
    assert "tiny/export/model_index.json" in names and f"tiny/{UNET}" in names
    assert not any(n.endswith(".sdjax-partial") for n in names)
    assert not os.path.exists(tmp_path / "gs:")  # nothing went to a local folder named after the URL

    a, b = read_safetensors(str(straight / UNET)), read_safetensors(f"{workdir}/{UNET}")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    sa, sb = read_state(str(straight), 12), read_state(workdir, 12)
    for x, y in zip(leaves((sa["params"], sa["opt_state"])), leaves((sb["params"], sb["opt_state"]))):
        np.testing.assert_array_equal(x, y)
    logs = [json.loads(line) for line in storage.read_text(f"{workdir}/logs/metrics.jsonl").splitlines()]
    assert logs[-1]["step"] == 12 and np.isfinite(logs[-1]["loss"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local_logs = tmp_path / "logs"  # TensorBoard reads buckets through TensorFlow; this run has none
    for name in names:
        if name.startswith("tiny/logs/events"):
            (local_logs / os.path.basename(name)).parent.mkdir(exist_ok=True)
            (local_logs / os.path.basename(name)).write_bytes(bytes(storage.read_bytes(f"gs://runs/{name}")))
    acc = EventAccumulator(str(local_logs), size_guidance={"images": 0})
    acc.Reload()
    assert 12 in [e.step for e in acc.Scalars("loss")] and 12 in [e.step for e in acc.Images("preview")]


def _one_line_failure(result, started, message):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("train.py: error: ") and message in lines[-1], result.stderr[-2000:]
    assert time.monotonic() - started < 90  # process start and imports included; no network waits


@compat
def test_missing_bucket_fails_at_once_in_one_line(tmp_path, data_dir, gcs):
    started = time.monotonic()
    result = run_train("gs://no-such-bucket/run", data_dir, tmp_path)
    _one_line_failure(result, started, "--workdir gs://no-such-bucket/run: no such bucket 'no-such-bucket'")


@compat
def test_missing_credentials_fail_at_once_in_one_line(tmp_path, data_dir):
    """Off the emulator and with no Application Default Credentials anywhere (and no metadata server)."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
        "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="true")
    started = time.monotonic()
    result = run_train("gs://some-bucket/run", data_dir, tmp_path, env=env)
    _one_line_failure(result, started, "gs://some-bucket/run: no Google Cloud credentials found")
