"""Evaluate one checkpoint over a grid of sampling settings: EMA decay x guidance (scale, interval) x steps.

``python -m dip_lightning sweep --ckpt_path run/checkpoints/last.ckpt --reference ref.npz --num_samples 10000
--ema 0.9999 0.9996 --cfg_scale 1.0 1.5 2.0 --out sweeps/run``

* Every combination of ``--ema``, ``--cfg_interval``, ``--num_steps`` and ``--cfg_scale`` is a cell; a setting not
  given keeps the checkpoint's (its first EMA decay, its configured sampler). ``--ema raw`` is the raw,
  non-averaged weights.
* A cell generates ``--num_samples`` images with the ``sample`` command's export
  (:func:`dip_lightning.evaluation.export.export_samples`: class-balanced labels, seed ``seed + i`` per image,
  chunks that a rerun keeps, spread over the processes that torchrun or srun started) and scores them with
  :func:`dip_lightning.core.metrics.compute_metrics` on rank 0, against one ``--reference`` (its features are
  extracted once and cached).
* ``DIR/cells/<cell>/`` holds the cell's ``cell.json`` (settings and weights fingerprint), its samples while they
  are needed and ``result.json`` (written atomically once scored). A killed sweep run again keeps every finished
  cell and the finished chunks of the cell it was in. A rerun over other weights (the checkpoint was
  overwritten), another reference or sample count is an error, not a silent mix; more grid values only add cells.
* Rank 0 writes ``DIR/sweep.csv`` (one row per cell of this grid: a column per setting -- ``ema``, ``cfg_scale``,
  ``cfg_interval``, ``num_steps`` -- and one per metric), ``DIR/sweep.md`` and ``DIR/sweep_<metric>.png`` (the
  metric against the guidance scale, one line per EMA decay and other setting). The plot needs the optional
  extra ``pip install 'dip-lightning[report]'`` (``--no_plots``: the tables alone).

The settings a cell really used are read from the sampler it ran with, so the CSV shows a default as its value.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dip_lightning.checkpoint.format import select_weights
from dip_lightning.checkpoint.io import read_checkpoint
from dip_lightning.core.atomic import atomic_write, atomic_write_json
from dip_lightning.core.distributed import launch_place
from dip_lightning.evaluation.export import export_samples, weights_fingerprint
from dip_lightning.evaluation.report import (
    format_number,
    markdown_table,
    metric_goal,
    ordered_metrics,
    plot_series,
)
from dip_lightning.training.loading import load_module

__all__ = ["Cell", "SweepError", "grid_cells", "run_sweep", "write_summary"]

SETTING_COLUMNS = ("ema", "cfg_scale", "cfg_interval", "num_steps")
RAW = "raw"


class SweepError(ValueError):
    """A sweep folder or argument that does not fit this run; the message names it and the fix."""


@dataclass(frozen=True)
class Cell:
    """One setting of the grid; None keeps the checkpoint's own value."""

    ema: float | str | None = None  # a decay, "raw", or None (the checkpoint's first decay)
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    num_steps: int | None = None

    @property
    def name(self) -> str:
        """The cell's folder name, e.g. ``ema0.9999_cfg1.5_interval0.1-1.0_steps50``."""

        def text(value: Any) -> str:
            return "default" if value is None else str(value)

        interval = "default" if self.cfg_interval is None else "-".join(str(v) for v in self.cfg_interval)
        return f"ema{text(self.ema)}_cfg{text(self.cfg_scale)}_interval{interval}_steps{text(self.num_steps)}"

    def sampler_overrides(self) -> dict[str, Any]:
        overrides = {
            "cfg_scale": self.cfg_scale,
            "num_steps": self.num_steps,
            "cfg_interval": self.cfg_interval,
        }
        return {k: v for k, v in overrides.items() if v is not None}

    def weights(self) -> tuple[float | None, bool]:
        """(ema decay, raw) for :func:`dip_lightning.training.loading.load_module`."""
        return (None, True) if self.ema == RAW else (self.ema, False)  # type: ignore[return-value]


def parse_ema(text: str) -> float | str:
    """An ``--ema`` value: a decay such as ``0.9999``, or ``raw``."""
    if text.lower() == RAW:
        return RAW
    try:
        return float(text)
    except ValueError:
        raise SweepError(
            f"--ema {text!r}: give EMA decays the checkpoint tracked (e.g. 0.9999) or 'raw'"
        ) from None


