"""``python -m dip_lightning prepare``: WebDataset shards from an image folder (ImageNet)."""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse.typing import PositiveInt

from dip_lightning.commands import CommandParser
from dip_lightning.core.data.prepare import prepare_split
from dip_lightning.core.data.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> CommandParser:
    p = CommandParser(
        "prepare",
        description="Turn an ImageFolder (or a flat folder + label file) into WebDataset tar shards.",
    )
    p.add_argument(
        "--src", type=str, required=True, help="ImageFolder root (one folder per class) or a flat folder"
    )
    p.add_argument("--out", type=str, default="data/shards", help="output folder (default: data/shards)")
    p.add_argument(
        "--split",
        type=str | None,
        default=None,
        help="shard name prefix (default: val for a val* src, else train)",
    )
    p.add_argument("--size", type=int, default=256, help="output resolution (default 256)")
    p.add_argument("--format", choices=("png", "jpg", "orig"), default="png", help="storage (default png)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for --format jpg (default 95)")
    p.add_argument("--png_level", type=int, default=1, help="PNG compression level 0-9 (default 1)")
    p.add_argument("--preprocess", choices=("adm", "none"), default="adm", help="adm crop (default) or none")
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    p.add_argument(
        "--max_pixels",
        type=PositiveInt,  # an image limit: a usage error below 1, not a traceback from ImageLimits
        default=DEFAULT_MAX_PIXELS,
        help=f"skip (and list) images declaring more pixels, undecoded (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--max_image_bytes",
        type=PositiveInt,
        default=DEFAULT_MAX_BYTES,
        help=f"skip (and list) files, or decoded images, larger than this (default {DEFAULT_MAX_BYTES})",
    )
    p.add_argument(
        "--labels",
        type=str | None,
        default=None,
        help="label file for a flat --src ('<file> <label>' per line)",
    )
    p.add_argument(
        "--classes",
        type=str | None,
        default=None,
        help="class list (one name per line) fixing the label indices",
    )
    p.add_argument("--workers", type=int | None, default=None, help="processes (default: all usable cores)")
    p.add_argument("--overwrite", action="store_true", help="delete this split's shards in --out first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    split = args.split or ("val" if Path(args.src).name.lower().startswith("val") else "train")
    try:
        manifest = prepare_split(
            args.src,
            args.out,
            split=split,
            image_size=args.size,
            format=args.format,
            quality=args.quality,
            png_level=args.png_level,
            preprocess=args.preprocess,
            shard_size=args.shard_size,
            seed=args.seed,
            max_pixels=args.max_pixels,
            max_image_bytes=args.max_image_bytes,
            labels=args.labels,
            classes=args.classes,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (complete shards are kept)", file=sys.stderr)
        return 130
    out = Path(args.out)
    print(
        f"{split}: {manifest['num_samples']} samples in {manifest['num_shards']} shards, "
        f"{manifest['num_classes']} classes, {manifest['num_bad']} skipped -> {out / manifest['pattern']}"
    )
    for entry in manifest["bad_files"][:20]:
        print(f"  skipped {entry['path']}: {entry['error']}")
    if manifest["num_bad"] > 20:
        print(f"  ... {manifest['num_bad'] - 20} more in {out / (split + '-manifest.json')}")
    return 0
