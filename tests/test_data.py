"""The data layer: shapes dataset, TFDS builders (no TensorFlow), grain pipeline, resume, bad input."""

import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sdjax.data import preprocess, shapes
from sdjax.data.latent_cache import ensure_latent_cache
from sdjax.data.pipeline import make_dataset, make_iterator
from sdjax.data.source import default_data_config, image_preprocess, make_source
from sdjax.data.prepare import main as prepare_main
from sdjax.data.prepare import prepare

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

RES = 32
MAX_LEN = 16
BOS, EOS = 1, 2


def tokenize(captions):
    """Caption bytes between BOS and EOS, zero-padded: a stand-in for CLIP that can be decoded back
    ({batch key: ids}, as sdjax.conditioning.tokenizer_fn gives them)."""
    ids = np.zeros((len(captions), MAX_LEN), np.int32)
    for row, caption in enumerate(captions):
        tokens = [BOS, *caption.encode()[:MAX_LEN - 2], EOS]
        ids[row, :len(tokens)] = tokens
    return {"input_ids": ids}


def detokenize(ids_row) -> str:
    ids = list(ids_row)
    return bytes(ids[1:ids.index(EOS)]).decode()


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class SdjaxTestNumbered(tfds.core.GeneratorBasedBuilder):
    """Examples with unique captions "example <i>"; config "corrupt" has undecodable images at CORRUPT."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="clean"), tfds.core.BuilderConfig(name="corrupt")]
    SIZES = {"clean": 64, "corrupt": 16}
    CORRUPT = (3, 11)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        name = self.builder_config.name
        for i in range(self.SIZES[name]):
            image = png_bytes(np.full((RES + 8, RES, 3), i, np.uint8))
            if name == "corrupt" and i in self.CORRUPT:
                image = b"\x89PNG this is not an image"
            yield i, {"image": image, "caption": f"example {i}"}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    for config in ("clean", "corrupt"):
        SdjaxTestNumbered(config=config, data_dir=root, file_format="array_record").download_and_prepare(
            download_dir=os.path.join(root, "downloads"))
    return root


def shapes_config(data_dir, **changes):
    config = default_data_config()
    config.data_dir = data_dir
    config.resolution = RES
    config.shapes.num_examples = 64
    config.shapes.num_test_examples = 8
    config.read_threads = 2
    config.prefetch_buffer = 16
    config.update(changes)
    return config


def numbered_config(data_dir, name="clean", **changes):
    return shapes_config(data_dir, **{"source": "tfds", "name": f"sdjax_test_numbered/{name}", "caption_dropout": 0.0,
                                      **changes})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# --- shapes -------------------------------------------------------------------------------------


def test_shapes_examples_are_a_pure_function_of_seed_and_index():
    a, b = shapes.make_example(7, seed=3, resolution=RES), shapes.make_example(7, seed=3, resolution=RES)
    assert a["image"].dtype == np.uint8 and a["image"].shape == (RES, RES, 3)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    for index, seed in ((8, 3), (7, 4)):  # another index or another seed: another example
        other = shapes.make_example(index, seed=seed, resolution=RES)
        assert not np.array_equal(a["image"], other["image"])


def test_shapes_captions_and_pixels_match_the_labels():
    seen = set()
    for index in range(200):
        ex = shapes.make_example(index, seed=0, resolution=RES)
        seen.add((ex["shape"], ex["color"], ex["size"], ex["background"]))
        assert ex["caption"] == f"a {ex['size']} {ex['color']} {ex['shape']} on a {ex['background']} background"
        assert ex["color"] != ex["background"]
        pixels = ex["image"].reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == shapes.RGB[ex["background"]]  # background dominates
        shape_area = np.all(pixels == shapes.RGB[ex["color"]], axis=1).mean()
        # Smallest large shape (triangle, 0.6^2 / 2) vs largest small shape (square, 0.3^2).
        assert (shape_area > 0.13) == (ex["size"] == "large"), ex["caption"]
    assert {s for s, *_ in seen} == set(shapes.SHAPES) and {c for _, c, *_ in seen} == set(shapes.COLORS)


def test_shapes_builder_splits_and_features(tmp_path):
    path = prepare("shapes", str(tmp_path), num_examples=12, num_test_examples=4, resolution=RES, seed=5)
    assert prepare("shapes", str(tmp_path), num_examples=12, num_test_examples=4, resolution=RES, seed=5) == path
    builder = tfds.builder_from_directory(path)
    train, test = builder.as_data_source("train"), builder.as_data_source("test")
    assert (len(train), len(test)) == (12, 4)
    captions = set()
    for split in (train, test):
        for ex in split:
            assert ex["image"].shape == (RES, RES, 3)
            words = ex["caption"].decode().split()
            assert (words[1], words[2], words[3], words[-2]) == tuple(
                ex[k].decode() for k in ("size", "color", "shape", "background"))
            captions.add(ex["caption"])
    # The splits are examples 0..11 and 12..15 of the same seed, written in some order.
    expected = {shapes.make_example(i, 5, RES)["caption"].encode() for i in range(16)}
    assert captions == expected


# --- batches ------------------------------------------------------------------------------------


def test_batches_have_the_promised_shapes_dtypes_and_range(data_dir):
    config = shapes_config(data_dir, crop="random", flip=True)
    batches = take(make_iterator(config, tokenize, global_batch_size=4, seed=0), 20)
    for batch in batches:
        assert set(batch) == {"pixels", "input_ids", "original_size", "crop_top_left", "caption_dropped"}
        assert batch["original_size"].dtype == batch["crop_top_left"].dtype == np.int32
        assert batch["original_size"].shape == batch["crop_top_left"].shape == (4, 2)
        assert batch["caption_dropped"].dtype == np.bool_ and batch["caption_dropped"].shape == (4,)
        assert batch["pixels"].shape == (4, RES, RES, 3) and batch["pixels"].dtype == np.float32
        assert batch["input_ids"].shape == (4, MAX_LEN) and batch["input_ids"].dtype == np.int32
        assert batch["pixels"].min() >= -1.0 and batch["pixels"].max() <= 1.0
    pixels = np.concatenate([b["pixels"] for b in batches])
    assert pixels.min() < -0.8 and pixels.max() > 0.8  # the full range is used, not e.g. [0, 1]


def test_caption_dropout_rate_and_empty_prompt(data_dir):
    config = numbered_config(data_dir, caption_dropout=0.3)
    ids = np.concatenate([b["input_ids"] for b in take(make_iterator(config, tokenize, global_batch_size=8, seed=1), 60)])
    empty = tokenize([""])["input_ids"][0]
    dropped = np.all(ids == empty, axis=1)
    assert 0.22 < dropped.mean() < 0.38, dropped.mean()  # 480 draws: +-3.5 standard deviations
    assert all(detokenize(row).startswith("example ") for row in ids[~dropped])


def test_hosts_read_their_rows_of_the_same_global_batches(data_dir):
    """Two hosts' batches, stacked in process order, are the one-host batches: the run does not
    depend on the number of hosts. Each epoch covers the split once across the hosts."""
    config = numbered_config(data_dir, crop="random", flip=True, caption_dropout=0.2)
    single = take(make_iterator(config, tokenize, global_batch_size=8, seed=0), 16)
    hosts = [take(make_iterator(config, tokenize, global_batch_size=8, seed=0, process_index=i, process_count=2), 16)
             for i in range(2)]
    for whole, part0, part1 in zip(single, *hosts):
        assert part0["pixels"].shape[0] == part1["pixels"].shape[0] == 4
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([part0[key], part1[key]]))
    plain = numbered_config(data_dir)
    captions = [[detokenize(r) for b in take(make_iterator(plain, tokenize, global_batch_size=8, seed=0,
                                                           process_index=i, process_count=2), 8)
                 for r in b["input_ids"]] for i in range(2)]
    assert not set(captions[0]) & set(captions[1])
    assert set(captions[0]) | set(captions[1]) == {f"example {i}" for i in range(64)}
    with pytest.raises(ValueError, match="global_batch_size 6 is not a positive multiple of process_count 4"):
        make_iterator(config, tokenize, global_batch_size=6, seed=0, process_count=4)


def test_same_seed_same_stream_other_seed_other_order(data_dir):
    config = numbered_config(data_dir, crop="random", flip=True, caption_dropout=0.2)
    a, b, c = (take(make_iterator(config, tokenize, global_batch_size=4, seed=s), 5) for s in (0, 0, 1))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_resume_reproduces_the_batches_bitwise(data_dir):
    config = shapes_config(data_dir, crop="random", flip=True, caption_dropout=0.3)
    it = make_iterator(config, tokenize, global_batch_size=4, seed=7)
    take(it, 11)  # into the second epoch of 64 examples
    state = json.loads(json.dumps(it.get_state()))  # as the trainer stores it
    expected = take(it, 25)
    fresh = make_iterator(config, tokenize, global_batch_size=4, seed=7)
    fresh.set_state(state)
    for want, got in zip(expected, take(fresh, 25)):
        assert np.array_equal(want["pixels"], got["pixels"]) and np.array_equal(want["input_ids"], got["input_ids"])


# --- preprocessing ------------------------------------------------------------------------------


def test_resize_crop_and_flip_of_a_wide_image():
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :32] = (255, 0, 0)  # left half red, right half blue
    image[:, 32:] = (0, 0, 255)
    example = {"image": png_bytes(image), "caption": b"two halves"}
    rng = np.random.default_rng(0)
    out = preprocess.Preprocess("image", "caption", resolution=16)(example, rng)
    assert out["image"].shape == (16, 16, 3) and out["caption"] == "two halves"
    # 64x32 -> 32x16, centre crop keeps x in [8, 24): left half red, right half blue.
    assert np.all(out["image"][:, :7, 0] > 200) and np.all(out["image"][:, 9:, 2] > 200)
    flipped = [preprocess.Preprocess("image", "caption", 16, flip=True)(example, np.random.default_rng(s))
               for s in range(20)]
    reds_left = {bool(f["image"][0, 0, 0] > 200) for f in flipped}
    assert reds_left == {True, False}  # some flipped, some not


def test_original_size_and_crop_corner_are_recorded_as_sdxl_conditions_on_them():
    """original_size is the stored image's (height, width) (a JPEG's header size, though it decodes at a
    reduced draft scale); crop_top_left is where the crop sits in the resized image, mirrored with the
    flip so that it is the corner of the pixels the model sees; caption_dropped says the caption was dropped."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((24, 16), Image.BICUBIC))  # shorter side 40 -> 16
    example = {"image": png_bytes(image), "caption": b"noise"}
    corners, flips = set(), set()
    for seed in range(40):
        out = preprocess.Preprocess("image", "caption", 16, crop="random", flip=True,
                                    caption_dropout=0.5)(example, np.random.default_rng(seed))
        assert out["original_size"].tolist() == [40, 60] and out["original_size"].dtype == np.int32
        top, left = out["crop_top_left"].tolist()
        assert top == 0 and 0 <= left <= 8
        flipped = not np.array_equal(out["image"], resized[:, left:left + 16])
        if flipped:  # the corner is the one of the flipped image
            np.testing.assert_array_equal(out["image"], resized[:, ::-1][:, left:left + 16])
        assert out["caption_dropped"] == (out["caption"] == "")
        corners.add(left)
        flips.add(flipped)
    assert len(corners) > 3 and flips == {True, False}
    big = Image.fromarray(np.repeat(np.repeat(image, 8, 0), 8, 1))  # 320 x 480: JPEG drafts it at 1/8
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG")
    out = preprocess.Preprocess("image", "caption", 16)({"image": buffer.getvalue(), "caption": b"x"},
                                                        np.random.default_rng(0))
    assert out["original_size"].tolist() == [320, 480] and out["crop_top_left"].tolist() == [0, 4]
    assert not out["caption_dropped"]