def grid_cells(
    ema: Sequence[float | str | None] | None = None,
    cfg_scale: Sequence[float] | None = None,
    cfg_interval: Sequence[tuple[float, float]] | None = None,
    num_steps: Sequence[int] | None = None,
) -> list[Cell]:
    """Every combination, EMA outermost (one weights load per decay), guidance scale innermost."""
    axes = [
        list(ema or [None]),
        list(cfg_interval or [None]),
        list(num_steps or [None]),
        list(cfg_scale or [None]),
    ]
    for values in axes:
        if len(set(values)) != len(values):
            raise SweepError(f"a setting is listed twice: {values}")
    return [
        Cell(ema=e, cfg_scale=w, cfg_interval=tuple(i) if i is not None else None, num_steps=s)
        for e, i, s, w in itertools.product(*axes)
    ]


# ------------------------------------------------------------------------------------------------ records
def _check_or_write(path: Path, record: dict[str, Any], what: str, fix: str) -> None:
    """Write ``record`` to ``path``, or check that the one there is the same (every rank may call it)."""
    if path.exists():
        found = json.loads(path.read_text())
        differ = sorted(k for k in set(found) | set(record) if found.get(k) != record.get(k))
        if differ:
            raise SweepError(
                f"{path} records {what} with other {', '.join(differ)}; {fix} (nothing was changed)"
            )
        return
    atomic_write_json(path, record)


def _effective_settings(module: Any, cell: Cell) -> dict[str, Any]:
    """What the cell really samples with: the sampler's fields after the overrides, and the weights."""
    sampler = module.make_sampler(**cell.sampler_overrides())
    weights = str(getattr(module, "loaded_weights", ""))
    ema: float | str | None = cell.ema
    if ema is None:  # the checkpoint's default: say which decay that is ("ema 0.9999"), else its label
        try:
            ema = float(weights.removeprefix("ema "))
        except ValueError:
            ema = weights
    return {
        "ema": ema,
        "cfg_scale": float(sampler.cfg_scale),
        "cfg_interval": [float(v) for v in sampler.cfg_interval],
        "num_steps": int(sampler.num_steps),
        "sampler": repr(sampler),
        "weights": weights,
    }


def _score(samples_path: Path, args: Any, patch_size: int | None) -> dict[str, float | None]:
    from dip_lightning.core.metrics import compute_metrics

    with np.load(samples_path) as npz:
        samples = npz["arr_0"]
    return compute_metrics(
        samples,
        args.reference,
        metrics=args.metrics,
        patch_size=patch_size,
        device=args.device,
        batch_size=args.metrics_batch_size,
    )


