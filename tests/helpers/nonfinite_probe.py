"""Test-only instruments for the non-finite guard (``--trainer.callbacks+=tests.helpers.nonfinite_probe.Poison``
with the repository on PYTHONPATH).

:class:`Poison` makes chosen optimizer steps non-finite (a NaN in one gradient, after backward and, in DDP, after
the gradient all-reduce, on chosen ranks only) and records, at the end of every step, the weights, the optimizer
state, every EMA and the LR scheduler, so that a test can compare a skipped step with the one before it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from dip_lightning.training.callbacks import PowerFunctionEMA
from dip_lightning.training.callbacks.ema import find_ema
from dip_lightning.training.callbacks.nonfinite import find_nonfinite_guard


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


class Poison(pl.Callback):
    """Put a NaN into a gradient at the given (1-based) optimizer steps, on ``ranks`` (None: every rank).

    Args:
        steps: the optimizer steps (1-based) to poison.
        ranks: the global ranks that poison (None: all).
        out_dir: where ``state_rank{R}.pt`` (a list of per-step records) and ``skips_rank{R}.json`` are written at
            the end of training; None: kept in :attr:`records` only.
    """

    def __init__(
        self, steps: list[int] | None = None, ranks: list[int] | None = None, out_dir: str | None = None
    ):
        self.steps = set(steps or [])
        self.ranks = None if ranks is None else set(ranks)
        self.out_dir = Path(out_dir) if out_dir else None
        self.records: list[dict[str, Any]] = []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step + 1
        if step in self.steps and (self.ranks is None or trainer.global_rank in self.ranks):
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        ema = find_ema(trainer)
        record = {
            "step": trainer.global_step,
            "weights": _copy(pl_module.state_dict()),
            "optimizer": _copy(trainer.optimizers[0].state_dict()),
            "ema": _copy(ema.averages()) if ema is not None else None,
            "ema_updates": ema.num_updates if ema is not None else None,
            "schedulers": [_copy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
            "phema": [_copy(c.averages) for c in trainer.callbacks if isinstance(c, PowerFunctionEMA)],
        }
        self.records.append(record)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._dump(trainer)

    def _dump(self, trainer: pl.Trainer) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        torch.save(self.records, self.out_dir / f"state_rank{rank}.pt")
        guard = find_nonfinite_guard(trainer)
        skips = guard.skipped_steps if guard is not None else None
        (self.out_dir / f"skips_rank{rank}.json").write_text(json.dumps(skips))