def test_unreadable_images_are_skipped_counted_and_logged(data_dir, caplog):
    config = numbered_config(data_dir, name="corrupt")
    dataset = make_dataset(make_source(config), image_preprocess(config), seed=0)
    preprocess.reset_unreadable_count()
    with caplog.at_level(logging.WARNING, logger="sdjax.data.preprocess"):
        epoch = [dataset[i] for i in range(16)]
    assert sum(e is None for e in epoch) == len(SdjaxTestNumbered.CORRUPT)
    assert preprocess.unreadable_images_skipped() == len(SdjaxTestNumbered.CORRUPT)
    assert "unreadable image skipped" in caplog.text
    # The iterator drops them: an epoch of 14 good examples, no corrupt one among them.
    it = make_iterator(config, tokenize, global_batch_size=2, seed=0)
    captions = [detokenize(r) for b in take(it, 7) for r in b["input_ids"]]
    good = {f"example {i}" for i in range(16) if i not in SdjaxTestNumbered.CORRUPT}
    assert set(captions) == good
    assert preprocess.unreadable_images_skipped() >= 2 * len(SdjaxTestNumbered.CORRUPT)


# --- latent cache -------------------------------------------------------------------------------


def fake_encode(pixels):
    """A stand-in for the VAE, a function of each image alone: 4x4 average pooling and its negative."""
    pooled = pixels.reshape(len(pixels), RES // 4, 4, RES // 4, 4, 3).mean(axis=(2, 4))
    return pooled, -pooled


def test_cached_stream_is_the_pixel_stream_encoded(data_dir, tmp_path):
    """Same examples in the same order, same captions (dropout drawn per position), unreadable images
    skipped, same host rows and the same iterator state (either stream resumes from the other's)."""
    config = numbered_config(data_dir, name="corrupt", caption_dropout=0.3)
    folder = str(tmp_path / "cache")
    ensure_latent_cache(folder, config, fake_encode, {"encoder": "fake"}, chunk=5, progress=False)
    with open(os.path.join(folder, "meta.json")) as f:
        assert json.load(f)["unreadable"] == len(SdjaxTestNumbered.CORRUPT)
    for count in (1, 2):
        for index in range(count):
            kw = dict(global_batch_size=4, seed=3, process_index=index, process_count=count)
            pixels, cached = make_iterator(config, tokenize, **kw), make_iterator(config, tokenize, latents=folder, **kw)
            for _ in range(12):  # several epochs of the 14 readable examples
                want, got = next(pixels), next(cached)
                assert set(got) == {"latent_mean", "latent_logvar", "input_ids", "original_size", "crop_top_left",
                                    "caption_dropped"}
                for key in ("input_ids", "original_size", "crop_top_left", "caption_dropped"):
                    np.testing.assert_array_equal(got[key], want[key])
                mean, logvar = fake_encode(want["pixels"])
                np.testing.assert_allclose(got["latent_mean"], mean, rtol=1e-6)
                np.testing.assert_allclose(got["latent_logvar"], logvar, rtol=1e-6)
            state = json.loads(json.dumps(pixels.get_state()))
            assert cached.get_state() == state
            resumed = make_iterator(config, tokenize, latents=folder, **kw)
            resumed.set_state(state)
            for want, got in zip(take(cached, 5), take(resumed, 5)):
                for key in want:
                    np.testing.assert_array_equal(want[key], got[key])
    captions = take(make_iterator(config, tokenize, global_batch_size=4, seed=3, latents=folder), 30)
    assert 0 < np.mean([detokenize(r) == "" for b in captions for r in b["input_ids"]]) < 0.5


def test_cached_caption_choice_matches_a_caption_sequence():
    """A cache stores every caption as a list; picking from it gives what the raw feature gives."""
    raw = np.asarray([b"first", b"second", b"third"], dtype=object)
    for seed in range(20):
        draws = preprocess.draw(np.random.default_rng(seed))
        listed = np.asarray(preprocess.caption_values(raw), dtype=object)
        assert preprocess.choose_caption(listed, draws, 0.2) == preprocess.choose_caption(raw, draws, 0.2)
    assert preprocess.caption_values(b"one") == ["one"]


def test_latent_cache_is_reused_rebuilt_when_its_inputs_change_and_never_half_written(data_dir, tmp_path, capsys):
    config = numbered_config(data_dir)
    folder = str(tmp_path / "cache")
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return fake_encode(pixels)

    ensure_latent_cache(folder, config, encode, {"vae": "a"}, chunk=24, progress=False)
    assert calls == [24, 24, 16]  # the 64 examples
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    calls.clear()
    ensure_latent_cache(folder, config, encode, {"vae": "a"}, chunk=24, progress=False)
    assert calls == [] and "latent cache: reusing" in capsys.readouterr().out
    ensure_latent_cache(folder, config, encode, {"vae": "b"}, chunk=24, progress=False)
    assert calls and "out of date (vae changed); rebuilding" in capsys.readouterr().out

    def fails_midway(pixels):
        if len(calls) > 3:
            raise RuntimeError("killed")
        return encode(pixels)

    with pytest.raises(RuntimeError):
        ensure_latent_cache(folder, config, fails_midway, {"vae": "c"}, chunk=24, progress=False)
    with open(os.path.join(folder, "meta.json")) as f:
        assert json.load(f)["identity"]["vae"] == "b"  # the last complete cache, untouched
    shutil.rmtree(folder)  # as if that build had started in a fresh workdir
    with pytest.raises(RuntimeError):
        ensure_latent_cache(folder, config, fails_midway, {"vae": "c"}, chunk=24, progress=False)
    assert not os.path.exists(folder)  # only the staging folder, which the next build clears
    calls.clear()
    ensure_latent_cache(folder, config, encode, {"vae": "c"}, chunk=24, progress=False)
    assert calls == [24, 24, 16] and sorted(os.listdir(tmp_path)) == ["cache"]


# --- image folders ------------------------------------------------------------------------------


def make_folder(root, layout):
    """Five captioned images (RGB PNG, JPEG, grayscale, RGBA, in a subfolder) with captions per layout."""
    os.makedirs(os.path.join(root, "sub"))
    rng = np.random.default_rng(0)
    images = {
        "a.png": Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
        "b.jpg": Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)),
        "c.png": Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8)),
        "d.png": Image.fromarray(rng.integers(0, 255, (36, 50, 4), dtype=np.uint8)),
        "sub/e.png": Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
    }
    for name, image in images.items():
        image.save(os.path.join(root, name))
    captions = {name: f"photo {name}" for name in images}
    if layout == "txt":
        for name, text in captions.items():
            with open(os.path.join(root, os.path.splitext(name)[0] + ".txt"), "w") as f:
                f.write(text + "\n")
    else:
        with open(os.path.join(root, "metadata.jsonl"), "w") as f:
            for name, text in captions.items():
                f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return captions