def run_cell(
    module: Any, cell: Cell, out: Path, args: Any, rank: int, world_size: int
) -> dict[str, Any] | None:
    """Generate and score one cell (resumable); its result on rank 0, None on other ranks or when unfinished."""
    folder = out / "cells" / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    settings = _effective_settings(module, cell)
    record = {"settings": settings, "weights_sha256": module.weights_sha256}
    _check_or_write(
        folder / "cell.json",
        record,
        f"cell {cell.name}",
        "the checkpoint or sampler changed since: sweep into another --out, or remove that cell's folder",
    )
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text()) if rank == 0 else None
    samples = folder / "samples.npz"
    start = time.perf_counter()
    if not samples.exists():
        made = export_samples(
            module,
            samples,
            args.num_samples,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            seed=args.seed,
            rank=rank,
            world_size=world_size,
            device=args.device,
            wait_timeout=args.wait_timeout,
            **cell.sampler_overrides(),
        )
        if made is None:
            if rank == 0:
                raise SweepError(
                    f"{cell.name}: the other processes' chunks did not appear within {args.wait_timeout:.0f} s; "
                    "run the sweep again to continue"
                )
            return None
    if rank != 0:
        return None
    sampling_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # The seam score's grid is the model's patch grid unless --patch_size says otherwise.
    patch_size = args.patch_size or getattr(getattr(module, "net", None), "patch_size", None)
    metrics = _score(samples, args, patch_size)
    result = {
        **settings,
        "metrics": metrics,
        "num_samples": args.num_samples,
        "sampling_seconds": round(sampling_seconds, 1),
        "metrics_seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(result_path, result)
    # The samples were only needed for scoring; a 50k-image cell at 256 px is 9.8 GB.
    shutil.rmtree(samples.with_name(samples.name + ".parts"), ignore_errors=True)
    if not args.keep_samples:
        samples.unlink(missing_ok=True)
    shown = ", ".join(f"{k} {format_number(v)}" for k, v in metrics.items())
    print(
        f"{cell.name}: {shown} ({result['sampling_seconds']} s sampling, {result['metrics_seconds']} s metrics)"
    )
    return result


# ------------------------------------------------------------------------------------------------ summary
def _setting_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(str(v) for v in value)
    return str(value)


def write_summary(
    results: Sequence[dict[str, Any]], out: Path, plots: bool = True, plot_metric: str | None = None
) -> list[Path]:
    """``sweep.csv``, ``sweep.md`` and (with ``plots``) the PNG of the cells' results; returns the paths written."""
    metrics = ordered_metrics(m for r in results for m in r["metrics"])
    written = []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*SETTING_COLUMNS, *metrics, "num_samples", "weights"])
    for r in results:
        values = [r["metrics"].get(m) for m in metrics]
        writer.writerow(
            [
                *(_setting_text(r[c]) for c in SETTING_COLUMNS),
                *("" if v is None else repr(float(v)) for v in values),
                r["num_samples"],
                r["weights"],
            ]
        )
    with atomic_write(out / "sweep.csv", "w") as f:
        f.write(buffer.getvalue())
    written.append(out / "sweep.csv")

    rows = [
        [
            *(_setting_text(r[c]) for c in SETTING_COLUMNS),
            *(format_number(r["metrics"].get(m)) for m in metrics),
        ]
        for r in results
    ]
    lines = ["# Sweep", "", markdown_table([*SETTING_COLUMNS, *metrics], rows), ""]
    for m in metrics:
        goal = metric_goal(m)
        scored = [r for r in results if r["metrics"].get(m) is not None]
        if goal is None or not scored:
            continue
        if goal == "min":
            best = min(scored, key=lambda r: r["metrics"][m])
        elif goal == "max":
            best = max(scored, key=lambda r: r["metrics"][m])
        else:
            best = min(scored, key=lambda r: abs(r["metrics"][m] - float(goal)))
        where = ", ".join(f"{c} {_setting_text(best[c])}" for c in SETTING_COLUMNS)
        lines.append(f"- best {m}: {format_number(best['metrics'][m])} at {where}")
    if results:
        lines += ["", f"{results[0]['num_samples']} samples per cell."]
    chosen = plot_metric or next(
        (m for m in metrics if any(r["metrics"].get(m) is not None for r in results)), None
    )
    if plots and chosen is not None:
        curves: dict[str, tuple[list[float], list[float]]] = {}
        varying = [
            c for c in ("ema", "cfg_interval", "num_steps") if len({_setting_text(r[c]) for r in results}) > 1
        ]
        for r in sorted(results, key=lambda r: r["cfg_scale"]):
            value = r["metrics"].get(chosen)
            if value is None:
                continue
            label = ", ".join(f"{c} {_setting_text(r[c])}" for c in (varying or ["ema"]))
            xs, ys = curves.setdefault(label, ([], []))
            xs.append(r["cfg_scale"])
            ys.append(value)
        name = f"sweep_{chosen}.png"
        plot_series(
            curves, out / name, "guidance scale (cfg_scale)", chosen, f"{chosen} against guidance scale"
        )
        written.append(out / name)
        lines += ["", f"![{chosen} against guidance scale]({name})"]
    with atomic_write(out / "sweep.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    written.append(out / "sweep.md")
    return written


# ------------------------------------------------------------------------------------------------ command
def run_sweep(args: Any) -> list[dict[str, Any]] | None:
    """Run every cell of the grid ``args`` describe; rank 0 returns the results (and writes the summary)."""
    place = launch_place()
    rank, world_size = place.rank, place.world_size
    if args.device is None:
        args.device = f"cuda:{place.local_rank}" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    cells = grid_cells(
        [parse_ema(e) for e in args.ema] if args.ema else None,
        args.cfg_scale,
        args.cfg_interval,
        args.num_steps,
    )
    if not Path(args.reference).is_file():
        raise SweepError(
            f"--reference {args.reference}: no such file (an image npz, an ADM reference batch or kit statistics)"
        )
    if args.plots and rank == 0:
        from dip_lightning.evaluation.report import require_matplotlib

        require_matplotlib()  # before hours of sampling
    out.mkdir(parents=True, exist_ok=True)
    job = {
        "ckpt_path": str(Path(args.ckpt_path).resolve()),
        "config": args.config,
        "reference": str(Path(args.reference).resolve()),
        "num_samples": args.num_samples,
        "seed": args.seed,
        "metrics": sorted(args.metrics) if args.metrics else None,
        "patch_size": args.patch_size,
    }
    _check_or_write(out / "sweep.json", job, "a sweep", "choose another --out for these settings")
    # Every requested set of weights must exist before the first cell's sampling starts, not hours into it.
    checkpoint = read_checkpoint(args.ckpt_path, args.trust_pickle)
    for ema in dict.fromkeys(c.ema for c in cells):
        ema_decay, raw = Cell(ema=ema).weights()
        select_weights(checkpoint, args.ckpt_path, ema_decay, raw)
    del checkpoint
    results = []
    for ema, group in itertools.groupby(cells, key=lambda c: c.ema):
        ema_decay, raw = Cell(ema=ema).weights()
        module = load_module(args.ckpt_path, args.config, raw, args.trust_pickle, ema=ema_decay)
        module = module.to(args.device).eval()
        module.weights_sha256 = weights_fingerprint(module)
        for cell in group:
            result = run_cell(module, cell, out, args, rank, world_size)
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
