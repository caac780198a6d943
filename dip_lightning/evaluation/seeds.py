"""Evaluation over several sample seeds: which seeds a command runs, the file of each seed, and the spread of a
metric over them (mean, standard deviation, range).

Seed ``s`` draws the images of :func:`~dip_lightning.core.seeding.sample_labels_and_seeds`: image ``i`` has
label ``i % num_classes`` and noise seed ``s + i``. Two seeds less than ``num_samples`` apart would share most of
their noise (image ``i`` of seed 1 starts from the noise of image ``i + 1`` of seed 0), so the spread would
understate the seed-to-seed variation: such seeds are refused, never silently reused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from dip_lightning.core.errors import ConfigError

__all__ = [
    "SPREAD_STATS",
    "metric_spreads",
    "resolve_seeds",
    "seed_path",
    "spread",
    "spread_column",
]

#: The statistics of a metric over seeds, in the order they are written; ``std`` is the sample standard
#: deviation (n - 1 in the denominator), None for one seed.
SPREAD_STATS = ("mean", "std", "min", "max")


def resolve_seeds(seed: int, seeds: Sequence[int] | None, num_samples: int | None = None) -> list[int]:
    """The seeds a command runs: ``seeds`` when given (then ``seed`` must be left at 0), else ``[seed]``.

    With ``num_samples``, seeds closer than that are a :class:`ConfigError` (their images would share noise).
    """
    if not seeds:
        return [int(seed)]
    if seed != 0:
        raise ConfigError(f"--seed {seed} and --seeds {' '.join(map(str, seeds))}: give one of them")
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))} lists a seed twice: list each once")
    if num_samples is not None and len(seeds) > 1:
        ordered = sorted(seeds)
        close = [(a, b) for a, b in zip(ordered, ordered[1:]) if b - a < num_samples]
        if close:
            a, b = close[0]
            example = " ".join(str(k * num_samples) for k in range(len(seeds)))
            raise ConfigError(
                f"--seeds {a} and {b} are less than --num_samples {num_samples} apart: image i of seed {b} would "
                f"start from the noise of image i + {b - a} of seed {a} (noise seed = seed + i), so the spread "
                f"would understate the seed-to-seed variation; use seeds num_samples apart, e.g. --seeds {example}"
            )
    return seeds


def seed_path(path: str | os.PathLike[str], seed: int, seeds: Sequence[int]) -> Path:
    """The file of ``seed`` among ``seeds``: ``path`` itself for one seed, else ``<stem>_seed<seed><suffix>``."""
    path = Path(path)
    if len(seeds) == 1:
        return path
    return path.with_name(f"{path.stem}_seed{seed}{path.suffix}")


def spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """``{"n", "mean", "std", "min", "max"}`` of the values that exist (None and non-finite ones left out)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(xs), "max": max(xs)}


def metric_spreads(
    per_seed: Sequence[Mapping[str, float | None]],
) -> dict[str, dict[str, float | int | None]]:
    """The :func:`spread` of every metric over the seeds' results (a metric missing from one seed counts as None)."""
    names = list(dict.fromkeys(m for result in per_seed for m in result))
    return {m: spread([result.get(m) for result in per_seed]) for m in names}


def spread_column(metric: str, stat: str) -> str:
    """The CSV column of one statistic: the mean keeps the metric's name, the others are ``<metric>_<stat>``."""
    return metric if stat == "mean" else f"{metric}_{stat}"