@pytest.mark.parametrize("layout", ["txt", "metadata"])
def test_image_folder_is_prepared_and_read(tmp_path, layout):
    src = str(tmp_path / "photos")
    captions = make_folder(src, layout)
    path = prepare("folder", str(tmp_path / "data"), src=src)
    source = tfds.builder_from_directory(path).as_data_source("train")
    assert sorted((ex["file_name"].decode(), ex["caption"].decode()) for ex in source) == sorted(captions.items())
    assert all(ex["image"].ndim == 3 and ex["image"].shape[-1] == 3 for ex in source)
    config = shapes_config(str(tmp_path / "data"), source="folder", caption_dropout=0.0)
    config.folder.src = src
    batches = take(make_iterator(config, tokenize, global_batch_size=5, seed=0), 2)
    assert batches[0]["pixels"].shape == (5, RES, RES, 3)
    assert {detokenize(r) for r in batches[0]["input_ids"]} == {t[:MAX_LEN - 2] for t in captions.values()}


def test_metadata_captions_keep_unicode_line_separators(tmp_path):
    """JSON written with ensure_ascii=False keeps U+2028 / U+0085 raw inside strings: not line breaks."""
    from sdjax.data.tfds_builders import folder_captions

    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a.png")
    caption = "first\u2028second\u0085third"
    (src / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": caption}, ensure_ascii=False)
                                        + "\r\n", encoding="utf-8")
    assert folder_captions(str(src), ["a.png"]) == {"a.png": caption}


