"""The training progress bar: Lightning's RichProgressBar, without a host-device sync on every step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class RichProgress(RichProgressBar):
    """Lightning's :class:`RichProgressBar` that reads the logged metrics every ``metrics_every_n_steps`` steps.

    Why the wrapper: RichProgressBar fetches the progress-bar metrics (``train/loss``) after every training
    batch, and fetching converts the logged GPU tensors to Python floats: a host-device synchronisation per
    step, which drains the CUDA queue the CPU is meant to keep ahead of. (TQDMProgressBar reads them only at
    its refresh rate.) Here the bar still advances every ``refresh_rate`` batches; the numbers shown are at
    most ``metrics_every_n_steps`` steps old during training and fresh at validation and epoch ends.

    Args:
        refresh_rate, leave, theme, console_kwargs: as for Lightning's RichProgressBar.
        metrics_every_n_steps: optimizer steps between two reads of the logged metrics while training.
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        leave: bool = False,
        metrics_every_n_steps: int = 25,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs)
        if metrics_every_n_steps < 1:
            raise ValueError(f"metrics_every_n_steps must be >= 1, got {metrics_every_n_steps}")
        self.metrics_every_n_steps = metrics_every_n_steps
        self._metrics: dict[str, int | str | float | dict[str, float]] | None = None
        self._metrics_step = -1

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
