"""Build a TFDS dataset (shapes or an image folder) once, and say where it lives.

    python -m sdjax.data.prepare --kind folder --src ./my_images --data_dir ./datasets
    python -m sdjax.data.prepare --kind shapes --num_examples 2000 --resolution 64

The printed directory is what `tfds.builder_from_directory` (and the "folder"/"shapes" sources of
sdjax.data.source) read. Building again with the same options is a no-op.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

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
    builder = builder_cls(config=make_config(**options), data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"), file_format="array_record")
    return builder.data_dir


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
