"""Callbacks: EMA of the weights, power-function EMA snapshots, periodic sample grids, periodic evaluation with the
metrics suite (`MetricsCallback`), the progress bar, the training monitors (`TrainingMonitor`), the guards
against non-finite training and loss spikes."""

from dip_lightning.training.callbacks.ema import EMA, sampling_module
from dip_lightning.training.callbacks.loss_spike import LossSpikeError, LossSpikeGuard
from dip_lightning.training.callbacks.metrics import MetricsCallback
from dip_lightning.training.callbacks.monitor import TrainingMonitor
from dip_lightning.training.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from dip_lightning.training.callbacks.phema import PowerFunctionEMA
from dip_lightning.training.callbacks.progress import RichProgress
from dip_lightning.training.callbacks.sample_grid import SampleGrid

__all__ = [
    "EMA",
    "LossSpikeError",
    "LossSpikeGuard",
    "MetricsCallback",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "PowerFunctionEMA",
    "RichProgress",
    "SampleGrid",
    "TrainingMonitor",
    "sampling_module",
]
