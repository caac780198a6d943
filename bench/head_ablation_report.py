"""Tables, curves and verdicts of the toy head ablation (``bench/head_ablation.py``), from its runs' metric files.

Pure reading and arithmetic over the rows the study wrote (one CSV per run and sample count), so that the report
can be rebuilt at any time from whatever has finished, and tested without training anything.

Names used throughout: ``finals[variant][seed] = {metric: value}`` (the final evaluation, ``--num_samples``
samples) and ``curves[variant][seed][step] = {metric: value}`` (every evaluation point, ``--curve_samples``).
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dip_lightning.core.atomic import atomic_write
from dip_lightning.evaluation.tables import format_number, markdown_table, require_matplotlib

#: The kit's metrics the study computes, and all it reports in table order (class agreement: bench/demo_metric_bar.py).
ENGINE_METRICS = ["fid", "sfid", "precision", "recall", "patch_seam"]
METRICS = [*ENGINE_METRICS, "class_agreement"]
#: The metrics of the learning-curve figure.
CURVE_METRICS = ["fid", "precision", "recall", "patch_seam", "class_agreement"]
#: Variants in the study's priority order, each with its paper Table 2 row and FID (160 epochs, ImageNet 256).
PAPER: dict[str, tuple[str, float]] = {
    "conv_unet": ("+ Conv U-Net (DiP)", 2.16),
    "dit_only": ("DiT-only 26L, 1152", 5.28),
    "coord_mlp": ("+ Coordinate MLP (PixNerd repro)", 2.20),
    "attention": ("+ Intra-patch attention", 2.98),
    "mlp": ("+ Standard MLP head", 6.92),
}
COLORS = {
    "conv_unet": "#d62728",
    "dit_only": "#1f77b4",
    "coord_mlp": "#2ca02c",
    "attention": "#9467bd",
    "mlp": "#ff7f0e",
}
#: The column layout of a run's metric CSV (the metrics callback's ``eval_metrics.csv`` layout).
CSV_COLUMNS = ["step", "images_seen", *METRICS, "num_samples", "seconds", "unix_time"]

Nested = dict[str, dict[int, dict[str, float]]]
Curves = dict[str, dict[int, dict[int, dict[str, float]]]]


# ------------------------------------------------------------------------------------------------ files
def read_rows(path: Path) -> dict[int, dict[str, float]]:
    """``{step: {column: value}}`` of one metric CSV (empty cells left out; a later row of a step wins)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        int(r["step"]): {k: float(v) for k, v in r.items() if k != "step" and v not in ("", None)}
        for r in rows
    }


def append_row(path: Path, row: Mapping[str, float | int | None]) -> None:
    """One row in :data:`CSV_COLUMNS` order, the header first when the file is new."""
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CSV_COLUMNS)
        writer.writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])


# ------------------------------------------------------------------------------------------------ statistics
def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {
        "mean": float(arr.mean()),
        "std": std,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": len(arr),
    }


def cell(values: Sequence[float]) -> str:
    """``mean ± std (min-max)`` over seeds; ``—`` for none."""
    if not values:
        return "—"
    s = spread(values)
    if s["n"] == 1:
        return format_number(s["mean"])
    mean, std, lo, hi = (format_number(s[k]) for k in ("mean", "std", "min", "max"))
    return f"{mean} ± {std} ({lo}-{hi})"


def metric_values(by_seed: Mapping[int, Mapping[str, float]], metric: str) -> list[float]:
    return [row[metric] for _, row in sorted(by_seed.items()) if metric in row and math.isfinite(row[metric])]


