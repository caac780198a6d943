"""Evaluate one checkpoint over a grid of sampling settings: weights x guide x guidance (scale, interval) x steps.

Each combination is a :class:`Cell`; a setting it does not give keeps the checkpoint's. A cell exports its images
(:func:`~dip_lightning.evaluation.export.export_samples`) and rank 0 scores them against one reference. The
records in the sweep folder (``sweep.json``, ``cells/<cell>/cell.json``, ``result.json``) make a killed sweep
resumable and a rerun over other weights or settings an error, never a silent mix. Rank 0 summarizes the cells
in ``sweep.csv``, ``sweep.md`` and a plot against the guidance scale, with the settings each cell really ran with.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dip_lightning.checkpoint.format import DEFAULT_WEIGHTS, WeightRequest, select_weights, weights_label
from dip_lightning.checkpoint.io import read_checkpoint
from dip_lightning.core.atomic import atomic_write, atomic_write_json, write_or_compare_json
from dip_lightning.core.diffusion import SAMPLER_OVERRIDES, check_guide, sampler_overrides
from dip_lightning.core.distributed import launch_place
from dip_lightning.core.errors import KitError
from dip_lightning.core.metrics.reference import check_reference_file
from dip_lightning.evaluation.export import export_samples, weights_fingerprint
from dip_lightning.evaluation.seeds import SPREAD_STATS, metric_spreads, resolve_seeds, spread_column
from dip_lightning.evaluation.tables import (
    best_of,
    format_number,
    markdown_table,
    ordered_metrics,
    plot_series,
    require_matplotlib,
)
from dip_lightning.training.autoguidance import load_guide
from dip_lightning.training.loading import load_module

__all__ = ["Cell", "SweepError", "grid_cells", "run_sweep", "write_summary"]

#: The settings of a cell, one CSV column each; ``weights`` is what was loaded, in words (``weights_label``);
#: ``guide`` the autoguidance guide (``none``: classifier-free guidance).
SETTING_COLUMNS = ("weights", "guide", "cfg_scale", "cfg_interval", "num_steps")

#: The ``--guide`` value of the classifier-free (unconditional) branch, i.e. no guide network.
NO_GUIDE = "none"


class SweepError(KitError, ValueError):
    """A sweep folder or argument that does not fit this run; the message names it and the fix."""


@dataclass(frozen=True)
class Cell:
    """One setting of the grid; None keeps the checkpoint's own value."""

    weights: WeightRequest = DEFAULT_WEIGHTS  # ema: the checkpoint's first EMA decay
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    num_steps: int | None = None
    guide: str | None = None  # autoguidance: the guide's checkpoint or folder; None: classifier-free guidance

    @property
    def name(self) -> str:
        """The cell's folder name, e.g. ``ema0.9999_cfg1.5_interval0.1-1.0_steps50`` (``ema``: the default);
        a guided cell ends in ``_guide-<file stem>-<hash of its resolved path>``."""

        def text(value: Any) -> str:
            return "default" if value is None else str(value)

        interval = "default" if self.cfg_interval is None else "-".join(str(v) for v in self.cfg_interval)
        weights = str(self.weights).replace(":", "")
        name = f"{weights}_cfg{text(self.cfg_scale)}_interval{interval}_steps{text(self.num_steps)}"
        if self.guide is None:
            return name
        resolved = str(Path(self.guide).resolve())
        digest = hashlib.sha256(resolved.encode()).hexdigest()[:8]
        return f"{name}_guide-{Path(resolved).stem}-{digest}"

    def sampler_overrides(self) -> dict[str, Any]:
        """The cell's sampler settings that replace the checkpoint's (:func:`sampler_overrides`)."""
        return sampler_overrides(**{name: getattr(self, name) for name in SAMPLER_OVERRIDES})


def grid_cells(
    weights: Sequence[WeightRequest] | None = None,
    cfg_scale: Sequence[float] | None = None,
    cfg_interval: Sequence[tuple[float, float]] | None = None,
    num_steps: Sequence[int] | None = None,
    guide: Sequence[str | None] | None = None,
) -> list[Cell]:
    """Every combination, weights outermost (one load per set), then the guide (``none``/None: CFG), guidance
    scale innermost."""
    guides = [None if g in (None, NO_GUIDE) else g for g in (guide or [None])]
    axes = [
        list(weights or [DEFAULT_WEIGHTS]),
        guides,
        list(cfg_interval or [None]),
        list(num_steps or [None]),
        list(cfg_scale or [None]),
    ]
    for values in axes:
        if len(set(values)) != len(values):
            raise SweepError(f"a setting is listed twice: {values}")
    return [
        Cell(weights=e, cfg_scale=w, cfg_interval=tuple(i) if i is not None else None, num_steps=s, guide=g)
        for e, g, i, s, w in itertools.product(*axes)
    ]


