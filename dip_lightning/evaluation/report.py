"""Put training runs side by side: one table row per run (``report.md``) and one plot per metric against the
training step.

A run folder is read as ``fit`` left it, whichever loggers it had (the recorded configs, ``config.yaml``,
``eval_metrics.csv``, the ``val/*`` scalars of TensorBoard events or a CSVLogger's files in the log folder, its
checkpoints); :class:`RunSummary` says where each column comes from. Tables and plots are
drawn by :mod:`dip_lightning.evaluation.tables`; without plots no matplotlib is needed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dip_lightning.checkpoint.run_folder import (
    CONFIG_RECORD,
    CSV_LOGGER_METRICS,
    EVAL_METRICS_CSV,
    EXPERIMENT_RECORD,
    LOG_VERSION,
    checkpoint_dir,
    locate_run,
)
from dip_lightning.core.atomic import atomic_write
from dip_lightning.core.errors import KitError
from dip_lightning.evaluation.tables import (
    best_of,
    format_count,
    format_number,
    markdown_table,
    metric_goal,
    ordered_metrics,
    plot_file_name,
    plot_series,
    require_matplotlib,
)

__all__ = [
    "MetricSeries",
    "RunSummary",
    "best_point",
    "paper_row",
    "read_csv_logger_scalars",
    "read_metric_csv",
    "read_tensorboard_scalars",
    "render_report",
    "summarize_run",
    "write_report",
]

#: Columns of ``eval_metrics.csv`` that are bookkeeping, not metrics.
BOOKKEEPING_COLUMNS = {"step", "images_seen", "num_samples", "seconds", "unix_time"}
TENSORBOARD_PREFIX = "val/"


class ReportError(KitError, ValueError):
    """A run folder or file that cannot be reported on; the message names it and the fix."""


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


def best_point(series: MetricSeries) -> tuple[int, float] | None:
    """(step, value) of the best evaluation (the earliest of equal ones), None without an ordering or values."""
    points = [(s, v) for s, v in zip(series.steps, series.values) if math.isfinite(v)]
    return best_of(points, series.name, lambda point: point[1])


def _float_or_none(text: str | None) -> float | None:
    if text is None or text.strip() in ("", "None", "nan", "NaN"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metric_csv(path: str | os.PathLike) -> tuple[dict[str, MetricSeries], dict[int, int]]:
    """Metrics of an ``eval_metrics.csv``: ``({metric: series}, {step: images_seen})``.

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


def read_csv_logger_scalars(
    folder: str | os.PathLike, prefix: str = TENSORBOARD_PREFIX
) -> dict[str, MetricSeries]:
    """Scalars under ``prefix`` of a CSVLogger's files in ``folder``: ``metrics.csv`` and the earlier jobs'
    ``metrics-<time>.csv``, oldest first (a step written twice keeps the later write), by column without the
    prefix."""
    folder = Path(folder)
    stem, suffix = os.path.splitext(CSV_LOGGER_METRICS)
    files = sorted(folder.glob(f"{stem}-*{suffix}"), key=lambda p: p.stat().st_mtime)
    files += [folder / CSV_LOGGER_METRICS] if (folder / CSV_LOGGER_METRICS).is_file() else []
    points: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                step = _float_or_none(row.get("step"))
                if step is None:
                    continue
                for column, text in row.items():
                    value = _float_or_none(text) if column and column.startswith(prefix) else None
                    if value is not None:
                        points.setdefault(column[len(prefix) :], []).append((int(step), value))
    return {name: MetricSeries.from_points(name, p) for name, p in points.items()}


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
    """What the report says about one run folder: a row of the table. A step logged twice (a run resumed from
    before an evaluation it had already written) keeps the later value."""

    run_dir: Path  # the trainer.default_root_dir of the fit
    label: str  # the row's name: the folder's, with parents enough to tell runs apart
    configs: list[
        str
    ]  # the --config files of the fit (experiment.json): the experiment YAML, then its overlays
    paper_row: str | None  # what the last config naming one says it reproduces (:func:`paper_row`)
    steps: (
        int | None
    )  # optimizer steps of the newest checkpoint (as fit would resume), else the last logged step
    images_seen: int | None  # from eval_metrics.csv, else steps x images per step (:func:`images_per_step`)
    metrics: dict[str, MetricSeries]  # eval_metrics.csv, then the TensorBoard val/* scalars it lacks
    sources: list[str]  # the metric files read, for the report's sources list
    config: dict[str, Any] = field(default_factory=dict)  # the run's saved config.yaml

    @property
    def experiment(self) -> str:
        return " + ".join(Path(c).name for c in self.configs) if self.configs else "(not recorded)"


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


