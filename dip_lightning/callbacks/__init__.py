"""Callbacks: EMA of the weights, power-function EMA snapshots, periodic sample grids, periodic evaluation with the
metrics suite (`MetricsCallback`; `FIDCallback` is its FID-only spelling), the progress bar, the guard against
non-finite training."""

from dip_lightning.callbacks.ema import EMA, sampling_module
from dip_lightning.callbacks.fid import FIDCallback
from dip_lightning.callbacks.metrics import MetricsCallback
from dip_lightning.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from dip_lightning.callbacks.phema import PowerFunctionEMA
from dip_lightning.callbacks.progress import RichProgress
from dip_lightning.callbacks.sample_grid import SampleGrid

__all__ = [
    "EMA",
    "FIDCallback",
    "MetricsCallback",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "PowerFunctionEMA",
    "RichProgress",
    "SampleGrid",
    "sampling_module",
]