# ------------------------------------------------------------------------------------------------ records
def _check_or_write(path: Path, record: dict[str, Any], what: str, fix: str) -> None:
    """Write ``record`` to ``path``, or check that the one there is the same (every rank may call it)."""
    differ = write_or_compare_json(path, record)
    if differ:
        raise SweepError(f"{path} records {what} with other {', '.join(differ)}; {fix} (nothing was changed)")


def _effective_settings(module: Any, cell: Cell, guide: Any = None) -> dict[str, Any]:
    """What the cell really samples with: the sampler's fields after the overrides, the weights and the guide
    (recorded only for a guided cell, so the records of earlier sweeps stay valid)."""
    sampler = module.make_sampler(**cell.sampler_overrides())
    guided = {}
    if cell.guide is not None:
        guided = {
            "guide": cell.guide,
            "guide_weights": str(getattr(guide, "loaded_weights", "")),
            "guide_weights_sha256": guide.weights_sha256,
        }
    return {
        "weights": str(getattr(module, "loaded_weights", "")),
        "cfg_scale": float(sampler.cfg_scale),
        "cfg_interval": [float(v) for v in sampler.cfg_interval],
        "num_steps": int(sampler.num_steps),
        "sampler": repr(sampler),
        **guided,
    }


def _score(
    samples_path: Path, args: Any, patch_size: int | None
) -> tuple[dict[str, float | None], dict[str, str]]:
    """The cell's metrics (None, never NaN, where one cannot be computed) and why each None is None."""
    from dip_lightning.core.metrics import MetricUnavailableWarning, compute_metrics

    with np.load(samples_path) as npz:
        samples = npz["arr_0"]
        labels = npz["arr_1"] if "arr_1" in npz.files else None
    unavailable: dict[str, str] = {}
    with warnings.catch_warnings():  # the reasons are recorded in result.json and printed with the cell
        warnings.simplefilter("ignore", MetricUnavailableWarning)
        metrics = compute_metrics(
            samples,
            args.reference,
            metrics=args.metrics,
            patch_size=patch_size,
            device=args.device,
            batch_size=args.metrics_batch_size,
            unavailable=unavailable,
            labels=labels,
        )
    return metrics, unavailable


def _generate(
    module: Any,
    cell: Cell,
    samples: Path,
    seed: int,
    args: Any,
    rank: int,
    world_size: int,
    guide: Any = None,
) -> bool:
    """Export the cell's images of ``seed`` to ``samples`` (this rank's chunks); whether they are all there."""
    made = export_samples(
        module,
        samples,
        args.num_samples,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        device=args.device,
        wait_timeout=args.wait_timeout,
        guide=guide,
        **cell.sampler_overrides(),
    )
    if made is None and rank == 0:
        raise SweepError(
            f"{cell.name}: the other processes' chunks did not appear within {args.wait_timeout:.0f} s; "
            "run the sweep again to continue"
        )
    return made is not None


def _remove_samples(samples: Path, keep: bool) -> None:
    """The samples were only needed for scoring (a 50k-image cell at 256 px is 9.8 GB): drop the chunks,
    and the npz unless ``keep``."""
    shutil.rmtree(samples.with_name(samples.name + ".parts"), ignore_errors=True)
    if not keep:
        samples.unlink(missing_ok=True)