def _read_config(path: Path) -> dict[str, Any]:
    """The run's saved ``config.yaml``; empty when there is none."""
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ReportError(f"{path}: not readable YAML ({err}); restore it or leave the run out") from err


def _read_experiment(path: Path) -> tuple[list[str], str | None]:
    """The ``--config`` files the experiment record lists, and the paper row the last one naming one gives."""
    if not path.is_file():
        return [], None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err}); remove it or leave the run out") from err
    configs: list[str] = []
    row: str | None = None
    for source in record.get("configs") or []:
        configs.append(str(source.get("path", "?")))
        row = paper_row(str(source.get("text", ""))) or row
    return configs, row


def _read_metrics(
    artefacts: Path, tensorboard: bool
) -> tuple[dict[str, MetricSeries], dict[int, int], list[str]]:
    """The run's metric series (``eval_metrics.csv``, then the TensorBoard and CSVLogger scalars it lacks), its
    images seen by step, and the sources read."""
    metrics: dict[str, MetricSeries] = {}
    images_seen: dict[int, int] = {}
    sources: list[str] = []
    if (artefacts / EVAL_METRICS_CSV).is_file():
        metrics, images_seen = read_metric_csv(artefacts / EVAL_METRICS_CSV)
        sources.append(EVAL_METRICS_CSV)
    if tensorboard:
        added = {k: v for k, v in read_tensorboard_scalars(artefacts).items() if k not in metrics}
        metrics.update(added)
        if added:
            sources.append("tensorboard " + ", ".join(f"{TENSORBOARD_PREFIX}{k}" for k in sorted(added)))
    added = {k: v for k, v in read_csv_logger_scalars(artefacts).items() if k not in metrics}
    metrics.update(added)
    if added:
        sources.append(
            CSV_LOGGER_METRICS + " " + ", ".join(f"{TENSORBOARD_PREFIX}{k}" for k in sorted(added))
        )
    return metrics, images_seen, sources


def _images_seen_at(steps: int | None, images_seen: Mapping[int, int], config: Any) -> int | None:
    """Images seen in ``steps`` optimizer steps: as logged at that step, else steps x images per step."""
    if steps is None:
        return None
    if images_seen and max(images_seen) == steps:
        return images_seen[steps]
    per_step = images_per_step(config)
    return steps * per_step if per_step is not None else None


def summarize_run(
    run_dir: str | os.PathLike, label: str | None = None, tensorboard: bool = True
) -> RunSummary:
    """Read one run folder (the ``trainer.default_root_dir`` of a ``fit``, or its artefact folder).

    Raises :class:`ReportError` for a folder that holds none of a run's files.
    """
    if not Path(run_dir).is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    run_dir, artefacts = locate_run(run_dir)
    config = _read_config(artefacts / CONFIG_RECORD)
    configs, row = _read_experiment(artefacts / EXPERIMENT_RECORD)
    metrics, images_seen, sources = _read_metrics(artefacts, tensorboard)
    steps = _steps_from_checkpoints(run_dir, config)
    if steps is None:
        steps = max((s.steps[-1] for s in metrics.values() if s.steps), default=None)
    if not (config or metrics or steps is not None or configs):
        raise ReportError(
            f"{run_dir}: not a run folder (no {LOG_VERSION}/{CONFIG_RECORD}, {EVAL_METRICS_CSV}, event files or "
            "checkpoints); pass the trainer.default_root_dir of a fit"
        )
    return RunSummary(
        run_dir=run_dir,
        label=label or run_dir.name,
        configs=configs,
        paper_row=row,
        steps=steps,
        images_seen=_images_seen_at(steps, images_seen, config),
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
def metric_cell(series: MetricSeries | None) -> str:
    """``final (best @ step)``; only ``final`` when no ordering is known."""
    if series is None or series.final is None:
        return "—"
    _, final = series.final
    best = best_point(series)
    if best is None:
        return format_number(final)
    return f"{format_number(final)} ({format_number(best[1])} @ {best[0]:,})"


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
