"""Training monitors without host-device syncs: images seen, images/s, MFU, peak device memory, data wait.

The definitions (one line each) are in docs/monitors.md. Everything is measured on the host: the images come from
batch shapes, the times from ``time.perf_counter``; nothing reads a device tensor. The values are logged at
Lightning's logging steps only (every ``trainer.log_every_n_steps`` optimizer steps), where Lightning's own write of
the logged tensors synchronises anyway; on CUDA the monitor synchronises there itself first, so that an interval
runs from one drained device queue to the next and the write that follows costs nothing that would count as waiting.

The count of images seen is the one the run's logs, ``eval_metrics.csv`` and checkpoints (the ``images_seen`` entry,
:data:`~dip_lightning.checkpoint.format.IMAGES_SEEN`) report: :func:`images_seen`.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size

from dip_lightning.checkpoint.format import IMAGES_SEEN
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.models.flops import forward_flops_per_image
from dip_lightning.core.peak_flops import peak_tflops

__all__ = ["TrainingMonitor", "images_per_step", "images_seen"]

IMAGES_SEEN_LOG = "train/images_seen"
IMAGES_PER_SEC_LOG = "train/images_per_sec"
MFU_LOG = "train/mfu"
MEMORY_LOG = "train/peak_memory_gib"
DATA_WAIT_LOG = "train/data_wait"

#: Training FLOPs per forward FLOP: the forward, and a backward of twice its cost (the usual MFU convention).
TRAINING_FLOPS_FACTOR = 3


def images_per_step(trainer: pl.Trainer, micro_batch: int) -> int:
    """Images one optimizer step consumes over all ranks: micro-batch x accumulated micro-batches x world size
    (every rank's micro-batch is assumed to be this rank's, as the kit's data modules make it)."""
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    return int(micro_batch) * accumulate * int(trainer.world_size)


def images_seen(trainer: pl.Trainer, micro_batch: int | None = None) -> int | None:
    """Training images seen so far over all ranks and all micro-batches: the :class:`TrainingMonitor`'s count
    (resumed from the checkpoint), else ``global_step`` x :func:`images_per_step` (``micro_batch`` needed; None
    without it)."""
    for callback in trainer.callbacks:
        if isinstance(callback, TrainingMonitor) and callback.images_seen is not None:
            return callback.images_seen
    if micro_batch is None:
        return None
    return trainer.global_step * images_per_step(trainer, micro_batch)


class TrainingMonitor(Callback):
    """Logs ``train/images_seen``, ``train/images_per_sec``, ``train/mfu``, ``train/peak_memory_gib`` and
    ``train/data_wait`` at the logging steps, and keeps the run's count of images seen in its checkpoints.

    Every ``fit`` of the CLI has one (options ``monitor.*``). It runs after every other callback (moved last at
    setup, after the checkpoint callbacks), so that the time a step's checkpoint or evaluation takes counts as the
    step's, not as waiting for the next batch.

    Args:
        peak_tflops: the device's peak in TFLOP/s for MFU. None: the dense bf16 figure of a known GPU
            (:data:`~dip_lightning.core.peak_flops.PEAK_BF16_TFLOPS`); on a CPU or an unknown device no MFU.
        mfu: log the model FLOPs utilisation (needs a network with DiP's ``in_channels``/``input_size``).
    """

    def __init__(self, peak_tflops: float | None = None, mfu: bool = True) -> None:
        if peak_tflops is not None and not peak_tflops > 0:
            raise ConfigError(
                f"monitor.peak_tflops must be > 0 TFLOP/s (or null: from the GPU), got {peak_tflops}"
            )
        self.peak_tflops = peak_tflops
        self.mfu = mfu
        #: Training images seen over all ranks; None until known (a fit's first batch, or a checkpoint's record).
        self.images_seen: int | None = None
        self.forward_flops: int | None = None  # per image, of the trained network
        self._peak_flops: float | None = None  # per device, FLOP/s
        self._step_at_start = 0
        self._batch_end: float | None = None
        self._waited = 0.0
        self._interval: tuple[int, int, float] | None = (
            None  # (step, images seen, time) at the last logging step
        )

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A new list (Lightning is iterating over the old one to call this very hook), with this monitor last.
        trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]
        self.images_seen = None  # a checkpoint's record, restored after setup, sets it for a resume
        self._peak_flops = self._device_peak(trainer.strategy.root_device) if self.mfu else None
        # Counted here, before the module's setup may compile the network.
        net = getattr(pl_module, "net", None)
        if self._peak_flops is not None and hasattr(net, "input_size") and hasattr(net, "in_channels"):
            self.forward_flops = forward_flops_per_image(net)

    def _device_peak(self, device: torch.device) -> float | None:
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
        known = peak_tflops(name)
        if known is None:
            rank_zero_warn(f"No peak FLOP/s known for {name!r}: set monitor.peak_tflops to log train/mfu.")
        return known * 1e12 if known is not None else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch_end, self._waited, self._interval = None, 0.0, None
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    # ------------------------------------------------------------------------------------------ per batch
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self._waited += now - self._batch_end
        self._step_at_start = trainer.global_step
        micro_batch = extract_batch_size(batch)  # a shape: no device access
        if self.images_seen is None:  # a fresh run, or a checkpoint without the record: the same formula
            self.images_seen = trainer.global_step * images_per_step(trainer, micro_batch)
        # Counted at the start of the micro-batch, so that a checkpoint saved at the end of its step includes it.
        self.images_seen += micro_batch * trainer.world_size
        if self._interval is None:
            self._interval = (trainer.global_step, self.images_seen - micro_batch * trainer.world_size, now)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        every = trainer.log_every_n_steps
        if step != self._step_at_start and every > 0 and step % every == 0:
            self._log(trainer, pl_module, step)
        self._batch_end = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A validation inside fit (a sanity check comes before on_train_start).
        if self._batch_end is not None:
            self._batch_end = time.perf_counter()  # validation inside fit is not waiting for data

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(
                device
            )  # a logging step only: Lightning's write of the logs would wait anyway
        now = time.perf_counter()
        assert self.images_seen is not None and self._interval is not None  # set by on_train_batch_start
        values = {IMAGES_SEEN_LOG: float(self.images_seen)}
        last_step, last_images, last_time = self._interval
        seconds = now - last_time
        if step > last_step and seconds > 0:
            rate = (self.images_seen - last_images) / seconds
            values[IMAGES_PER_SEC_LOG] = rate
            values[DATA_WAIT_LOG] = min(self._waited / seconds, 1.0)
            if self.forward_flops is not None and self._peak_flops is not None:
                achieved = TRAINING_FLOPS_FACTOR * self.forward_flops * rate / trainer.world_size
                values[MFU_LOG] = achieved / self._peak_flops
        if device.type == "cuda":
            values[MEMORY_LOG] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)  # the next value is the next interval's peak
        for name, value in values.items():
            pl_module.log(name, value, prog_bar=False)
        self._interval, self._waited = (step, self.images_seen, now), 0.0

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.images_seen is not None:
            checkpoint[IMAGES_SEEN] = int(self.images_seen)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        recorded = checkpoint.get(IMAGES_SEEN)
        self.images_seen = int(recorded) if recorded is not None else None
