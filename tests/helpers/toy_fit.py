"""The smallest real Lightning fit, for tests of callbacks and Lightning internals: a toy regression module and a
quiet CPU Trainer (no logger, checkpoints, progress bar or model summary unless a test asks for them)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ToyRegression(pl.LightningModule):
    """Drives ``net``'s outputs towards zero by SGD on ``samples`` random inputs (its own train dataloader)."""

    def __init__(
        self, net: nn.Module | None = None, *, lr: float = 0.1, samples: int = 8, batch_size: int = 2
    ) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1) if net is None else net
        self.lr, self.samples, self.batch_size = lr, samples, batch_size

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        features = next(m.in_features for m in self.net.modules() if isinstance(m, nn.Linear))
        return DataLoader(TensorDataset(torch.randn(self.samples, features)), batch_size=self.batch_size)


def cpu_trainer(**options: Any) -> pl.Trainer:
    """A one-process CPU Trainer that writes and prints nothing by itself; ``options`` win over these defaults."""
    quiet = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**quiet, **options})
