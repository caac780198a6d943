"""Test-only instruments for the loss-spike guard (``--trainer.callbacks+=tests.helpers.spike_probe.InjectSpikes``
with the repository on PYTHONPATH).

:class:`InjectSpikes` multiplies the images of the batches of chosen optimizer steps by a large factor, a real
loss spike (the flow-matching target grows with the images), the first time each step is trained (a transient
fault: a replay after a rollback sees the normal batch), and records every step's weights and losses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from dip_lightning.training.callbacks.loss_spike import find_loss_spike_guard


class InjectSpikes(pl.Callback):
    """Scale the images of the batches of ``steps`` (1-based optimizer steps) by ``scale``, once per step.

    Args:
        steps: the steps to spike.
        scale: the factor on the images.
        every_time: spike the step on every pass (a replay after a rollback too), not only the first.
        ranks: the global ranks whose batches are spiked (None: all).
        out_dir: where ``spikes_rank{R}.json`` (each rank's guard record) and ``weights_rank{R}.pt`` (the final
            weights) are written at the end of training; None: nothing is written.
    """

    def __init__(
        self,
        steps: list[int] | None = None,
        scale: float = 50.0,
        every_time: bool = False,
        ranks: list[int] | None = None,
        out_dir: str | None = None,
    ) -> None:
        self.pending = set(steps or [])
        self.steps = set(self.pending)
        self.scale = scale
        self.every_time = every_time
        self.ranks = None if ranks is None else set(ranks)
        self.out_dir = Path(out_dir) if out_dir else None
        self.injected: list[int] = []
        self.losses: dict[int, float] = {}  # the last loss trained at each step
        self.weights: dict[int, dict[str, torch.Tensor]] = {}  # after each step (the last pass)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any
    ) -> None:
        step = trainer.global_step + 1
        if self.ranks is not None and trainer.global_rank not in self.ranks:
            return
        if step in self.pending or (self.every_time and step in self.steps):
            self.pending.discard(step)
            batch[0].mul_(self.scale)
            self.injected.append(step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        step = trainer.global_step
        self.losses[step] = float(outputs["loss"])
        self.weights[step] = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        guard = find_loss_spike_guard(trainer)
        record = {
            "injected": self.injected,
            "spike_steps": guard.spike_steps if guard else None,
            "rollbacks": guard.rollbacks if guard else None,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        (self.out_dir / f"spikes_rank{rank}.json").write_text(json.dumps(record))
        torch.save(pl_module.net.state_dict(), self.out_dir / f"weights_rank{rank}.pt")
