"""Put training runs side by side: ``python -m dip_lightning report RUN_DIR [RUN_DIR ...] --out DIR``.

Writes ``DIR/report.md``, one table row per run, and one PNG per metric (``DIR/<metric>.png``: the metric
against the training step, one line per run). What a row holds, and where it comes from:

* **experiment**: the ``--config`` files of the run's ``fit`` (``experiment.json`` in the artefact folder,
  :class:`dip_lightning.training.cli.RecordingSaveConfig`): the experiment YAML, then its overlays;
* **paper row**: what the configs say they reproduce: a ``# Reproduces: ...`` line, else a header comment
  naming a ``Paper Table N row "..."`` / ``Paper Fig N ...``; the last config that names one wins (an overlay
  over its base);
* **steps**: the optimizer steps the run holds (its newest checkpoint, chosen as ``fit`` would resume), else the
  last step any metric was logged at;
* **images seen**: from ``eval_metrics.csv``, else steps x global batch (``config.yaml``: batch size x devices x
  nodes x gradient accumulation);
* **metrics**: ``eval_metrics.csv`` (``step,images_seen,<metrics>...``, written by the metrics callback);
  TensorBoard ``val/*`` scalars add what the CSV lacks (e.g. ``val/loss``), read with TensorBoard's own event
  reader. For each metric the final value and the best one with its step: lower is better for FID, sFID,
  FD-DINOv2 and losses, higher for Inception Score, precision and recall, and nearest 1.0 for the patch-seam
  score (1.0 = seams like the reference's, either side is worse).

Rows of a step logged twice (a run resumed from before an evaluation it had already written) keep the later one.
Plots need matplotlib, the optional extra ``pip install 'dip-lightning[report]'``; ``--no_plots`` writes the
table without it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dip_lightning.core.atomic import atomic_write
from dip_lightning.training.run_folder import EXPERIMENT_RECORD, LOG_VERSION, checkpoint_dir

__all__ = [
    "METRIC_GOALS",
    "MetricSeries",
    "RunSummary",
    "best_point",
    "paper_row",
    "plot_series",
    "read_metric_csv",
    "read_tensorboard_scalars",
    "render_report",
    "require_matplotlib",
    "summarize_run",
    "write_report",
]

EVAL_METRICS_CSV = "eval_metrics.csv"
CONFIG_YAML = "config.yaml"
#: Columns of the metric CSVs that are bookkeeping, not metrics.
BOOKKEEPING_COLUMNS = {"step", "images_seen", "num_samples", "seconds", "unix_time", "extractor"}
TENSORBOARD_PREFIX = "val/"

#: How to pick a metric's best value: "min", "max", or a number (the value nearest to it is best).
METRIC_GOALS: dict[str, str | float] = {
    "fid": "min",
    "sfid": "min",
    "fd_dinov2": "min",
    "inception_score": "max",
    "precision": "max",
    "recall": "max",
    "patch_seam": 1.0,
}
#: The order metrics appear in tables and plots; others follow alphabetically.
METRIC_ORDER = ("fid", "sfid", "inception_score", "precision", "recall", "patch_seam", "fd_dinov2")

MATPLOTLIB_HINT = "pip install 'dip-lightning[report]'"


class ReportError(ValueError):
    """A run folder or file that cannot be reported on; the message names it and the fix."""


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or an ``ImportError`` that names the extra to install."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            f"plots need matplotlib, an optional extra of the kit: {MATPLOTLIB_HINT} "
            "(or pass --no_plots for the table alone)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ metric values
@dataclass
class MetricSeries:
    """One metric of one run: values by training step (ascending, one per step)."""

    name: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @classmethod
    def from_points(cls, name: str, points: Iterable[tuple[int, float]]) -> MetricSeries:
        by_step: dict[int, float] = {}
        for step, value in points:  # a later row of the same step wins
            by_step[int(step)] = float(value)
        steps = sorted(by_step)
        return cls(name, steps, [by_step[s] for s in steps])

    @property
    def final(self) -> tuple[int, float] | None:
        return (self.steps[-1], self.values[-1]) if self.steps else None


def metric_goal(name: str) -> str | float | None:
    """How the best value of ``name`` is chosen (:data:`METRIC_GOALS`; names with "loss": lowest); None: no
    ordering known."""
    if name in METRIC_GOALS:
        return METRIC_GOALS[name]
    return "min" if "loss" in name else None


def best_point(series: MetricSeries) -> tuple[int, float] | None:
    """(step, value) of the best evaluation (the earliest of equal ones), None without an ordering or values."""
    goal = metric_goal(series.name)
    points = [(s, v) for s, v in zip(series.steps, series.values) if math.isfinite(v)]
    if goal is None or not points:
        return None
    if goal == "min":
        key: Callable[[tuple[int, float]], float] = lambda p: p[1]  # noqa: E731
    elif goal == "max":
        key = lambda p: -p[1]  # noqa: E731
    else:
        key = lambda p: abs(p[1] - float(goal))  # noqa: E731
    return min(points, key=key)


def _float_or_none(text: str | None) -> float | None:
    if text is None or text.strip() in ("", "None", "nan", "NaN"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metric_csv(path: str | os.PathLike) -> tuple[dict[str, MetricSeries], dict[int, int]]:
    """Metrics of ``eval_metrics.csv``: ``({metric: series}, {step: images_seen})``.

    Every column that is not bookkeeping (:data:`BOOKKEEPING_COLUMNS`) is a metric; empty cells (a metric
    this machine could not compute) are skipped. A file without a ``step`` column is a :class:`ReportError`.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "step" not in columns:
            raise ReportError(f"{path}: no 'step' column in its header {columns}; is it a metrics CSV?")
        metrics = [c for c in columns if c not in BOOKKEEPING_COLUMNS]
        points: dict[str, list[tuple[int, float]]] = {m: [] for m in metrics}
        images_seen: dict[int, int] = {}
        for row in reader:
            step = _float_or_none(row.get("step"))
            if step is None:  # a line cut short by a killed writer
                continue
            seen = _float_or_none(row.get("images_seen"))
            if seen is not None:
                images_seen[int(step)] = int(seen)
            for m in metrics:
                value = _float_or_none(row.get(m))
                if value is not None:
                    points[m].append((int(step), value))
    return {m: MetricSeries.from_points(m, p) for m, p in points.items() if p}, images_seen


