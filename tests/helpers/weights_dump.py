"""A test-only callback (importable by subprocess CLI runs): dumps each rank's final weights and seen labels."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch


class DumpWeights(pl.Callback):
    """Writes ``rank{R}.pt`` (the module's state_dict) and ``rank{R}.json`` (labels of every batch) into out_dir."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.labels: list[list[int]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:  # noqa: ANN001
        self.labels.append(batch[1].tolist())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        torch.save(
            {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.out_dir / f"rank{rank}.pt"
        )
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(self.labels))
