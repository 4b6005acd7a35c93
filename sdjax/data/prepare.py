"""Build a TFDS dataset (shapes or an image folder) once, and say where it lives.

    python -m sdjax.data.prepare --kind folder --src ./my_images --data_dir ./datasets
    python -m sdjax.data.prepare --kind shapes --num_examples 2000 --resolution 64

The printed directory is what `tfds.builder_from_directory` (and the "folder"/"shapes" sources of
sdjax.data.source) read. Building again with the same options is a no-op.

--src and --data_dir may be gs:// (or other fsspec) URLs. ArrayRecord files cannot be written to a
store directly, so a dataset for a remote data_dir is built in a local temporary folder and uploaded
(beside storage.PARTIAL until complete: a cut-off upload is built again).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile

from sdjax import storage

KINDS = ("shapes", "folder")


def default_data_dir() -> str:
    """$SDJAX_DATA_DIR, else ~/.cache/sdjax/datasets."""
    return os.environ.get("SDJAX_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sdjax", "datasets")


def prepare(kind: str, data_dir: str, **options) -> str:
    """Builds the dataset `kind` under data_dir unless already built; returns its versioned directory.

    kind "shapes": options num_examples, num_test_examples, resolution, seed.
    kind "folder": options src (the image folder, required), caption_column (metadata.jsonl key).
    """
    # Imported here so that `--help` and argument errors stay instant.
    from sdjax.data import tfds_builders as builders

    if kind == "shapes":
        make_config, builder_cls = builders.shapes_config, builders.ShapesBuilder
    elif kind == "folder":
        make_config, builder_cls = builders.image_folder_config, builders.ImageFolderBuilder
    else:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    accepted = inspect.signature(make_config).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for kind {kind!r}; accepted: {', '.join(accepted)}")
    if kind == "folder" and not options.get("src"):
        raise ValueError("kind 'folder' needs the option src (the image folder)")
    if storage.is_remote(data_dir):
        storage._check_credentials(data_dir)  # one line, not a wait on a metadata server
        point_array_record_at_emulator()
    config = make_config(**options)
    builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
    if not storage.is_remote(data_dir):
        if not builder.is_prepared():
            builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"), file_format="array_record")
        return builder.data_dir
    target = os.fspath(builder.data_dir)
    if builder.is_prepared() and storage.is_complete_folder(target):
        return target
    storage.check_writable(data_dir, "data_dir")
    with tempfile.TemporaryDirectory(prefix="sdjax-dataset-") as tmp:
        local = builder_cls(config=config, data_dir=tmp, file_format="array_record")
        local.download_and_prepare(download_dir=os.path.join(tmp, "downloads"), file_format="array_record")
        storage.remove(target)  # what a cut-off upload left
        storage.upload_folder(os.fspath(local.data_dir), target)
    return target


# The CLOUD_STORAGE_EMULATOR_ENDPOINT that point_array_record_at_emulator set, if any.
_endpoint_set: list[str] = []


def point_array_record_at_emulator() -> None:
    """ArrayRecord reads gs:// with Google Cloud's C++ client, which finds a storage emulator through
    CLOUD_STORAGE_EMULATOR_ENDPOINT, where gcsfs (sdjax.storage, TFDS's metadata) finds it through
    STORAGE_EMULATOR_HOST: with only the latter set, ArrayRecord would wait on the real service. The one
    emulator is given to both (following STORAGE_EMULATOR_HOST while it changes; a value the user set
    is left alone)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    current = os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT")
    if current and current not in _endpoint_set:
        return
    if host:
        endpoint = host if "://" in host else f"http://{host}"
        os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = endpoint
        _endpoint_set[:] = [endpoint]
    elif current:
        del os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"]
        _endpoint_set.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdjax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--data_dir", default=default_data_dir(), help="where TFDS datasets are written")
    parser.add_argument("--src", help="image folder (kind folder)")
    parser.add_argument("--caption_column", default="text", help="caption key in metadata.jsonl (kind folder)")
    parser.add_argument("--num_examples", type=int, default=2000, help="train examples (kind shapes)")
    parser.add_argument("--num_test_examples", type=int, default=200, help="test examples (kind shapes)")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (kind shapes)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (kind shapes)")
    args = parser.parse_args(argv)
    if args.kind == "folder":
        if not args.src:
            parser.error("--kind folder needs --src DIR")
        options = {"src": args.src, "caption_column": args.caption_column}
    else:
        options = {"num_examples": args.num_examples, "num_test_examples": args.num_test_examples,
                   "resolution": args.resolution, "seed": args.seed}
    try:
        path = prepare(args.kind, args.data_dir, **options)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
