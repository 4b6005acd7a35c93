"""TFDS builders for the training data, written as ArrayRecord so they build and read without TensorFlow.

- ShapesBuilder ("sdjax_shapes"): the procedural shapes dataset of shapes.py, splits train and test.
- ImageFolderBuilder ("sdjax_image_folder"): a folder of images with captions (local, or a gs:// or other
  fsspec URL), split train.

Each set of options is its own BuilderConfig (its name encodes them), so different options never
share a directory. Read a prepared dataset with `tfds.builder_from_directory(path).as_data_source`
(see prepare.py), never with `tfds.load`, which needs TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import re

import tensorflow_datasets as tfds
from etils import epath


class _NoCustomConfigNotice(logging.Filter):
    """Drops TFDS's "Using custom data configuration" warning: our builders are configured by design,
    and TFDS repeats it every time a dataset is opened."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Using custom data configuration" not in str(record.msg)


logging.getLogger("absl").addFilter(_NoCustomConfigNotice())
from PIL import Image

from sdjax import storage
from sdjax.data import shapes

log = logging.getLogger(__name__)

# The dataset metadata key under which ImageFolderBuilder records how many unreadable images it skipped.
SKIPPED_IMAGES_KEY = "skipped_corrupt_images"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"


def skipped_at_build(info: tfds.core.DatasetInfo) -> int:
    """How many unreadable images the build of a dataset skipped, as its metadata records (0 if none)."""
    return int((info.metadata or {}).get(SKIPPED_IMAGES_KEY, 0))