def test_image_folder_skips_corrupt_images_at_prepare(tmp_path, caplog):
    src = str(tmp_path / "photos")
    make_folder(src, "txt")
    with open(os.path.join(src, "broken.png"), "wb") as f:
        f.write(png_bytes(np.zeros((32, 32, 3)))[:40])  # truncated
    with open(os.path.join(src, "broken.txt"), "w") as f:
        f.write("never read")
    with caplog.at_level(logging.WARNING, logger="sdjax.data.tfds_builders"):
        path = prepare("folder", str(tmp_path / "data"), src=src)
    assert "broken.png: unreadable image skipped" in caplog.text
    builder = tfds.builder_from_directory(path)
    assert len(builder.as_data_source("train")) == 5
    assert builder.info.metadata["skipped_corrupt_images"] == 1


def write_corrupt_jpeg(folder: str, name: str = "broken.jpg") -> None:
    """A JPEG header and nothing decodable after it, with a caption, in `folder`."""
    with open(os.path.join(folder, name), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + bytes(64))
    with open(os.path.join(folder, os.path.splitext(name)[0] + ".txt"), "w") as f:
        f.write("never read")


def test_unreadable_count_includes_images_the_folder_build_skipped(tmp_path):
    """The count a run logs (metrics' unreadable_images) counts the corrupt JPEG that the dataset build
    left out, though the pipeline never sees it; opening the dataset again does not count it twice."""
    src = str(tmp_path / "photos")
    make_folder(src, "txt")
    write_corrupt_jpeg(src)
    config = shapes_config(str(tmp_path / "data"), source="folder", caption_dropout=0.0)
    config.folder.src = src
    preprocess.reset_unreadable_count()
    assert len(make_source(config)) == 5  # builds the dataset without the corrupt image
    assert preprocess.unreadable_images_skipped() == 1
    take(make_iterator(config, tokenize, global_batch_size=5, seed=0), 2)  # opens it again, decodes all 5
    assert preprocess.unreadable_images_skipped() == 1


