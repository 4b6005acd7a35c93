"""Models and sample.py on gs:// (a local GCS emulator): the shipped model read from a bucket loads bitwise as
the local folder does, single files and safetensors read the same from either, cut-off uploads and missing
buckets fail in one line, and sample.py draws from and writes into a bucket the same images as locally."""

import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from PIL import Image

import sdjax
from sdjax import storage
from sdjax.convert.safetensors_io import (CheckpointError, read_safetensors, read_safetensors_metadata,
                                          write_safetensors)

compat = pytest.mark.compat  # the tests that need no PyTorch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(gcs):
    """Bucket "models" holding the shipped model as gs://models/shapes-model."""
    bucket = gcs.bucket("models")
    storage.upload_folder(sdjax.DEFAULT_MODEL, f"{bucket}/shapes-model")
    return bucket


@pytest.fixture(scope="module")
def local_model():
    return sdjax.load(sdjax.DEFAULT_MODEL, to_device=False)


def _assert_same_params(ours, reference):
    same = jax.tree.map(lambda a, b: a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b),
                        ours, reference)
    assert jax.tree.structure(ours) == jax.tree.structure(reference)
    assert all(jax.tree.leaves(same))


def _put(gcs_path: str, data: bytes) -> None:
    storage.filesystem(gcs_path).pipe_file(gcs_path, data)


@compat
def test_read_bytes_reassembles_chunks(gcs, monkeypatch):
    bucket = gcs.bucket("chunks")
    data = np.random.default_rng(0).integers(0, 256, 10_500, np.uint8).tobytes()
    _put(f"{bucket}/blob", data)
    monkeypatch.setattr(storage, "CHUNK_BYTES", 1000)  # 11 chunks: more than one batch of concurrent requests
    assert bytes(storage.read_bytes(f"{bucket}/blob")) == data
    _put(f"{bucket}/exact", data[:3000])  # a multiple of the chunk size
    assert bytes(storage.read_bytes(f"{bucket}/exact")) == data[:3000]


@compat
def test_read_safetensors_remote_equals_local(models, tmp_path):
    local = os.path.join(sdjax.DEFAULT_MODEL, "vae", "diffusion_pytorch_model.safetensors")
    remote = f"{models}/shapes-model/vae/diffusion_pytorch_model.safetensors"
    ours, reference = read_safetensors(remote), read_safetensors(local)
    assert list(ours) == list(reference)
    for name, array in reference.items():
        assert ours[name].dtype == array.dtype and ours[name].shape == array.shape
        assert ours[name].tobytes() == array.tobytes()
        assert not ours[name].flags.writeable
    assert read_safetensors_metadata(remote) == read_safetensors_metadata(local)
    # One buffer for the whole file: every tensor views it, none is a copy.
    owners = set()
    for array in ours.values():
        owner = array
        while isinstance(owner, (np.ndarray, memoryview)):
            owner = owner.obj if isinstance(owner, memoryview) else owner.base
        owners.add(id(owner))
    assert len(owners) == 1


@compat
def test_truncated_and_corrupt_remote_files_fail_as_local_ones(gcs, tmp_path):
    bucket = gcs.bucket("broken")
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}
    whole = str(tmp_path / "whole.safetensors")
    write_safetensors(whole, tensors)
    data = open(whole, "rb").read()
    cases = {"cut.safetensors": data[:-4], "headless.safetensors": data[:5],
             "garbage.safetensors": data[:8] + b"\xff" * (len(data) - 8)}
    for name, content in cases.items():
        local = tmp_path / name
        local.write_bytes(content)
        _put(f"{bucket}/{name}", content)
        with pytest.raises(CheckpointError) as expected:
            read_safetensors(str(local))
        with pytest.raises(CheckpointError) as got:
            read_safetensors(f"{bucket}/{name}")
        assert str(got.value) == str(expected.value).replace(str(local), f"{bucket}/{name}")
        assert "\n" not in str(got.value)
    with pytest.raises(CheckpointError, match=r"gs://broken/missing.safetensors: cannot read"):
        read_safetensors(f"{bucket}/missing.safetensors")


