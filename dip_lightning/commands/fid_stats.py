"""``python -m dip_lightning fid-stats``: the kit's reference file from real images (shards or an npz)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dip_lightning.commands import CommandParser
from dip_lightning.commands.evaluate import _add_extractor_args
from dip_lightning.core.distributed import is_distributed, join_launched_processes, run_in_process_group
from dip_lightning.core.metrics.errors import MetricsError
from dip_lightning.core.metrics.features import (
    DINOV2_WEIGHTS_ENV,
    DINOv2Features,
    FeatureExtractor,
    make_extractor,
)
from dip_lightning.core.metrics.reference import (
    PR_REFERENCE_SIZE,
    FeatureSet,
    extract_feature_set,
    gather_feature_set,
    npz_feature_set,
    save_reference,
)
from dip_lightning.core.metrics.sources import iter_shard_images, npz_image_shape


def build_parser() -> CommandParser:
    parser = CommandParser(
        "fid-stats",
        description="Reference file for evaluate and the metrics callback: Inception statistics (FID, sFID), "
        "per-image pool features (precision/recall), the seam profile and optional DINOv2 statistics.",
    )
    # One of the two, checked in _run (a mutually exclusive group would keep --print_config from printing).
    parser.add_argument(
        "--shards",
        type=str | None,
        default=None,
        help="WebDataset shard pattern, e.g. 'data/val-{000000..000049}.tar'",
    )
    parser.add_argument(
        "--images",
        type=str | None,
        default=None,
        help="npz with uint8 images under arr_0 (NHWC, the ADM sample layout)",
    )
    parser.add_argument("--out", type=str, required=True, help="output npz")
    parser.add_argument("--limit", type=int | None, default=None, help="use at most this many images")
    parser.add_argument(
        "--image_size",
        type=int,
        default=256,
        help="shard images of another size are ADM-centre-cropped to this (default 256); 0 keeps them as is",
    )
    parser.add_argument(
        "--pr_size",
        type=int,
        default=PR_REFERENCE_SIZE,
        help=f"per-image pool features kept for precision/recall (default {PR_REFERENCE_SIZE}, as ADM's batches)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_extractor_args(parser)
    return parser


def main(argv: list[str]) -> int:
    return run_in_process_group(_run, argv)


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.shards is None) == (args.images is None):
        parser.error("give one of --shards and --images")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    rank, world, device = join_launched_processes()
    if args.device is not None:
        device = torch.device(args.device)
    extractor = make_extractor(args.extractor, args.extractor_path).to(device)
    dinov2 = None
    if args.dinov2_weights or os.environ.get(DINOV2_WEIGHTS_ENV):
        dinov2 = DINOv2Features(args.dinov2_weights).to(device)
    kinds = {"pool", "seam"} | ({"spatial"} & extractor.available()) | ({"dinov2"} if dinov2 else set())
    start = time.perf_counter()
    features = _real_features(args, kinds, extractor, dinov2, device, rank, world)
    source = args.shards or args.images
    if features.num_images < 2:
        raise MetricsError(f"{source} gave {features.num_images} images; statistics need at least 2")
    if rank == 0:
        dinov2_name = getattr(dinov2, "name", "")
        save_reference(out, features, overwrite=args.overwrite, pr_size=args.pr_size, dinov2_name=dinov2_name)
        print(
            f"wrote {out}: {features.num_images} images from {source}, extractor {extractor.name}, "
            f"{', '.join(sorted(kinds))} ({time.perf_counter() - start:.1f} s)"
        )
    if is_distributed():
        dist.barrier()
    return 0


def _real_features(
    args: Any,
    kinds: set[str],
    extractor: FeatureExtractor,
    dinov2: DINOv2Features | None,
    device: torch.device,
    rank: int,
    world: int,
) -> FeatureSet:
    """The features of the real images: shards split over the ranks and gathered, or an npz."""
    if args.shards:
        batches = iter_shard_images(
            args.shards,
            args.batch_size,
            args.image_size or None,
            args.limit,
            rank=rank,
            world_size=world,
            labelled=True,  # stored with the pool features: class agreement
        )
        return gather_feature_set(extract_feature_set(batches, kinds, extractor, device, dinov2))
    npz_image_shape(args.images)  # a clear error for a file without arr_0
    return npz_feature_set(args.images, kinds, extractor, device, args.batch_size, dinov2, args.limit)
