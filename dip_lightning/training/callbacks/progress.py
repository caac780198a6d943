"""The training progress bar: Lightning's RichProgressBar, without a host-device sync on every step, counting the
run's optimizer steps and images (ETA to ``max_steps``), and with plain progress lines where the output is a file
(SLURM logs)."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar

from dip_lightning.core.errors import ConfigError
from dip_lightning.training.callbacks.monitor import IMAGES_PER_SEC_LOG, images_seen

IMAGES_PER_SEC = IMAGES_PER_SEC_LOG


def format_images(count: int) -> str:
    """An image count in a few characters: ``950``, ``12.3k``, ``1.28M``, ``1.54B``."""
    for scale, suffix, digits in ((1e9, "B", 2), (1e6, "M", 2), (1e3, "k", 1)):
        if count >= scale:
            return f"{count / scale:.{digits}f}{suffix}"
    return str(count)


class RichProgress(RichProgressBar):
    """Lightning's :class:`RichProgressBar` that reads the logged metrics every ``metrics_every_n_steps`` steps.

    Why the wrapper: RichProgressBar fetches the progress-bar metrics (``train/loss``) after every training
    batch, and fetching converts the logged GPU tensors to Python floats: a host-device synchronisation per
    step, which drains the CUDA queue the CPU is meant to keep ahead of. (TQDMProgressBar reads them only at
    its refresh rate.) Here the bar still advances every ``refresh_rate`` batches; the numbers shown are at
    most ``metrics_every_n_steps`` steps old during training and fresh at validation and epoch ends.

    In a run limited by ``trainer.max_steps`` the training bar counts the run's optimizer steps up to
    ``max_steps`` (not the current epoch's batches), so its time remaining is the run's; its description shows the
    epoch and the images seen (:func:`~dip_lightning.training.callbacks.monitor.images_seen`, a host-side count).

    Where standard output is not a terminal (a SLURM log file, CI), rich draws the bar only when it stops, so a
    long epoch would leave the log silent for hours; there a plain line is printed every ``log_every_n_steps``
    instead: step, epoch, images seen, the logged images/s (``train/images_per_sec``), the time remaining to
    ``max_steps`` at this job's pace so far, and the bar's metrics.

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
        self._started: tuple[int, float] | None = None  # (global_step, time) when this job's training started

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # A bar reused by another fit must not show (or time against) the previous fit's numbers.
        self._metrics, self._metrics_step, self._last_line_step = None, -1, -1
        self._started = (trainer.global_step, time.perf_counter())

    # ------------------------------------------------------------------ the bar counts the run's steps
    def _counts_steps(self) -> bool:
        return self._trainer is not None and self.trainer.training and (self.trainer.max_steps or 0) > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._counts_steps() and self.train_progress_bar_id is not None and self.progress is not None:
            # One bar for the whole run: a reset at each epoch would restart its speed estimate.
            self.progress.update(self.train_progress_bar_id, description=self._train_text(), visible=True)
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)

    def _update(self, progress_bar_id: Any, current: int, visible: bool = True, hard: bool = False) -> None:
        # Lightning's private hook (same signature): the training bar shows the global step and the images.
        if (
            progress_bar_id is None
            or progress_bar_id != self.train_progress_bar_id
            or not self._counts_steps()
        ):
            return super()._update(progress_bar_id, current, visible=visible, hard=hard)
        if self.progress is not None and self.is_enabled:
            step = self.trainer.global_step
            self.progress.update(
                progress_bar_id, completed=step, description=self._train_text(), visible=visible
            )
            self.refresh(hard=hard)

    def _train_text(self) -> str:
        text = self._get_train_description(self.trainer.current_epoch).rstrip()
        seen = images_seen(self.trainer)
        if seen is not None:
            text += f" | {format_images(seen)} img"
        return f"[{self.theme.description}]{text}" if self.theme.description else text

    def time_remaining(self, trainer: pl.Trainer) -> float | None:
        """Seconds to ``max_steps`` at this job's pace so far (host time); None before a step or without it."""
        if self._started is None or not trainer.max_steps or trainer.max_steps < 0:
            return None
        first_step, started = self._started
        done = trainer.global_step - first_step
        if done <= 0:
            return None
        return (trainer.max_steps - trainer.global_step) * (time.perf_counter() - started) / done

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.is_disabled or not self.log_every_n_steps or sys.stdout.isatty():
            return
        if not step or step % self.log_every_n_steps or step == self._last_line_step:
            return  # no step done yet (accumulating the first one), not a line's step, or printed already
        self._last_line_step = step
        max_steps = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        parts = [f"step {step}{max_steps}", f"epoch {trainer.current_epoch}"]
        seen = images_seen(trainer)
        if seen is not None:
            parts.append(f"{format_images(seen)} img")
        rate = trainer.callback_metrics.get(IMAGES_PER_SEC)  # what the monitor logged (a host number)
        if rate is not None:
            parts.append(f"{float(rate):.1f} img/s")
        remaining = self.time_remaining(trainer)
        if remaining is not None:
            parts.append(f"ETA {timedelta(seconds=round(remaining))}")
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