@compat
def test_load_remote_folder_equals_local(models, local_model):
    remote = sdjax.load(f"{models}/shapes-model", to_device=False)
    _assert_same_params(remote.params, local_model.params)
    assert remote.model.scheduler_config == local_model.model.scheduler_config
    assert remote.model.model_index == local_model.model.model_index
    prompts = ["a large green triangle on a white background", "ciron <tri> BREAK"]
    ours, reference = remote.tokenize(prompts), local_model.tokenize(prompts)
    assert list(ours) == list(reference)
    for name in reference:
        np.testing.assert_array_equal(ours[name], reference[name])


@compat
def test_load_remote_single_file_equals_local(models, local_model, tmp_path):
    single = str(tmp_path / "shapes.safetensors")
    sdjax.save(local_model.model, local_model.params, single, layout="single_file")
    storage.filesystem(models).put_file(single, f"{models}/single/shapes.safetensors")
    config = f"{models}/shapes-model"  # the shipped model is no known family: its folder describes the file
    remote = sdjax.load(f"{models}/single/shapes.safetensors", config=config, to_device=False)
    local = sdjax.load(single, config=sdjax.DEFAULT_MODEL, to_device=False)
    _assert_same_params(remote.params, local.params)
    _assert_same_params(remote.params, local_model.params)


@compat
def test_cut_off_upload_missing_bucket_and_missing_path_are_one_line(models, gcs):
    folder = f"{models}/cut"
    storage.upload_folder(sdjax.DEFAULT_MODEL, folder)
    _put(f"{folder}/{storage.PARTIAL}", b"")
    cases = {folder: f"{folder}: an upload that did not finish (it holds {storage.PARTIAL})",
             "gs://no-such-bucket/model": "model gs://no-such-bucket/model: no such bucket 'no-such-bucket'",
             f"{models}/nothing": f"model {models}/nothing: no such file or folder",
             f"{models}/nothing.safetensors": f"model {models}/nothing.safetensors: no such file or folder"}
    for path, message in cases.items():
        with pytest.raises(storage.StorageError) as error:
            sdjax.load(path)
        assert message in str(error.value) and "\n" not in str(error.value)
    # The parts of a cut-off model are refused too (training stages read them one by one).
    from sdjax.convert.diffusers import load_component
    from sdjax.tokenizer import load_tokenizer

    with pytest.raises(storage.StorageError, match="an upload that did not finish"):
        load_component(folder, "unet")
    with pytest.raises(storage.StorageError, match="an upload that did not finish"):
        load_tokenizer(f"{folder}/tokenizer")


@compat
def test_read_bytes_refuses_a_short_read(gcs, monkeypatch):
    path = gcs.bucket("short") + "/blob"
    _put(path, bytes(3500))
    monkeypatch.setattr(storage, "CHUNK_BYTES", 1000)
    fs = storage.filesystem(path)
    full = fs.cat_ranges
    monkeypatch.setattr(fs, "cat_ranges", lambda *args, **kwargs: [p[:-1] for p in full(*args, **kwargs)])
    with pytest.raises(storage.StorageError, match="read 999 bytes at offset 0 where 1000 were expected"):
        storage.read_bytes(path)


@compat
def test_remove_takes_names_literally_and_the_marker_last(gcs, monkeypatch):
    """fsspec's rm reads [, * and ? as patterns: removing "exp[1]" must not touch "exp1"."""
    bucket = gcs.bucket("literal")
    for name in ("exp[1]/a", "exp[1]/b/c", f"exp[1]/{storage.PARTIAL}", "exp1/a", "exp*/a"):
        _put(f"{bucket}/{name}", b"x")
    fs = storage.filesystem(bucket)
    removed = []
    rm_file = fs.rm_file
    monkeypatch.setattr(fs, "rm_file", lambda path: (removed.append(path.rsplit("/", 1)[-1]), rm_file(path)))
    storage.remove(f"{bucket}/exp[1]")
    assert gcs.objects("literal") == ["exp*/a", "exp1/a"]
    assert sorted(removed[:-1]) == ["a", "c"] and removed[-1] == storage.PARTIAL
    storage.remove(f"{bucket}/exp*/a")
    assert gcs.objects("literal") == ["exp1/a"]


