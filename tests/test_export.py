"""Export to the diffusers layout and back: PyTorch libraries read our files bit for bit."""

import os

import jax
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

import sdjax


@pytest.fixture(scope="module")
def sd1(checkpoints):
    folder, ref = checkpoints["sd1"]
    return sdjax.load(folder), ref


def _assert_same_state(loaded: torch.nn.Module, ref: torch.nn.Module, dtype=None):
    got, want = loaded.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        expected = tensor if dtype is None else tensor.to(dtype)
        assert got[key].dtype == expected.dtype, key
        assert torch.equal(got[key], expected), key


def test_export_reimports_bit_for_bit(sd1, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    sd, ref = sd1
    out = tmp_path / "exported"
    sd.save(str(out))
    _assert_same_state(UNet2DConditionModel.from_pretrained(out / "unet"), ref["unet"])
    _assert_same_state(AutoencoderKL.from_pretrained(out / "vae"), ref["vae"])
    _assert_same_state(CLIPTextModel.from_pretrained(out / "text_encoder"), ref["text_encoder"])
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    prompts = ["a red circle", "ciron ed"]
    expected = pipe.tokenizer(prompts, padding="max_length", max_length=77)["input_ids"]
    assert expected == sd.tokenize(prompts)["input_ids"].tolist()
    # Older readers need vocab.json/merges.txt beside tokenizer.json.
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(out / "tokenizer"))
    again = sdjax.load(str(out))
    for a, b in zip(jax.tree.leaves(sd.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    assert again.model.scheduler_config == sd.model.scheduler_config


def test_export_half_precision(sd1, tmp_path):
    from diffusers import UNet2DConditionModel

    sd, ref = sd1
    sd.save(str(tmp_path / "fp16"), dtype=np.float16)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "fp16" / "unet", torch_dtype=torch.float16)
    _assert_same_state(unet, ref["unet"], dtype=torch.float16)
    half = sdjax.load(str(tmp_path / "fp16"), dtype=jax.numpy.float16)
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {np.dtype(np.float16)}


def test_export_refuses_nonempty_folder_and_leaves_nothing_on_failure(sd1, tmp_path, monkeypatch):
    sd, _ = sd1
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(sdjax.StorageError, match="taken: already exists and is not empty"):
        sd.save(str(target))
    assert os.listdir(target) == ["keep.txt"]

    import sdjax.convert.diffusers as diffusers_io

    calls = []

    def failing_write(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(path, tensors, metadata)

    real_write = diffusers_io.write_safetensors
    monkeypatch.setattr(diffusers_io, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        sd.save(str(tmp_path / "interrupted"))
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no partial export, no staging folder


def _resident_file_bytes() -> int:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc/self/status (not Linux)")
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_release_pages_gives_back_a_mapped_tensor(tmp_path):
    from sdjax.convert.safetensors_io import read_safetensors, release_pages, write_safetensors

    path = str(tmp_path / "big.safetensors")
    write_safetensors(path, {"a": np.ones((64, 1024, 1024), np.uint8), "b": np.full((3, 5), 7, np.float32)})
    tensors = read_safetensors(path)
    before = _resident_file_bytes()
    assert int(tensors["a"].sum()) == 64 << 20  # reads every page in
    assert _resident_file_bytes() - before > 48 << 20
    release_pages(np.transpose(tensors["a"], (2, 0, 1)))  # any view of the tensor will do
    assert _resident_file_bytes() - before < 16 << 20
    assert int(tensors["a"].sum()) == 64 << 20  # still readable: paged in again from the file
    release_pages(tensors["b"])  # smaller than a page: nothing to give back, values unchanged
    np.testing.assert_array_equal(tensors["b"], np.full((3, 5), 7, np.float32))
    release_pages(np.ones(3))  # not a mapped tensor: nothing happens
    copied = np.memmap(path, dtype=np.uint8, mode="c")
    copied[:] = 5
    release_pages(copied)  # another mapping (copy-on-write here): left alone, the writes kept
    assert (copied == 5).all()


def test_load_releases_each_tensor_once_placed(checkpoints, monkeypatch):
    """With `place`, each checkpoint tensor's pages are given back right after its copy is placed, so
    loading never holds the file beside the placed model (peak memory: one model, not two)."""
    from sdjax.convert import state_dict
    from sdjax.convert.diffusers import load_component
    from sdjax.convert.safetensors_io import mapping_of

    folder, _ = checkpoints["sd1"]
    events = []
    monkeypatch.setattr(state_dict, "release_pages", lambda source: events.append(("release", source)))

    def place(value):
        events.append(("place", value))
        return jax.numpy.asarray(value)

    _, placed = load_component(folder, "unet", place=place)
    _, host = load_component(folder, "unet")
    n = len(jax.tree.leaves(host))
    assert n > 10 and [kind for kind, _ in events] == ["place", "release"] * n
    # Each release is of the file's tensor (torch layout) whose copy was just placed.
    for (_, placed_value), (_, released) in zip(events[::2], events[1::2]):
        assert mapping_of(released) is not None and np.shares_memory(placed_value, released)
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(host)):
        np.testing.assert_array_equal(a, b)


def test_export_gets_the_mode_of_any_new_folder(sd1, tmp_path):
    sd, _ = sd1
    previous = os.umask(0o022)
    try:
        sd.save(str(tmp_path / "shared"))
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "shared").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "shared" / "unet" / "config.json").st_mode & 0o777 == 0o644
