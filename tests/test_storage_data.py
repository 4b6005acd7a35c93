"""Datasets in a bucket (gs://, served by a local GCS emulator): an image folder in a bucket is prepared into a
TFDS data_dir in the bucket, read back (ArrayRecord over GCS) as the same examples and batches as the local
folder gives, and train.py trains on it with its latent cache in a bucket workdir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sdjax import storage
from sdjax.data.pipeline import make_iterator
from sdjax.data.prepare import prepare
from sdjax.data.source import default_data_config

# compat: also run under the newest jax/grain/tfds (CI phase 2), except the train.py run (phase 1 only: the
# data layer it adds to the compat tests is the same prepare and read as the first test's, on minutes more).
compat = pytest.mark.compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 16


def tokenize(captions):
    """Caption bytes, zero-padded: a stand-in for CLIP ({batch key: ids})."""
    ids = np.zeros((len(captions), MAX_LEN), np.int32)
    for row, caption in enumerate(captions):
        tokens = list(caption.encode()[:MAX_LEN])
        ids[row, :len(tokens)] = tokens
    return {"input_ids": ids}


@pytest.fixture(scope="module")
def photos(tmp_path_factory, gcs):
    """(local folder, the same folder in a bucket): 12 captioned images of several sizes and modes, one in
    a subfolder, one with brackets in its name, captions in .txt files beside them."""
    local = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (local / "sub").mkdir()
    for i in range(12):
        # "[5]": a name fsspec would read as a pattern were it not read literally
        name = f"sub/{i:02d}.png" if i == 0 else f"{i:02d}{' [5]' if i == 5 else ''}.{'jpg' if i % 3 == 0 else 'png'}"
        shape = (40 + 2 * i, 48, 3) if i % 4 else (36, 36)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(local / name)
        (local / name).with_suffix(".txt").write_text(f"photo {i}\n")
    remote = gcs.bucket("data") + "/photos"
    storage.upload_folder(str(local), remote)
    return str(local), remote


def folder_config(data_dir, src):
    config = default_data_config()
    config.update(source="folder", data_dir=data_dir, resolution=32, caption_dropout=0.0, read_threads=2,
                  prefetch_buffer=8)
    config.folder.src = src
    return config


@compat
def test_folder_in_a_bucket_prepares_into_the_bucket_and_reads_as_the_local_one(tmp_path, photos, gcs):
    local_src, remote_src = photos
    local_path = prepare("folder", str(tmp_path / "datasets"), src=local_src)
    remote_path = prepare("folder", "gs://data/datasets", src=remote_src)
    assert remote_path.startswith("gs://data/datasets/sdjax_image_folder/photos_")
    names = gcs.objects("data", "datasets/")
    assert any(n.endswith(".array_record-00000-of-00001") for n in names), names
    assert not any(n.endswith(storage.PARTIAL) for n in names) and not os.path.exists(tmp_path / "gs:")
    assert prepare("folder", "gs://data/datasets", src=remote_src) == remote_path  # built once
    assert gcs.objects("data", "datasets/") == names

    local = tfds.builder_from_directory(local_path).as_data_source("train")
    remote = tfds.builder_from_directory(remote_path).as_data_source("train")  # ArrayRecord read over GCS
    assert len(remote) == len(local) == 12
    for a, b in zip(local, remote):
        assert a["file_name"] == b["file_name"] and a["caption"] == b["caption"]
        np.testing.assert_array_equal(a["image"], b["image"])

    batches = [next(make_iterator(folder_config(data_dir, src), tokenize, global_batch_size=4, seed=3))
               for data_dir, src in ((str(tmp_path / "datasets"), local_src), ("gs://data/datasets", remote_src))]
    assert batches[0].keys() == batches[1].keys()
    for key in batches[0]:
        np.testing.assert_array_equal(batches[0][key], batches[1][key], err_msg=key)


def test_train_reads_a_folder_from_a_bucket_and_caches_latents_there(tmp_path, photos, gcs):
    _, remote_src = photos
    workdir = gcs.bucket("folder-runs") + "/run"
    env = dict(os.environ, SDJAX_DATA_DIR=str(tmp_path / "unused"))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
         "--config.data.source=folder", f"--config.data.folder.src={remote_src}",
         "--config.data.data_dir=gs://data/datasets", "--config.data.cache_latents=True",
         "--config.total_steps=2", "--config.batch_size=4", "--config.log.every_steps=1",
         "--config.log.progress_bar=False", "--config.checkpoint.every_steps=2",
         "--config.log.preview_every_steps=0", "--config.export.at_end=False"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"latent cache: encoding the 12 images of data.split 'train' into {workdir}/latent_cache" in result.stdout
    names = gcs.objects("folder-runs", "run/")
    assert "run/latent_cache/meta.json" in names and not any(n.endswith(storage.PARTIAL) for n in names)
    logs = [json.loads(line) for line in storage.read_text(f"{workdir}/logs/metrics.jsonl").splitlines()]
    assert [m["step"] for m in logs] == [1, 2] and all(np.isfinite(m["loss"]) for m in logs)
    assert not os.path.exists(tmp_path / "unused") and not os.path.exists(tmp_path / "gs:")


@compat
def test_compilation_cache_in_a_bucket(tmp_path, gcs):
    """$SDJAX_CACHE_DIR=gs://...: the compiled program lands in the bucket (a cache all hosts share)."""
    bucket = gcs.bucket("xla")
    program = ("import jax, jax.numpy as jnp\n"
               "from sdjax.pipeline import enable_compilation_cache\n"
               "print(enable_compilation_cache())\n"
               "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
               "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, SDJAX_CACHE_DIR=f"{bucket}/cache"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [f"{bucket}/cache"]
    assert gcs.objects("xla", "cache/") and not os.path.exists(tmp_path / "gs:")