class _CodePathHere:
    """Points tfds at this file directly.

    tfds' own lookup of a builder's source file, for a builder inside a package, probes the
    `importlib_resources` backport, which is not a dependency here.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


# ---------------------------------------------------------------------------------------------
# Shapes


@dataclasses.dataclass(eq=False)  # as tfds' BuilderConfig: compared by identity
class ShapesConfig(tfds.core.BuilderConfig):
    num_examples: int = 2000
    num_test_examples: int = 200
    resolution: int = 64
    seed: int = 0


def shapes_config(num_examples: int = 2000, num_test_examples: int = 200, resolution: int = 64,
                  seed: int = 0) -> ShapesConfig:
    """A ShapesConfig whose name spells its options, e.g. "n2000_t200_r64_s0"."""
    if int(num_examples) < 1:
        raise ValueError(f"shapes num_examples must be >= 1, got {num_examples}")
    if int(resolution) < 8:
        raise ValueError(f"shapes resolution must be >= 8 pixels, got {resolution}")
    if int(num_test_examples) < 0:
        raise ValueError(f"shapes num_test_examples must be >= 0, got {num_test_examples}")
    name = f"n{num_examples}_t{num_test_examples}_r{resolution}_s{seed}"
    return ShapesConfig(name=name, num_examples=int(num_examples), num_test_examples=int(num_test_examples),
                        resolution=int(resolution), seed=int(seed))


class ShapesBuilder(_CodePathHere, tfds.core.GeneratorBasedBuilder):
    """One coloured shape on a plain background with its caption and attribute labels."""

    name = "sdjax_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [shapes_config()]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural captioned shapes (sdjax.data.shapes).",
            features=tfds.features.FeaturesDict({
                # PNG: the generator hands PIL images, which need an explicit encoding.
                "image": tfds.features.Image(shape=(cfg.resolution, cfg.resolution, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "shape": tfds.features.Text(),
                "color": tfds.features.Text(),
                "size": tfds.features.Text(),
                "background": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        # Test examples continue the index range after train, so the splits never share an example.
        splits = {"train": self._generate_examples(0, cfg.num_examples)}
        if cfg.num_test_examples:
            splits["test"] = self._generate_examples(cfg.num_examples, cfg.num_examples + cfg.num_test_examples)
        return splits

    def _generate_examples(self, start: int, stop: int):
        cfg = self.builder_config
        for index in range(start, stop):
            example = shapes.make_example(index, cfg.seed, cfg.resolution)
            # A PIL image, because encoding a numpy array goes through TensorFlow.
            example["image"] = Image.fromarray(example["image"])
            yield index, example


# ---------------------------------------------------------------------------------------------
# Image folder


@dataclasses.dataclass(eq=False)  # as tfds' BuilderConfig: compared by identity
class ImageFolderConfig(tfds.core.BuilderConfig):
    src: str = ""
    caption_column: str = "text"


class _Folder:
    """The image folder `src`: a local folder (read through the OS, as always) or a URL of a store (one
    listing of every object under it, giving names, sizes and versions; reads requested concurrently)."""

    def __init__(self, src: str):
        self.src = src
        self.remote = storage.is_remote(src)
        self.objects: dict[str, tuple[int, str]] = {}  # remote: relative name -> (size, version)
        if self.remote:
            fs = storage.filesystem(src)
            root = fs._strip_protocol(src).rstrip("/") + "/"
            for path, info in fs.find(src, detail=True).items():
                if info.get("type") != "directory" and path.startswith(root):
                    self.objects[path[len(root):]] = (int(info.get("size") or 0), object_version(info))
            if storage.PARTIAL in self.objects:
                storage.check_complete(src)

    def path(self, name: str) -> str:
        return storage.join(self.src, name)

    def isfile(self, name: str) -> bool:
        return name in self.objects if self.remote else os.path.isfile(os.path.join(self.src, name))

    def images(self) -> list[str]:
        """Image paths under `src`, relative to it, sorted so the dataset order is reproducible."""
        if self.remote:
            return sorted(name for name in self.objects if name.lower().endswith(IMAGE_EXTENSIONS))
        found = []
        for root, dirs, files in os.walk(self.src):
            dirs.sort()
            for name in files:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.relpath(os.path.join(root, name), self.src))
        return sorted(found)

    def fingerprint(self, files: list[str]) -> str:
        """A short hash of the folder's path and of its files' names, sizes and times (versions, on a store).

        A changed folder gets a new config name, hence a fresh build instead of a stale one.
        """
        digest = hashlib.sha1((self.src if self.remote else os.path.abspath(self.src)).encode())
        for name in files + [METADATA_FILE] + [os.path.splitext(f)[0] + ".txt" for f in files]:
            if self.remote:
                if name in self.objects:
                    size, version = self.objects[name]
                    digest.update(f"{name}\0{size}\0{version}\n".encode())
                continue
            path = os.path.join(self.src, name)
            if os.path.isfile(path):
                stat = os.stat(path)
                digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:12]

    def read_text(self, name: str) -> str:
        return storage.read_text(self.path(name))

    def read_many(self, names: list[str], batch: int = 64):
        """(name, bytes, or the exception reading it raised) for each of `names`, in order; a store's are
        requested `batch` at a time, concurrently."""
        if not self.remote:
            for name in names:
                try:
                    yield name, storage.read_bytes(self.path(name))
                except OSError as e:
                    yield name, e
            return
        fs = storage.filesystem(self.src)
        for i in range(0, len(names), batch):
            part = names[i:i + batch]
            paths = [self.path(name) for name in part]
            # cat_ranges, not cat: cat reads *, ? and [ in a file name ("photo [1].jpg") as a pattern.
            contents = fs.cat_ranges(paths, None, None, on_error="return")
            yield from zip(part, contents)


def object_version(info: dict) -> str:
    """What changes when an object is written again: GCS's generation, else an etag or a time."""
    for key in ("generation", "etag", "ETag", "mtime", "LastModified", "updated"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def image_folder_config(src: str, caption_column: str = "text") -> ImageFolderConfig:
    """An ImageFolderConfig named after the folder and a fingerprint of its contents."""
    if storage.is_remote(src):
        src = src.rstrip("/")
        storage.check_readable(src, "image folder")
        if not storage.isdir(src):
            raise ValueError(f"{src}: image folder not found (not a folder)")
    elif not os.path.isdir(src):
        raise ValueError(f"{src}: image folder not found (not a directory)")
    folder = _Folder(src)
    files = folder.images()
    if not files:
        raise ValueError(f"{src}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    base = posixpath.basename(src) if folder.remote else os.path.basename(os.path.abspath(src))
    stem = re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_") or "folder"
    name = f"{stem}_{folder.fingerprint(files)}"
    return ImageFolderConfig(name=name, src=src if folder.remote else os.path.abspath(src),
                             caption_column=caption_column)


def _read_metadata(folder: _Folder, caption_column: str) -> dict[str, str]:
    """file_name -> caption from src/metadata.jsonl (the Hugging Face imagefolder layout)."""
    path = folder.path(METADATA_FILE)
    captions = {}
    # split("\n"), as reading line by line does: splitlines() would also cut at U+2028 and others that
    # JSON written with ensure_ascii=False keeps inside strings.
    for number, line in enumerate(folder.read_text(METADATA_FILE).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        for key in ("file_name", caption_column):
            if key not in row:
                raise ValueError(f"{path}:{number}: key {key!r} is missing")
        captions[os.path.normpath(row["file_name"])] = str(row[caption_column])
    return captions


def folder_captions(src: str | _Folder, files: list[str], caption_column: str = "text") -> dict[str, str]:
    """Caption of every image: from metadata.jsonl if the folder has one, else from <stem>.txt beside it.

    An image without a caption is an error naming it.
    """
    folder = src if isinstance(src, _Folder) else _Folder(src)
    if folder.isfile(METADATA_FILE):
        listed = _read_metadata(folder, caption_column)
        missing = [f for f in files if os.path.normpath(f) not in listed]
        if missing:
            raise ValueError(f"{folder.path(missing[0])}: no caption in {METADATA_FILE} "
                             f"({len(missing)} image(s) without one)")
        return {f: listed[os.path.normpath(f)] for f in files}
    texts = {name: os.path.splitext(name)[0] + ".txt" for name in files}
    for name, txt in texts.items():
        if not folder.isfile(txt):
            raise ValueError(f"{folder.path(name)}: no caption (expected {folder.path(txt)} or {METADATA_FILE})")
    captions = {}
    for txt, data in folder.read_many(list(texts.values())):
        if isinstance(data, Exception):
            raise data
        captions[txt] = bytes(data).decode("utf-8").replace("\r\n", "\n").strip()  # as text mode read it
    return {name: captions[txt] for name, txt in texts.items()}


def _encoded_rgb(data: bytes) -> bytes:
    """The image file's bytes if it is an RGB JPEG or PNG, else the image re-encoded as an RGB PNG.

    Decodes the whole image, so a truncated or corrupt file raises here, at prepare time.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.format in ("JPEG", "PNG") and image.mode == "RGB":
            return bytes(data)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()


class ImageFolderBuilder(_CodePathHere, tfds.core.GeneratorBasedBuilder):
    """A folder (local or a URL) of images with .txt captions beside them or a metadata.jsonl."""

    name = "sdjax_image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Captioned images from {self.builder_config.src}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "file_name": tfds.features.Text(),
            }),
            # The generator records how many unreadable images it skipped.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        folder = _Folder(cfg.src)
        files = folder.images()
        captions = folder_captions(folder, files, cfg.caption_column)  # fails before any writing
        return {"train": self._generate_examples(folder, files, captions)}

    def _generate_examples(self, folder: _Folder, files: list[str], captions: dict[str, str]):
        skipped = 0
        for name, data in folder.read_many(files):
            try:
                if isinstance(data, Exception):
                    raise data
                image = _encoded_rgb(data)
            except Exception as e:  # any decoder failure means the file is unusable
                skipped += 1
                log.warning("%s: unreadable image skipped (%s: %s)", folder.path(name), type(e).__name__, e)
                continue
            yield name, {"image": image, "caption": captions[name], "file_name": name}
        self.info.metadata[SKIPPED_IMAGES_KEY] = skipped
        if skipped:
            log.warning("%s: skipped %d unreadable image(s) of %d", folder.src, skipped, len(files))