def read_tensorboard_scalars(
    folder: str | os.PathLike, prefix: str = TENSORBOARD_PREFIX
) -> dict[str, MetricSeries]:
    """Scalars under ``prefix`` of every TensorBoard event file in ``folder`` (not recursive), by tag without
    the prefix; a step written twice keeps the later write. Empty when tensorboard is not installed."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util import tensor_util
    except ImportError:
        return {}
    points: dict[str, list[tuple[float, int, float]]] = {}
    for event_file in sorted(Path(folder).glob("events.out.tfevents.*")):
        try:
            for event in EventFileLoader(str(event_file)).Load():
                if not event.HasField("summary"):
                    continue
                for value in event.summary.value:
                    if not value.tag.startswith(prefix):
                        continue
                    if value.HasField("simple_value"):
                        number = float(value.simple_value)
                    elif value.HasField("tensor"):
                        number = float(tensor_util.make_ndarray(value.tensor).reshape(-1)[0])
                    else:
                        continue
                    points.setdefault(value.tag[len(prefix) :], []).append(
                        (event.wall_time, int(event.step), number)
                    )
        except Exception as err:  # a truncated event file (a killed job) ends where it is cut
            print(f"warning: {event_file}: read up to an unreadable record ({err})", file=sys.stderr)
    return {
        tag: MetricSeries.from_points(tag, [(s, v) for _, s, v in sorted(p, key=lambda x: x[0])])
        for tag, p in points.items()
    }


# ------------------------------------------------------------------------------------------------ configs
_REPRODUCES = re.compile(r"^#\s*Reproduces:\s*(.+?)\s*$", re.IGNORECASE)
_PAPER_MENTION = re.compile(r"\bPaper\s+(Table|Fig\.?)\s+\w+")
_PAPER_ROW = re.compile(r'\bPaper\s+Table\s+\w+,?\s+row\s+"[^"]+"(\s+\([^)]*\))?')


def paper_row(config_text: str) -> str | None:
    """What a config file says it reproduces: its ``# Reproduces:`` line, else the first header comment line
    that names a paper table or figure (up to its first ``: ``); None when it names none.

    "no paper row" statements count as none.
    """
    header: list[str] = []
    for line in config_text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            if stripped:
                break  # the header comment ends at the first YAML line
            continue
        header.append(stripped)
        match = _REPRODUCES.match(stripped)
        if match:
            text = match.group(1).rstrip(".")
            return None if text.lower().startswith("no paper row") else text
    for line in header:
        match = _PAPER_ROW.search(line)  # 'Paper Table 2 row "..." (size, FID)': up to its parenthesis
        if match:
            return match.group(0)
        match = _PAPER_MENTION.search(line)
        if match:
            text = line[match.start() :]
            cut = text.find(": ")
            return (text[:cut] if cut > 0 else text).rstrip(" .")
    return None


def _nested(config: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(config, Mapping):
            return None
        config = config.get(key)
    return config


def images_per_step(config: Any) -> int | None:
    """Images one optimizer step consumes, from a saved ``config.yaml``: batch x devices x nodes x accumulation;
    None when a count is not a plain number (``devices: auto``)."""
    batch = _nested(config, "data", "init_args", "batch_size")
    devices = _nested(config, "trainer", "devices")
    nodes = _nested(config, "trainer", "num_nodes") or 1
    accumulate = _nested(config, "trainer", "accumulate_grad_batches") or 1
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    values = (batch, devices, nodes, accumulate)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    return int(batch * devices * nodes * accumulate)


# ------------------------------------------------------------------------------------------------ one run
@dataclass
class RunSummary:
    """What the report says about one run folder."""

    run_dir: Path
    label: str
    configs: list[str]
    paper_row: str | None
    steps: int | None
    images_seen: int | None
    metrics: dict[str, MetricSeries]
    sources: list[str]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def experiment(self) -> str:
        return " + ".join(Path(c).name for c in self.configs) if self.configs else "(not recorded)"


def _artefact_folder(run_dir: Path) -> Path:
    """Where a run folder keeps its logs: ``<run>/tensorboard`` (the kit's layout), else the folder itself."""
    nested = run_dir / LOG_VERSION
    return nested if nested.is_dir() else run_dir


def _steps_from_checkpoints(run_dir: Path, config: Mapping[str, Any]) -> int | None:
    from dip_lightning.checkpoint.io import CheckpointError
    from dip_lightning.checkpoint.resume import resolve_resume

    folder = _nested(config, "checkpoint", "dirpath") or checkpoint_dir(run_dir)
    if not Path(folder).is_dir():
        folder = checkpoint_dir(run_dir)
    try:
        return resolve_resume(run_dir, folder).step
    except (CheckpointError, OSError) as err:
        print(
            f"warning: {run_dir}: could not read its checkpoints for the step count ({err})", file=sys.stderr
        )
        return None


def summarize_run(
    run_dir: str | os.PathLike, label: str | None = None, tensorboard: bool = True
) -> RunSummary:
    """Read one run folder (the ``trainer.default_root_dir`` of a ``fit``, or its artefact folder).

    Raises :class:`ReportError` for a folder that holds none of a run's files.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    artefacts = _artefact_folder(run_dir)
    if artefacts == run_dir and (run_dir.parent / "checkpoints").is_dir():
        run_dir = run_dir.parent  # the artefact folder was given
    sources: list[str] = []
    config: dict[str, Any] = {}
    config_path = artefacts / CONFIG_YAML
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ReportError(
                f"{config_path}: not readable YAML ({err}); restore it or leave the run out"
            ) from err
    configs: list[str] = []
    row: str | None = None
    record_path = artefacts / EXPERIMENT_RECORD
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ReportError(
                f"{record_path}: not valid JSON ({err}); remove it or leave the run out"
            ) from err
        for source in record.get("configs") or []:
            configs.append(str(source.get("path", "?")))
            row = paper_row(str(source.get("text", ""))) or row
    metrics: dict[str, MetricSeries] = {}
    images_seen: dict[int, int] = {}
    if (artefacts / EVAL_METRICS_CSV).is_file():
        metrics, images_seen = read_metric_csv(artefacts / EVAL_METRICS_CSV)
        sources.append(EVAL_METRICS_CSV)
    if tensorboard:
        scalars = read_tensorboard_scalars(artefacts)
        added = {k: v for k, v in scalars.items() if k not in metrics}
        metrics.update(added)
        if added:
            sources.append("tensorboard " + ", ".join(f"{TENSORBOARD_PREFIX}{k}" for k in sorted(added)))
    steps = _steps_from_checkpoints(run_dir, config)
    logged = [s.steps[-1] for s in metrics.values() if s.steps]
    if steps is None and logged:
        steps = max(logged)
    seen_total: int | None = None
    per_step = images_per_step(config)
    if steps is not None and images_seen and max(images_seen) == steps:
        seen_total = images_seen[steps]
    elif steps is not None and per_step is not None:
        seen_total = steps * per_step
    if not (config or metrics or steps is not None or configs):
        raise ReportError(
            f"{run_dir}: not a run folder (no {LOG_VERSION}/{CONFIG_YAML}, {EVAL_METRICS_CSV}, "
            "event files or checkpoints); pass the trainer.default_root_dir of a fit"
        )
    return RunSummary(
        run_dir=run_dir,
        label=label or run_dir.name,
        configs=configs,
        paper_row=row,
        steps=steps,
        images_seen=seen_total,
        metrics=metrics,
        sources=sources,
        config=config,
    )


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short unique names: each folder's name, with as many parent folders as it takes to tell them apart."""
    parts = [Path(os.path.abspath(p)).parts for p in run_dirs]
    depth = 1
    while depth < max((len(p) for p in parts), default=1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return ["/".join(p) for p in parts]


# ------------------------------------------------------------------------------------------------ rendering
def ordered_metrics(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))


def format_number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    magnitude = abs(value)
    if magnitude >= 1000 or magnitude == 0:
        return f"{value:.0f}" if magnitude >= 1000 else "0"
    digits = max(0, 3 - int(math.floor(math.log10(magnitude))))  # 4 significant digits
    return f"{value:.{digits}f}"


def format_count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def metric_cell(series: MetricSeries | None) -> str:
    """``final (best @ step)``; only ``final`` when no ordering is known."""
    if series is None or series.final is None:
        return "—"
    _, final = series.final
    best = best_point(series)
    if best is None:
        return format_number(final)
    return f"{format_number(final)} ({format_number(best[1])} @ {best[0]:,})"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(
    runs: Sequence[RunSummary], plots: Mapping[str, str] | None = None, title: str = "Run report"
) -> str:
    """The markdown of ``report.md`` (``plots``: metric -> PNG file name beside it)."""
    metrics = ordered_metrics(m for r in runs for m in r.metrics)
    header = ["run", "experiment", "paper row", "steps", "images seen", *metrics]
    rows = [
        [
            r.label,
            r.experiment,
            r.paper_row or "—",
            format_count(r.steps),
            format_count(r.images_seen),
            *(metric_cell(r.metrics.get(m)) for m in metrics),
        ]
        for r in runs
    ]
    goals = []
    for m in metrics:
        goal = metric_goal(m)
        goals.append(
            f"`{m}` " + {"min": "lower", "max": "higher"}.get(goal, f"nearest {goal}")
            if goal is not None
            else f"`{m}` no ordering"
        )
    lines = [
        f"# {title}",
        "",
        markdown_table(header, rows),
        "",
        "Each metric: final value (best value @ its step). Best: " + ", ".join(goals) + "."
        if metrics
        else "No metrics were logged by these runs.",
        "",
        "Sources:",
        "",
        *(f"- {r.label}: `{r.run_dir}`; {', '.join(r.sources) or 'no metric files'}" for r in runs),
    ]
    for metric, png in (plots or {}).items():
        lines += ["", f"![{metric} against training step]({png})"]
    return "\n".join(lines) + "\n"


def plot_series(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """A line plot, one labelled line with markers per curve ``{label: (x, y)}``, written atomically as PNG."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for label, (x, y) in curves.items():
            ax.plot(list(x), list(y), marker="o", markersize=3, linewidth=1.2, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        with atomic_write(path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def plot_file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png"


def write_report(
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    plots: bool = True,
    tensorboard: bool = True,
    title: str = "Run report",
) -> tuple[Path, list[RunSummary]]:
    """Read every run, write ``out/report.md`` and (with ``plots``) ``out/<metric>.png``; returns the report's
    path and the summaries. Nothing is written when a run folder cannot be read."""
    if plots:
        require_matplotlib()  # before any work: the missing extra is the first thing said
    paths = [Path(p) for p in run_dirs]
    labels = run_labels(paths)
    runs = [summarize_run(p, label, tensorboard=tensorboard) for p, label in zip(paths, labels)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if plots:
        for metric in ordered_metrics(m for r in runs for m in r.metrics):
            curves = {
                r.label: (r.metrics[metric].steps, r.metrics[metric].values)
                for r in runs
                if metric in r.metrics
            }
            name = plot_file_name(metric)
            plot_series(curves, out / name, "training step", metric, f"{metric} against training step")
            written[metric] = name
    report = out / "report.md"
    with atomic_write(report, "w") as f:
        f.write(render_report(runs, written, title=title))
    return report, runs