@compat
def test_store_errors_are_one_line(gcs, monkeypatch):
    """What gcsfs raises for 403 (an OSError with the service's JSON on further lines) becomes one line."""
    path = gcs.bucket("private") + "/model"
    fs = storage.filesystem(path)

    def forbidden(*args, **kwargs):
        raise OSError('Forbidden: private/model\n{"error": {"code": 403, "message": "no access"}}')

    monkeypatch.setattr(fs, "exists", forbidden)
    monkeypatch.setattr(fs, "pipe_file", forbidden)
    for check, verb in ((storage.check_readable, "read"), (storage.check_writable, "write")):
        with pytest.raises(storage.StorageError) as error:
            check(path, "--model")
        assert str(error.value) == f"--model {path}: cannot {verb} (OSError: Forbidden: private/model)"


@compat
def test_remote_images_prompts_and_hashes(models, tmp_path):
    from sdjax import batch_sampling as job
    from sdjax.lora import a1111_hash
    from sdjax.textual_inversion import file_hash, read_embedding

    pixels = np.random.default_rng(1).integers(0, 256, (32, 48, 3), np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    local = tmp_path / "init.png"
    local.write_bytes(encoded.getvalue())
    remote = f"{models}/inputs/init.png"
    _put(remote, encoded.getvalue())
    assert job.image_size(remote) == (32, 48)
    np.testing.assert_array_equal(job.read_image(remote, (32, 48)), job.read_image(str(local), (32, 48)))
    with pytest.raises(ValueError, match="cannot read image"):
        job.image_size(f"{models}/inputs/missing.png")
    path = str(tmp_path / "emb.safetensors")
    write_safetensors(path, {"emb_params": np.ones((2, 64), np.float32)})
    storage.filesystem(models).put_file(path, f"{models}/inputs/emb.safetensors")
    ours = read_embedding(f"{models}/inputs/emb.safetensors")
    np.testing.assert_array_equal(ours.vectors[None], read_embedding(path).vectors[None])
    assert file_hash(f"{models}/inputs/emb.safetensors") == file_hash(path)
    assert a1111_hash(f"{models}/inputs/emb.safetensors") == a1111_hash(path)
    assert job.parse_lora(f"{models}/inputs/emb.safetensors:0.5") == (f"{models}/inputs/emb.safetensors", 0.5)
    assert job.parse_embedding(f"{models}/inputs/emb.safetensors") == (f"{models}/inputs/emb.safetensors", None)
    with pytest.raises(ValueError, match=f"{models}/inputs/none.safetensors: LoRA file not found"):
        job.parse_lora(f"{models}/inputs/none.safetensors:0.5")


def _lora(sd, path: str) -> None:
    """A kohya LoRA for the shipped model changing one UNet kernel."""
    from sdjax.lora import save_kohya

    flat = flatten_dict(sd.params["unet"])
    kernel = next(p for p in sorted(flat) if p[-1] == "kernel" and np.ndim(flat[p]) == 2)
    rows, cols = np.shape(flat[kernel])
    rng = np.random.default_rng(3)
    tree = unflatten_dict({kernel + ("down",): rng.standard_normal((rows, 2)).astype(np.float32) * 0.3,
                           kernel + ("up",): rng.standard_normal((2, cols)).astype(np.float32) * 0.3})
    save_kohya(path, sd.model, {"unet": tree}, alpha=2.0, rank=2)


@compat
def test_sample_cli_reads_from_and_writes_to_a_bucket(models, local_model, gcs, tmp_path):
    """sample.py with --model, --prompts-file, --lora and --embedding on gs:// and --out gs://: the PNGs land
    in the bucket with the pixels and parameters a local run writes."""
    from sdjax.batch_sampling import next_index
    from sdjax.png_info import read_parameters

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _lora(local_model, str(inputs / "style.safetensors"))
    write_safetensors(str(inputs / "tri.safetensors"),
                      {"emb_params": np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32) * 0.5})
    (inputs / "prompts.jsonl").write_text(
        json.dumps({"prompt": "a large <tri> on a white background", "seed": 5}) + "\n" +
        json.dumps({"prompt": "a small red circle", "seed": 6, "lora": []}) + "\n")
    storage.filesystem(models).put([str(inputs / n) for n in sorted(os.listdir(inputs))],
                                   [f"{models}/inputs2/{n}" for n in sorted(os.listdir(inputs))])

    def run(model, files, out):
        return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model", model,
                               "--prompts-file", f"{files}/prompts.jsonl", "--lora", f"{files}/style.safetensors:0.7",
                               "--embedding", f"{files}/tri.safetensors:<tri>", "--steps", "2", "--size", "32",
                               "--batch-size", "2", "--out", out], capture_output=True, text=True, timeout=600)

    out = f"{models}/out/run"
    result = run(f"{models}/shapes-model", f"{models}/inputs2", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert gcs.objects("models", "out/") == ["out/run/00000-5.png", "out/run/00001-6.png"]
    local_out = tmp_path / "out"
    shutil.copytree(sdjax.DEFAULT_MODEL, tmp_path / "shapes-model")  # the same model name in the parameters
    result = run(str(tmp_path / "shapes-model"), str(inputs), str(local_out))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("00000-5.png", "00001-6.png"):
        with Image.open(io.BytesIO(bytes(storage.read_bytes(f"{out}/{name}")))) as im:
            remote_pixels = np.asarray(im)
        with Image.open(local_out / name) as im:
            np.testing.assert_array_equal(remote_pixels, np.asarray(im))
        assert read_parameters(f"{out}/{name}") == read_parameters(str(local_out / name))
    assert "Lora hashes" in read_parameters(f"{out}/00000-5.png")
    assert "TI hashes" in read_parameters(f"{out}/00000-5.png")
    assert next_index(out) == 2  # a rerun numbers on after the bucket's images


@compat
def test_sample_cli_remote_errors_are_one_line(models, capsys):
    import sample
    from cli_checks import assert_one_line_exit_2

    assert_one_line_exit_2(sample.main, ["--model", "gs://no-such-bucket/m", "--prompt", "a", "--out",
                                         f"{models}/never"], "--model gs://no-such-bucket/m: no such bucket", capsys)
    assert_one_line_exit_2(sample.main, ["--prompt", "a", "--out", "gs://no-such-bucket/out"],
                           "--out gs://no-such-bucket/out: no such bucket 'no-such-bucket'", capsys)
    assert_one_line_exit_2(sample.main, ["--prompt", "a", "--init-image", f"{models}/inputs/none.png", "--out",
                                         f"{models}/never"], "none.png: cannot read image", capsys)


def test_remote_pickles_are_read_into_memory_only_when_allowed(models, tmp_path):
    """.bin/.pt files on a store: refused without allow_pickle as local ones are; with it, read into memory and
    unpickled from there, the same tensors as the local file's."""
    torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")
    from sdjax.convert.diffusers import read_pickle_weights
    from sdjax.textual_inversion import read_embedding

    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    local = str(tmp_path / "weights.bin")
    torch.save(state, local)
    remote = f"{models}/pickles/weights.bin"
    storage.filesystem(models).put_file(local, remote)
    with pytest.raises(CheckpointError, match=f"{remote}: pickle weights are not read by default"):
        read_pickle_weights(remote, allow_pickle=False)
    ours, reference = read_pickle_weights(remote, allow_pickle=True), read_pickle_weights(local, allow_pickle=True)
    assert list(ours) == list(reference)
    for name in reference:
        np.testing.assert_array_equal(ours[name], reference[name])
    embedding = str(tmp_path / "tri.pt")
    torch.save({"string_to_param": {"*": torch.full((2, 64), 0.5)}, "name": "tri"}, embedding)
    storage.filesystem(models).put_file(embedding, f"{models}/pickles/tri.pt")
    read = read_embedding(f"{models}/pickles/tri.pt", allow_pickle=True)
    assert read.name == "tri"
    np.testing.assert_array_equal(read.vectors[None], np.full((2, 64), 0.5, np.float32))
