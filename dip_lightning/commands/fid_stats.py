"""``python -m dip_lightning fid-stats``: the kit's reference file from real images (shards or an npz)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dip_lightning.commands import CommandParser
from dip_lightning.commands.evaluate import _add_extractor_args
from dip_lightning.core.distributed import is_distributed, join_launched_processes, run_in_process_group
from dip_lightning.core.metrics.features import (
    DINOv2Features,
    make_extractor,
)
from dip_lightning.core.metrics.reference import (
    PR_REFERENCE_SIZE,
    extract_feature_set,
    gather_feature_set,
    npz_feature_set,
    save_reference,
)
from dip_lightning.core.metrics.sources import iter_shard_images, npz_image_shape


def main(argv: list[str]) -> int:
    """``python -m dip_lightning fid-stats``: the kit's reference file from real images (shards or an npz)."""
    return run_in_process_group(_fid_stats, argv)


def _fid_stats(argv: list[str]) -> int:
    parser = CommandParser(
        "fid-stats",
        description="Reference file for evaluate and the metrics callback: Inception statistics (FID, sFID), "
        "per-image pool features (precision/recall), the seam profile and optional DINOv2 statistics.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="WebDataset shard pattern, e.g. 'data/val-{000000..000049}.tar'")
    source.add_argument("--images", help="npz with uint8 images under arr_0 (NHWC, the ADM sample layout)")
    parser.add_argument("--out", required=True, help="output npz")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
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
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    rank, world, device = join_launched_processes()
    if args.device is not None:
        device = torch.device(args.device)
    extractor = make_extractor(args.extractor, args.extractor_path).to(device)
    dinov2 = None
    if args.dinov2_weights or os.environ.get("DIP_DINOV2_WEIGHTS"):
        dinov2 = DINOv2Features(args.dinov2_weights).to(device)
    kinds = {"pool", "seam"} | ({"spatial"} & extractor.available()) | ({"dinov2"} if dinov2 else set())
    start = time.perf_counter()
    if args.shards:
        batches = iter_shard_images(
            args.shards, args.batch_size, args.image_size or None, args.limit, rank=rank, world_size=world
        )
        features = gather_feature_set(extract_feature_set(batches, kinds, extractor, device, dinov2))
        source_name = args.shards
    else:
        npz_image_shape(args.images)  # a clear error for a file without arr_0
        features = npz_feature_set(args.images, kinds, extractor, device, args.batch_size, dinov2, args.limit)
        source_name = args.images
    if features.num_images < 2:
        print(
            f"error: {source_name} gave {features.num_images} images; statistics need at least 2",
            file=sys.stderr,
        )
        return 2
    if rank == 0:
        save_reference(
            out,
            features,
            overwrite=args.overwrite,
            pr_size=args.pr_size,
            dinov2_name=getattr(dinov2, "name", ""),
        )
        print(
            f"wrote {out}: {features.num_images} images from {source_name}, extractor {extractor.name}, "
            f"{', '.join(sorted(kinds))} ({time.perf_counter() - start:.1f} s)"
        )
    if is_distributed():
        dist.barrier()
    return 0
