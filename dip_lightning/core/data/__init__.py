"""Data path: shard preparation, the ``ShardDataModule``, the embedded demo dataset and ``predict``'s labels and
seeds (``LabelSeedDataModule``).

Imports are lazy so that ``python -m dip_lightning prepare`` and the FID tools do not pay for
``import lightning`` (seconds). ``from dip_lightning.core.data import ShardDataModule`` and
LightningCLI's ``class_path: dip_lightning.core.data.ShardDataModule`` work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "ShardDataModule": "dip_lightning.core.data.datamodule",
    "LabelSeedDataModule": "dip_lightning.core.data.label_seeds",
    "TrainShardStream": "dip_lightning.core.data.streams",
    "ValShardStream": "dip_lightning.core.data.streams",
    "TrainPlan": "dip_lightning.core.data.streams",
    "iter_image_batches": "dip_lightning.core.data.streams",
    "count_samples": "dip_lightning.core.data.streams",
    "center_crop_arr": "dip_lightning.core.data.preprocess",
    "decode_image": "dip_lightning.core.data.preprocess",
    "expand_shards": "dip_lightning.core.data.shards",
    "read_class_names": "dip_lightning.core.data.shards",
    "prepare_split": "dip_lightning.core.data.prepare",
    "build_demo_dataset": "dip_lightning.core.data.demo_dataset",
    "demo_dataset": "dip_lightning.core.data.demo_dataset",
}

__all__ = [
    "LabelSeedDataModule",
    "ShardDataModule",
    "TrainPlan",
    "TrainShardStream",
    "ValShardStream",
    "build_demo_dataset",
    "center_crop_arr",
    "count_samples",
    "decode_image",
    "demo_dataset",
    "expand_shards",
    "iter_image_batches",
    "prepare_split",
    "read_class_names",
]

if TYPE_CHECKING:
    from dip_lightning.core.data.datamodule import ShardDataModule
    from dip_lightning.core.data.demo_dataset import build_demo_dataset, demo_dataset
    from dip_lightning.core.data.label_seeds import LabelSeedDataModule
    from dip_lightning.core.data.prepare import prepare_split
    from dip_lightning.core.data.preprocess import center_crop_arr, decode_image
    from dip_lightning.core.data.shards import expand_shards, read_class_names
    from dip_lightning.core.data.streams import (
        TrainPlan,
        TrainShardStream,
        ValShardStream,
        count_samples,
        iter_image_batches,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dip_lightning.core.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