def run_cell(
    module: Any, cell: Cell, out: Path, args: Any, rank: int, world_size: int, guide: Any = None
) -> dict[str, Any] | None:
    """Generate and score one cell over its seeds (resumable); its result on rank 0, None on other ranks or
    when unfinished.

    One seed keeps the layout of a one-seed sweep (``cells/<cell>/result.json``); several score each seed in
    ``cells/<cell>/seed<s>/`` and the cell's ``result.json`` holds each metric's mean, ``spread`` and ``per_seed``.
    ``guide``: the loaded guide of a guided cell.
    """
    folder = out / "cells" / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    settings = _effective_settings(module, cell, guide)
    _check_or_write(
        folder / "cell.json",
        {"settings": settings, "weights_sha256": module.weights_sha256},
        f"cell {cell.name}",
        "the checkpoint or sampler changed since: sweep into another --out, or remove that cell's folder",
    )
    seeds = args.seed_list
    if len(seeds) == 1:
        return _run_seed(module, cell, folder, seeds[0], settings, args, rank, world_size, guide)
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text()) if rank == 0 else None
    # Every rank goes through every seed: rank 0 scores seed s while the others make their chunks of seed s + 1.
    per_seed = [
        _run_seed(module, cell, folder / f"seed{s}", s, settings, args, rank, world_size, guide)
        for s in seeds
    ]
    if rank != 0 or any(r is None for r in per_seed):
        return None
    result = _seeds_result(settings, seeds, per_seed)
    atomic_write_json(result_path, result)
    shown = ", ".join(f"{m} {_metric_text(result, m)}" for m in result["spread"])
    print(f"{cell.name} over seeds {' '.join(map(str, seeds))}: {shown}")
    return result


