"""``python -m dip_lightning demo-data --out data/demo``: build the embedded demo dataset, by default exactly the one
``demo`` trains on (so that ``demo`` finds it built)."""

from __future__ import annotations

import sys

from dip_lightning.commands import CommandParser
from dip_lightning.commands.demo import DEFAULT_CONFIG, add_crop_options, config_image_size
from dip_lightning.core.data.demo_dataset import build_demo_dataset, describe_replaced
from dip_lightning.core.recipes import resolve_config


def build_parser() -> CommandParser:
    p = CommandParser(
        "demo-data",
        description="Build the small class-conditional demo dataset from scikit-image's bundled photos; by default "
        "the one `demo` trains on.",
    )
    p.add_argument("--out", type=str, default="data/demo", help="output folder (default data/demo)")
    p.add_argument("--size", type=int, help="image size (default: the demo recipe's input_size)")
    add_crop_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = build_demo_dataset(
            args.out,
            size=config_image_size(resolve_config(DEFAULT_CONFIG)) if args.size is None else args.size,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            crop_scale=tuple(args.crop_scale),
            seed=args.seed,
            workers=args.workers,
            progress=True,
            on_wait=print,
        )
    except ModuleNotFoundError as exc:
        print(f"error: {exc}; install the demo extra: pip install -e '.[demo]'", file=sys.stderr)
        return 2
    if replaced := describe_replaced(info):
        print(replaced)
    print(
        f"demo dataset: {info['num_train']} train / {info['num_val']} val images, "
        f"{info['num_classes']} classes, {info['image_size']} px in {info['root']}"
    )
    print("data config:")
    print(f"  train_shards: {info['train_shards']}")
    print(f"  val_shards: {info['val_shards']}")
    print(f"  image_size: {info['image_size']}")
    print(f"  num_classes: {info['num_classes']}")
    return 0
