"""``--trainer.callbacks+=tests.helpers.init_probe.StartWeights``: save the weights a fit starts from."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


class StartWeights(pl.Callback):
    """Write the module's state_dict at ``on_train_start`` (after any checkpoint or --init_from load) to ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.out)