def test_image_folder_missing_caption_names_the_file(tmp_path):
    src = str(tmp_path / "photos")
    make_folder(src, "txt")
    os.remove(os.path.join(src, "sub", "e.txt"))
    with pytest.raises(ValueError, match=r"sub/e\.png: no caption"):
        prepare("folder", str(tmp_path / "data"), src=src)
    src = str(tmp_path / "photos2")
    make_folder(src, "metadata")
    Image.new("RGB", (8, 8)).save(os.path.join(src, "extra.png"))
    with pytest.raises(ValueError, match=r"extra\.png: no caption in metadata\.jsonl"):
        prepare("folder", str(tmp_path / "data"), src=src)


def test_prepare_cli(tmp_path, capsys):
    src = str(tmp_path / "photos")
    make_folder(src, "metadata")
    data = str(tmp_path / "data")
    assert prepare_main(["--kind", "folder", "--src", src, "--data_dir", data]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert os.path.isfile(os.path.join(path, "dataset_info.json"))
    assert prepare_main(["--kind", "folder", "--src", str(tmp_path / "nowhere"), "--data_dir", data]) == 1
    assert "nowhere: image folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--kind", "folder", "--data_dir", data])
    assert exit_info.value.code == 2 and "--kind folder needs --src" in capsys.readouterr().err


