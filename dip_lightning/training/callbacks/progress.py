"""The training progress bar: Lightning's RichProgressBar, without a host-device sync on every step, and with
plain progress lines where the output is a file (SLURM logs)."""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar

from dip_lightning.core.errors import ConfigError

IMAGES_PER_SEC = "train/images_per_sec"


class RichProgress(RichProgressBar):
    """Lightning's :class:`RichProgressBar` that reads the logged metrics every ``metrics_every_n_steps`` steps.

    Why the wrapper: RichProgressBar fetches the progress-bar metrics (``train/loss``) after every training
    batch, and fetching converts the logged GPU tensors to Python floats: a host-device synchronisation per
    step, which drains the CUDA queue the CPU is meant to keep ahead of. (TQDMProgressBar reads them only at
    its refresh rate.) Here the bar still advances every ``refresh_rate`` batches; the numbers shown are at
    most ``metrics_every_n_steps`` steps old during training and fresh at validation and epoch ends.

    Where standard output is not a terminal (a SLURM log file, CI), rich draws the bar only when it stops, so a
    long epoch would leave the log silent for hours; there a plain line is printed every ``log_every_n_steps``
    instead: step, epoch, the images/s the module logged (``train/images_per_sec``) and the bar's metrics.

    Args:
        refresh_rate: as for Lightning's RichProgressBar.
        leave: as for Lightning's RichProgressBar.
        metrics_every_n_steps: optimizer steps between two reads of the logged metrics while training.
        log_every_n_steps: steps between plain progress lines when standard output is not a terminal; 0 never.
        console_kwargs: as for Lightning's RichProgressBar.
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        leave: bool = False,
        metrics_every_n_steps: int = 25,
        log_every_n_steps: int = 500,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs)
        if metrics_every_n_steps < 1:
            raise ConfigError(f"metrics_every_n_steps must be >= 1, got {metrics_every_n_steps}")
        if log_every_n_steps < 0:
            raise ConfigError(f"log_every_n_steps must be >= 0, got {log_every_n_steps}")
        self.metrics_every_n_steps = metrics_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self._metrics: dict[str, int | str | float | dict[str, float]] | None = None
        self._metrics_step = -1
        self._last_line_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # A bar reused by another fit must not show (or time against) the previous fit's numbers.
        self._metrics, self._metrics_step, self._last_line_step = None, -1, -1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.is_disabled or not self.log_every_n_steps or sys.stdout.isatty():
            return
        if step % self.log_every_n_steps or step == self._last_line_step:
            return
        self._last_line_step = step
        max_steps = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        parts = [f"step {step}{max_steps}", f"epoch {trainer.current_epoch}"]
        rate = trainer.callback_metrics.get(IMAGES_PER_SEC)  # what the module logged (DiPModule does)
        if rate is not None:
            parts.append(f"{float(rate):.1f} img/s")
        for key, value in self.get_metrics(trainer, pl_module).items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        print(" | ".join(parts), flush=True)

    def get_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        step = trainer.global_step
        stale = self._metrics is None or step - self._metrics_step >= self.metrics_every_n_steps
        if stale or not trainer.training:
            self._metrics = super().get_metrics(trainer, pl_module)
            # The logger's version is always "tensorboard" here (pinned run folder), shown as "oard".
            self._metrics.pop("v_num", None)
            self._metrics_step = step
        return self._metrics

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's version prints "Epoch 3/-2" for step-limited runs (max_epochs=-1); a private hook, kept
        # to the same signature.
        if self.trainer.max_epochs is None or self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{max(len(self.validation_description), len(description))}}"