def _seeds_result(
    settings: dict[str, Any], seeds: Sequence[int], per_seed: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """A cell's result over several seeds: the means as its metrics, with their spread and each seed's result."""
    spreads = metric_spreads([r["metrics"] for r in per_seed])
    unavailable: dict[str, str] = {}
    for r in per_seed:
        unavailable.update(r["unavailable"])
    return {
        **settings,
        "metrics": {m: st["mean"] for m, st in spreads.items()},
        "spread": spreads,
        "seeds": list(seeds),
        "per_seed": {str(s): r["metrics"] for s, r in zip(seeds, per_seed)},
        "unavailable": unavailable,
        "num_samples": per_seed[0]["num_samples"],
        "sampling_seconds": round(sum(r["sampling_seconds"] for r in per_seed), 1),
        "metrics_seconds": round(sum(r["metrics_seconds"] for r in per_seed), 1),
    }


def _run_seed(
    module: Any,
    cell: Cell,
    folder: Path,
    seed: int,
    settings: dict[str, Any],
    args: Any,
    rank: int,
    world_size: int,
    guide: Any = None,
) -> dict[str, Any] | None:
    """Generate and score the cell's images of one seed in ``folder`` (resumable)."""
    folder.mkdir(parents=True, exist_ok=True)
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text()) if rank == 0 else None
    samples = folder / "samples.npz"
    start = time.perf_counter()
    if not samples.exists() and not _generate(module, cell, samples, seed, args, rank, world_size, guide):
        return None
    if rank != 0:
        return None
    sampling_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # The seam score's grid is the model's patch grid unless --patch_size says otherwise.
    patch_size = args.patch_size or getattr(getattr(module, "net", None), "patch_size", None)
    metrics, unavailable = _score(samples, args, patch_size)
    result = {
        **settings,
        "metrics": metrics,
        "unavailable": unavailable,
        "num_samples": args.num_samples,
        "sampling_seconds": round(sampling_seconds, 1),
        "metrics_seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(result_path, result)
    _remove_samples(samples, keep=args.keep_samples)
    shown = ", ".join(f"{k} {format_number(v)}" for k, v in metrics.items())
    label = cell.name if len(args.seed_list) == 1 else f"{cell.name} seed {seed}"
    print(
        f"{label}: {shown} ({result['sampling_seconds']} s sampling, {result['metrics_seconds']} s metrics)"
    )
    for metric, why in unavailable.items():
        print(f"  {metric}: not computed: {why}")
    return result


# ------------------------------------------------------------------------------------------------ summary
def _setting_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(str(v) for v in value)
    return str(value)


def _has_spread(results: Sequence[dict[str, Any]]) -> bool:
    return any("spread" in r for r in results)


def _setting(result: dict[str, Any], column: str) -> str:
    """A cell's setting in words; a result without a guide (CFG, or an earlier sweep's) reads ``none``."""
    if column == "guide":
        return str(result.get("guide") or NO_GUIDE)
    return _setting_text(result[column])


def _csv_text(results: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    """``sweep.csv``: one row a cell, its settings, its metrics (full precision, empty when not computed); over
    several seeds each metric is the mean, followed by its ``_std``, ``_min`` and ``_max`` columns and the seeds."""
    stats = SPREAD_STATS if _has_spread(results) else ("mean",)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    seeds_column = ["seeds"] if _has_spread(results) else []
    writer.writerow(
        [
            *SETTING_COLUMNS,
            *(spread_column(m, st) for m in metrics for st in stats),
            "num_samples",
            *seeds_column,
        ]
    )
    for r in results:
        spreads = r.get("spread", {})
        values = [
            r["metrics"].get(m) if st == "mean" else spreads.get(m, {}).get(st)
            for m in metrics
            for st in stats
        ]
        seeds = [" ".join(str(s) for s in r.get("seeds", []))] if seeds_column else []
        writer.writerow(
            [
                *(_setting(r, c) for c in SETTING_COLUMNS),
                *("" if v is None else repr(float(v)) for v in values),
                r["num_samples"],
                *seeds,
            ]
        )
    return buffer.getvalue()


def _metric_text(result: dict[str, Any], metric: str) -> str:
    """A table cell: the value, or over several seeds ``mean ± std [min–max]``."""
    stats = result.get("spread", {}).get(metric)
    if stats is None or stats["n"] < 2:
        return format_number(result["metrics"].get(metric))
    return (
        f"{format_number(stats['mean'])} ± {format_number(stats['std'])} "
        f"[{format_number(stats['min'])}–{format_number(stats['max'])}]"
    )


def _markdown_lines(results: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    """``sweep.md`` without its plot: the table of the cells and the best cell of each metric."""
    rows = [
        [*(_setting(r, c) for c in SETTING_COLUMNS), *(_metric_text(r, m) for m in metrics)] for r in results
    ]
    lines = ["# Sweep", "", markdown_table([*SETTING_COLUMNS, *metrics], rows), ""]
    for m in metrics:
        scored = [r for r in results if r["metrics"].get(m) is not None]
        best = best_of(scored, m, lambda r, m=m: r["metrics"][m])
        if best is None:
            continue
        where = ", ".join(f"{c} {_setting(best, c)}" for c in SETTING_COLUMNS)
        lines.append(f"- best {m}: {_metric_text(best, m)} at {where}")
    if results:
        lines += ["", f"{results[0]['num_samples']} samples per cell."]
    if _has_spread(results):
        seeds = " ".join(str(s) for s in results[0]["seeds"])
        lines += [
            f"Over seeds {seeds}: mean ± sample standard deviation [min–max] of the seeds' values; "
            "the best cell is chosen on the mean."
        ]
    return lines


def _guidance_curves(
    results: Sequence[dict[str, Any]], metric: str
) -> dict[str, tuple[list[float], list[float]]]:
    """``metric`` against the guidance scale, one curve for each value of the other settings that vary."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    varying = [
        c
        for c in ("weights", "guide", "cfg_interval", "num_steps")
        if len({_setting(r, c) for r in results}) > 1
    ]
    for r in sorted(results, key=lambda r: r["cfg_scale"]):
        value = r["metrics"].get(metric)
        if value is None:
            continue
        label = ", ".join(f"{c} {_setting(r, c)}" for c in (varying or ["weights"]))
        xs, ys = curves.setdefault(label, ([], []))
        xs.append(r["cfg_scale"])
        ys.append(value)
    return curves


def write_summary(
    results: Sequence[dict[str, Any]], out: Path, plots: bool = True, plot_metric: str | None = None
) -> list[Path]:
    """``sweep.csv``, ``sweep.md`` and (with ``plots``) the PNG of the cells' results; returns the paths written."""
    metrics = ordered_metrics(m for r in results for m in r["metrics"])
    with atomic_write(out / "sweep.csv", "w") as f:
        f.write(_csv_text(results, metrics))
    written = [out / "sweep.csv"]
    lines = _markdown_lines(results, metrics)
    chosen = plot_metric or next(
        (m for m in metrics if any(r["metrics"].get(m) is not None for r in results)), None
    )
    if plots and chosen is not None:
        name = f"sweep_{chosen}.png"
        plot_series(
            _guidance_curves(results, chosen),
            out / name,
            "guidance scale (cfg_scale)",
            chosen,
            f"{chosen} against guidance scale",
        )
        written.append(out / name)
        lines += ["", f"![{chosen} against guidance scale]({name})"]
    with atomic_write(out / "sweep.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    written.append(out / "sweep.md")
    return written


# ------------------------------------------------------------------------------------------------ command
def _sweep_record(args: Any) -> dict[str, Any]:
    """What the cells of one sweep folder share: the checkpoint, the reference and the scoring settings."""
    return {
        "ckpt_path": str(Path(args.ckpt_path).resolve()),
        "config": args.experiment,  # the experiment YAMLs; the key older sweep folders recorded
        "reference": str(Path(args.reference).resolve()),
        "num_samples": args.num_samples,
        # One seed: the record of a one-seed sweep (an earlier sweep folder resumes); several: their list.
        "seed": args.seed_list[0] if len(args.seed_list) == 1 else args.seed_list,
        "metrics": sorted(args.metrics) if args.metrics else None,
        "patch_size": args.patch_size,
        # Only a sweep with guides records their weights, so the records of earlier sweeps stay valid.
        **({"guide_weights": str(args.guide_weights)} if getattr(args, "guide_weights", None) else {}),
    }


def _check_weight_requests(args: Any, cells: Sequence[Cell]) -> None:
    """Every requested set of weights must exist before the first cell's sampling starts, not hours into it,
    and no two requests may name the same weights."""
    checkpoint = read_checkpoint(args.ckpt_path, args.trust_pickle)
    labels: dict[str, list[str]] = {}
    for request in dict.fromkeys(c.weights for c in cells):
        select_weights(checkpoint, args.ckpt_path, request)
        labels.setdefault(weights_label(checkpoint, args.ckpt_path, request), []).append(str(request))
    same = [names for names in labels.values() if len(names) > 1]
    if same:
        raise SweepError(
            f"--weights {' and '.join(same[0])} are the same weights of {args.ckpt_path}: list one"
        )


def _load_guides(args: Any, cells: Sequence[Cell]) -> dict[str, Any]:
    """The guides the cells name, each loaded once (``--guide_weights`` of each), on the sweep's device."""
    guides: dict[str, Any] = {}
    for path in dict.fromkeys(c.guide for c in cells if c.guide is not None):
        request = getattr(args, "guide_weights", None) or DEFAULT_WEIGHTS
        guide = load_guide(path, weights=request, trust_pickle=args.trust_pickle).to(args.device)
        guide.weights_sha256 = weights_fingerprint(guide)
        guides[path] = guide
    return guides


def run_sweep(args: Any) -> list[dict[str, Any]] | None:
    """Run every cell of the grid ``args`` describe; rank 0 returns the results (and writes the summary)."""
    place = launch_place()
    rank, world_size = place.rank, place.world_size
    if args.device is None:
        args.device = f"cuda:{place.local_rank}" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    args.seed_list = resolve_seeds(args.seed, getattr(args, "seeds", None), args.num_samples)
    cells = grid_cells(
        args.weights, args.cfg_scale, args.cfg_interval, args.num_steps, getattr(args, "guide", None)
    )
    if not Path(args.reference).is_file():
        raise SweepError(
            f"--reference {args.reference}: no such file (an image npz, an ADM reference batch or kit statistics)"
        )
    check_reference_file(args.reference)  # a damaged reference is an error now, not after the first cell
    if args.plots and rank == 0:
        require_matplotlib()  # before hours of sampling
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write(
        out / "sweep.json", _sweep_record(args), "a sweep", "choose another --out for these settings"
    )
    _check_weight_requests(args, cells)
    guides = _load_guides(args, cells)
    results = []
    for request, group in itertools.groupby(cells, key=lambda c: c.weights):
        module = load_module(args.ckpt_path, args.experiment, weights=request, trust_pickle=args.trust_pickle)
        module = module.to(args.device).eval()
        module.weights_sha256 = weights_fingerprint(module)
        for path, guide in guides.items():  # every guide fits, before the first cell samples
            check_guide(module, guide, path)
        for cell in group:
            result = run_cell(module, cell, out, args, rank, world_size, guides.get(cell.guide))
            if result is not None:
                results.append(result)
        del module
    if rank != 0:
        print(
            f"rank {rank}: my chunks of every cell are done; rank 0 scores them and writes {out / 'sweep.csv'}"
        )
        return None
    written = write_summary(results, out, plots=args.plots, plot_metric=args.plot_metric)
    print("wrote " + ", ".join(str(p) for p in written))
    return results