def curve_means(curves: Curves, metric: str) -> dict[str, dict[int, dict[str, float]]]:
    """``{variant: {step: spread over seeds}}`` of one metric."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, by_seed in curves.items():
        steps = sorted({s for points in by_seed.values() for s in points})
        out[name] = {}
        for step in steps:
            values = [p[step][metric] for p in by_seed.values() if step in p and metric in p[step]]
            if values:
                out[name][step] = spread(values)
    return out


# ------------------------------------------------------------------------------------------------ verdicts
def closeness(metric: str, value: float) -> float:
    """The quantity that is better when lower: the value itself, its negation (precision, recall, class agreement)
    or, for the patch seam, its distance from 1.0 (the data's own seam ratio)."""
    if metric in ("precision", "recall", "class_agreement"):
        return -value
    if metric == "patch_seam":
        return abs(value - 1.0)
    return value


def crossings(
    means: Mapping[str, Mapping[int, Mapping[str, float]]], a: str, b: str, metric: str
) -> list[str]:
    """Where the mean curves of ``a`` and ``b`` swap order: ``"between step s1 and s2"`` per sign change of the
    gap (steps both were evaluated at), plus who leads at the last common step."""
    common = sorted(set(means.get(a, {})) & set(means.get(b, {})))
    gaps = [closeness(metric, means[a][s]["mean"]) - closeness(metric, means[b][s]["mean"]) for s in common]
    out = []
    for (s0, g0), (s1, g1) in itertools.pairwise(zip(common, gaps)):
        if g0 * g1 < 0:
            first = a if g0 < 0 else b
            then = b if g0 < 0 else a
            out.append(f"between step {s0} and {s1} ({first} ahead before, {then} after)")
    return out


def pair_verdict(finals: Nested, better: str, worse: str, metric: str = "fid") -> str | None:
    """Whether ``better`` beats ``worse`` here as in the paper, and whether the gap exceeds the seed spread
    (the seeds' min-max ranges do not overlap); None when either has no finished seed."""
    va, vb = metric_values(finals.get(better, {}), metric), metric_values(finals.get(worse, {}), metric)
    if not va or not vb:
        return None
    ca, cb = [closeness(metric, v) for v in va], [closeness(metric, v) for v in vb]
    holds = float(np.mean(ca)) < float(np.mean(cb))
    separated = max(ca) < min(cb) or max(cb) < min(ca)
    word = "holds" if holds else "does NOT hold"
    how = "seed ranges apart" if separated else "seed ranges overlap: not resolved at this seed count"
    if min(len(va), len(vb)) < 2:
        how = "a single seed: no spread to judge the gap by"
    seeds = f"{len(va)} vs {len(vb)} seeds"
    return (
        f"{better} < {worse}: {word} ({format_number(float(np.mean(va)))} vs "
        f"{format_number(float(np.mean(vb)))}; {how}; {seeds})"
    )


def ordering_lines(finals: Nested, metric: str = "fid") -> list[str]:
    """Every pair of the paper's FID ordering, judged here."""
    paper = sorted(PAPER, key=lambda n: PAPER[n][1])
    lines = []
    for better, worse in itertools.combinations(paper, 2):
        verdict = pair_verdict(finals, better, worse, metric)
        if verdict is not None:
            lines.append(f"- {verdict}")
    return lines


def ranking_line(finals: Nested, metric: str) -> str:
    means = [(float(np.mean(v)), n) for n, s in finals.items() if (v := metric_values(s, metric))]
    means.sort(key=lambda t: closeness(metric, t[0]))
    return " < ".join(f"{n} {format_number(m)}" for m, n in means) if means else "—"


# ------------------------------------------------------------------------------------------------ tables
def final_table(finals: Nested, steps: int, counts: Mapping[str, tuple[int, int]] | None = None) -> str:
    header = ["variant", "paper row (Table 2)", "paper FID", "seeds", *METRICS]
    if counts:
        header.append("params head / total")
    rows = []
    for name, by_seed in finals.items():
        row = [name, PAPER[name][0], f"{PAPER[name][1]:.2f}", ", ".join(map(str, sorted(by_seed)))]
        row += [cell(metric_values(by_seed, m)) for m in METRICS]
        if counts:
            head, total = counts.get(name, (0, 0))
            row.append(f"{head / 1e3:.0f}k / {total / 1e6:.2f}M")
        rows.append(row)
    return markdown_table(header, rows)


def curve_table(means: Mapping[str, Mapping[int, Mapping[str, float]]], metric: str) -> str:
    """Step by variant: mean ± std over seeds at each evaluation point."""
    steps = sorted({s for points in means.values() for s in points})
    header = ["step", *means]
    rows = []
    for step in steps:
        cells = []
        for name in means:
            s = means[name].get(step)
            cells.append("—" if s is None else f"{format_number(s['mean'])} ± {format_number(s['std'])}")
        rows.append([str(step), *cells])
    return markdown_table(header, rows)


# ------------------------------------------------------------------------------------------------ figures
def plot_curves(curves: Curves, path: Path, metrics: Sequence[str] = CURVE_METRICS) -> None:
    """One panel per metric against training step: each variant's mean over seeds, its min-max band shaded."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.0), dpi=90)
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        for name, points in curve_means(curves, metric).items():
            steps = sorted(points)
            if not steps:
                continue
            mean = [points[s]["mean"] for s in steps]
            seeds = max(points[s]["n"] for s in steps)
            ax.plot(steps, mean, "o-", color=COLORS.get(name), label=f"{name} ({seeds})", markersize=3)
            lo, hi = [points[s]["min"] for s in steps], [points[s]["max"] for s in steps]
            ax.fill_between(steps, lo, hi, color=COLORS.get(name), alpha=0.15)
        if metric == "patch_seam":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(metric + (" (1.0 = like the data)" if metric == "patch_seam" else ""), fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7, title="head (seeds)", title_fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def plot_finals(finals: Nested, path: Path, metrics: Sequence[str] = CURVE_METRICS) -> None:
    """One panel per metric: each variant's seeds as points, their mean as a short bar."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.0), dpi=90)
    names = list(finals)
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        for i, name in enumerate(names):
            v = metric_values(finals[name], metric)
            if v:
                ax.plot([i] * len(v), v, "o", color=COLORS.get(name), markersize=4, alpha=0.8)
                ax.plot([i - 0.25, i + 0.25], [float(np.mean(v))] * 2, color="black", linewidth=2)
        if metric == "patch_seam":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def class_grid(images: np.ndarray, num_classes: int, rows: int) -> np.ndarray:
    """One column per class (sample i has label i % num_classes, the export rule), ``rows`` samples each."""
    rows = min(rows, len(images) // num_classes)
    lines = [
        np.concatenate(list(images[k * num_classes : (k + 1) * num_classes]), axis=1) for k in range(rows)
    ]
    return np.concatenate(lines, axis=0)


def mosaic(tiles: Sequence[Sequence[tuple[str, np.ndarray]]], path: Path, colors: int = 256) -> None:
    """Labelled image grids in rows and columns (a title above each), saved as a palette PNG of ``colors``
    colours (small enough to commit; 0 keeps full colour)."""
    from PIL import Image, ImageDraw

    gap, title = 6, 13
    cell_h = max(g.shape[0] for row in tiles for _, g in row) + title
    cell_w = max(g.shape[1] for row in tiles for _, g in row) + gap
    canvas = Image.new("RGB", (cell_w * max(map(len, tiles)) - gap, cell_h * len(tiles)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(tiles):
        for c, (label, grid) in enumerate(row):
            canvas.paste(Image.fromarray(grid), (c * cell_w, r * cell_h + title))
            draw.text((c * cell_w + 1, r * cell_h), label, fill="black")
    image = canvas.quantize(colors) if colors else canvas
    with atomic_write(path) as f:
        image.save(f, format="PNG", optimize=True)
