"""The data of ``predict``: one item per image to generate, its class label and its noise seed.

Global sample ``i`` has label ``i % num_classes`` and seed ``seed + i``
(:func:`dip_lightning.core.seeding.sample_labels_and_seeds`, the rule of every export), so ``predict`` writes
the images ``sample`` exports. YAML: ``--data dip_lightning.core.data.LabelSeedDataModule``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dip_lightning.core.seeding import sample_labels_and_seeds

__all__ = ["LabelSeedDataModule", "LabelSeedDataset"]


class LabelSeedDataset(Dataset):
    """Items ``{"labels", "seeds", "index"}`` for global sample indices [start, start + num_samples)."""

    def __init__(
        self, num_samples: int, num_classes: int, seed: int = 0, balanced: bool = True, start: int = 0
    ):
        self.indices = np.arange(start, start + num_samples, dtype=np.int64)
        self.labels, self.seeds = sample_labels_and_seeds(self.indices, num_classes, seed, balanced)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "labels": torch.tensor(self.labels[i]),
            "seeds": torch.tensor(self.seeds[i]),
            "index": torch.tensor(self.indices[i]),
        }


class LabelSeedDataModule(pl.LightningDataModule):
    """Data for ``python -m dip_lightning predict``: class-balanced labels with one noise seed per sample.

    Args:
        num_samples: how many images to generate.
        num_classes: number of classes (must match the model).
        batch_size: per-device batch size.
        seed: base noise seed; sample i uses seed + i.
        balanced: labels i % num_classes (else a seeded draw).
        image_size: the model's input size (checked against the model).
    """

    def __init__(
        self,
        num_samples: int = 64,
        num_classes: int = 1000,
        batch_size: int = 16,
        seed: int = 0,
        balanced: bool = True,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.seed = seed
        self.balanced = balanced
        self.image_size = image_size

    def predict_dataloader(self) -> DataLoader:
        dataset = LabelSeedDataset(self.num_samples, self.num_classes, self.seed, self.balanced)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