# --- configuration errors -----------------------------------------------------------------------


def test_missing_dataset_split_and_feature_are_named(data_dir):
    config = numbered_config(data_dir)
    config.name = "no_such_dataset"
    with pytest.raises(ValueError, match="data.name: tfds dataset 'no_such_dataset' not found in "):
        make_source(config)
    config.name = "sdjax_test_numbered/clean"
    config.data_dir = os.path.join(data_dir, "empty")
    with pytest.raises(ValueError, match="data.name: tfds dataset 'sdjax_test_numbered/clean' is not prepared in "):
        make_source(config)
    config = numbered_config(data_dir, caption_key="text")
    with pytest.raises(ValueError, match=r"data.caption_key: .* has no feature 'text'; available features: caption, image"):
        make_iterator(config, tokenize, global_batch_size=4, seed=0)
    config = numbered_config(data_dir, image_key="pixels")
    with pytest.raises(ValueError, match=r"data.image_key: .* no feature 'pixels'"):
        make_source(config)
    config = numbered_config(data_dir, split="validation")
    with pytest.raises(ValueError, match="data.split: .* has no split 'validation'; available: train"):
        make_source(config)
    with pytest.raises(ValueError, match="data.crop: expected one of center, random, got 'middle'"):
        make_source(numbered_config(data_dir, crop="middle"))
    config = shapes_config(data_dir, source="folder")
    with pytest.raises(ValueError, match="data.folder.src"):
        make_source(config)
