"""Tables and plots of metric values, shared by ``report`` (runs side by side) and ``sweep`` (one checkpoint's
settings): the metric order and which value is best, number formatting, markdown tables and PNG line plots.

Plots need matplotlib, the optional extra ``pip install 'dip-lightning[report]'``; nothing else here does.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dip_lightning.core.atomic import atomic_write
from dip_lightning.core.errors import MissingExtraError
from dip_lightning.core.metrics import METRIC_GOALS, METRIC_NAMES

__all__ = [
    "MATPLOTLIB_HINT",
    "best_of",
    "format_count",
    "format_number",
    "markdown_table",
    "metric_goal",
    "ordered_metrics",
    "plot_file_name",
    "plot_series",
    "require_matplotlib",
]

MATPLOTLIB_HINT = "pip install 'dip-lightning[report]'"

T = TypeVar("T")


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a ``MissingExtraError`` naming the extra."""
    try:
        import matplotlib
    except ImportError as err:
        raise MissingExtraError(
            f"plots need matplotlib, an optional extra of the kit: {MATPLOTLIB_HINT} "
            "(or pass --no_plots for the table alone)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ metric order
def ordered_metrics(names: Iterable[str]) -> list[str]:
    """``names`` in the engine's order (:data:`~dip_lightning.core.metrics.METRIC_NAMES`), others alphabetically."""
    names = set(names)
    return [m for m in METRIC_NAMES if m in names] + sorted(names - set(METRIC_NAMES))


def metric_goal(name: str) -> str | float | None:
    """How the best value of ``name`` is chosen (:data:`~dip_lightning.core.metrics.METRIC_GOALS`; names with
    "loss": lowest); None: no ordering known."""
    if name in METRIC_GOALS:
        return METRIC_GOALS[name]
    return "min" if "loss" in name else None


def best_of(items: Iterable[T], metric: str, value: Callable[[T], float]) -> T | None:
    """The item whose ``value`` is best for ``metric`` (the first of equal ones); None without an ordering or
    items."""
    goal = metric_goal(metric)
    items = list(items)
    if goal is None or not items:
        return None
    if goal == "min":
        rank = value
    elif goal == "max":
        rank = lambda item: -value(item)  # noqa: E731
    else:
        rank = lambda item: abs(value(item) - float(goal))  # noqa: E731
    return min(items, key=rank)


# ------------------------------------------------------------------------------------------------ text
def format_number(value: float | None) -> str:
    """Four significant digits (whole numbers from 1000 on); an em dash for a missing or non-finite value."""
    if value is None or not math.isfinite(value):
        return "—"
    magnitude = abs(value)
    if magnitude >= 1000 or magnitude == 0:
        return f"{value:.0f}" if magnitude >= 1000 else "0"
    digits = max(0, 3 - int(math.floor(math.log10(magnitude))))  # 4 significant digits
    return f"{value:.{digits}f}"


def format_count(value: int | None) -> str:
    """A count with thousands separators; an em dash when unknown."""
    return "—" if value is None else f"{value:,}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table of text cells (``|`` escaped)."""
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots
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
    """A file name for the plot of ``metric`` (characters outside ``[A-Za-z0-9_.-]`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png"
