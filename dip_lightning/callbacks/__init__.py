"""Callbacks: EMA of the weights, periodic sample grids, periodic FID, the progress bar."""

from dip_lightning.callbacks.ema import EMA, sampling_module
from dip_lightning.callbacks.fid import FIDCallback
from dip_lightning.callbacks.progress import RichProgress
from dip_lightning.callbacks.sample_grid import SampleGrid

__all__ = ["EMA", "FIDCallback", "RichProgress", "SampleGrid", "sampling_module"]
