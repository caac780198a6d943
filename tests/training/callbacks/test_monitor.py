"""The training monitors: images seen and images/s under gradient accumulation and DDP, MFU, data wait, resume.

Real Trainer runs with a CSVLogger; the values checked are the ones the logger wrote.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dip_lightning.checkpoint.format import IMAGES_SEEN
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.models.flops import forward_flops_per_image
from dip_lightning.training.callbacks.monitor import TrainingMonitor, images_seen
from tests.helpers.toy_fit import cpu_trainer


class PixelNet(nn.Module):
    """A linear map of a 2x4x4 image: DiP's ``net(x, t, y)`` interface, FLOPs known in closed form."""

    in_channels, input_size = 2, 4

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class SlowData(Dataset):
    """``size`` images of ``PixelNet``'s shape; each read takes ``seconds`` (a slow disk)."""

    def __init__(self, size: int = 256, seconds: float = 0.0) -> None:
        self.size, self.seconds = size, seconds

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.seconds:
            time.sleep(self.seconds)
        return torch.full((2, 4, 4), float(i % 7))


class Regression(pl.LightningModule):
    """Trains ``PixelNet``; each training step takes at least ``step_seconds`` (a slow device)."""

    def __init__(self, batch_size: int = 2, step_seconds: float = 0.0, read_seconds: float = 0.0) -> None:
        super().__init__()
        self.net = PixelNet()
        self.batch_size, self.step_seconds, self.read_seconds = batch_size, step_seconds, read_seconds

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        zeros = torch.zeros(len(batch))
        return self.net(batch, zeros, zeros.long()).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(SlowData(seconds=self.read_seconds), batch_size=self.batch_size)


def logged(folder: Path) -> dict[str, dict[int, float]]:
    """What the CSVLogger wrote: ``{metric: {step: value}}``."""
    (path,) = folder.rglob("metrics.csv")
    out: dict[str, dict[int, float]] = {}
    for row in csv.DictReader(path.open()):
        for key, value in row.items():
            if key not in ("step", "epoch") and value:
                out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def fit(
    folder: Path, module: Regression, monitor: TrainingMonitor | None = None, **options: Any
) -> pl.Trainer:
    ckpt_path = options.pop("ckpt_path", None)
    trainer = cpu_trainer(
        logger=CSVLogger(folder, name="logs"),
        callbacks=[monitor or TrainingMonitor(), *options.pop("callbacks", [])],
        **options,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_images_seen_and_rate_count_every_micro_batch_of_accumulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []
    original = pl.LightningModule.log

    def spy(self, name, value, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append((name, self.trainer.global_step))
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", spy)
    module = Regression(batch_size=2, step_seconds=0.05)
    started = time.perf_counter()
    trainer = fit(tmp_path, module, max_steps=6, accumulate_grad_batches=2, log_every_n_steps=2)
    seconds = time.perf_counter() - started
    # Logged once per logging step (optimizer steps 2, 4, 6), not at every micro-batch of it.
    assert [step for name, step in calls if name == "train/images_seen"] == [2, 4, 6]
    values = logged(tmp_path)  # the logger's step is Lightning's: the optimizer step - 1
    # micro-batch 2 x 2 micro-batches per step x 1 process = 4 images per optimizer step.
    assert values["train/images_seen"] == {1: 8.0, 3: 16.0, 5: 24.0}
    assert images_seen(trainer) == 24
    # Each micro-batch sleeps 50 ms: at most 2 images / 0.05 s. The three intervals (8 images each) are disjoint
    # spans of the fit: the times the rates imply add up to no more than the fit's wall time.
    rates = list(values["train/images_per_sec"].values())
    assert len(rates) == 3 and all(rate <= 40.0 for rate in rates)
    assert 0.6 <= sum(8 / rate for rate in rates) < seconds
    assert "train/mfu" not in values and "train/peak_memory_gib" not in values  # CPU, no peak configured


def test_data_wait_is_the_share_of_time_between_batches(tmp_path: Path) -> None:
    slow_data = logged_wait(tmp_path / "slow_data", Regression(read_seconds=0.02, step_seconds=0.005))
    slow_step = logged_wait(tmp_path / "slow_step", Regression(read_seconds=0.0, step_seconds=0.04))
    # 40 ms of reading against 5 ms of step; then no reading against 40 ms of step.
    assert all(0.5 < w <= 1.0 for w in slow_data), slow_data
    assert all(0.0 <= w < 0.25 for w in slow_step), slow_step


def logged_wait(folder: Path, module: Regression) -> list[float]:
    fit(folder, module, max_steps=8, log_every_n_steps=4)
    return list(logged(folder)["train/data_wait"].values())


def test_mfu_from_the_network_flops_and_a_configured_peak(tmp_path: Path) -> None:
    assert forward_flops_per_image(PixelNet()) == 2 * 32 * 5  # one multiply-add per weight
    fit(tmp_path, Regression(), TrainingMonitor(peak_tflops=1e-6), max_steps=4, log_every_n_steps=2)
    values = logged(tmp_path)
    for step, rate in values["train/images_per_sec"].items():
        expected = 3 * (2 * 32 * 5) * rate / 1e6  # forward + backward, over 1 TFLOP/s x 1e-6
        assert values["train/mfu"][step] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="peak_tflops"):
        TrainingMonitor(peak_tflops=0)


def test_images_seen_resumes_from_the_checkpoint_count_not_the_formula(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    saver = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=4, save_top_k=-1, filename="step{step}")
    fit(
        tmp_path / "a",
        Regression(batch_size=2),
        max_steps=4,
        log_every_n_steps=2,
        callbacks=[saver],
        enable_checkpointing=True,
    )
    (path,) = ckpts.glob("*.ckpt")
    assert torch.load(path, weights_only=False)[IMAGES_SEEN] == 8
    # The batch size changed on resume: 4 steps of 2 images, then 4 steps of 3.
    fit(tmp_path / "b", Regression(batch_size=3), max_steps=8, log_every_n_steps=2, ckpt_path=str(path))
    assert logged(tmp_path / "b")["train/images_seen"] == {5: 14.0, 7: 20.0}


def test_two_ddp_processes_count_both_ranks(tmp_path: Path) -> None:
    fit(
        tmp_path,
        Regression(batch_size=2),
        max_steps=4,
        log_every_n_steps=2,
        accumulate_grad_batches=2,
        devices=2,
        strategy="ddp_fork",
    )
    # 2 images x 2 micro-batches x 2 ranks per optimizer step.
    assert logged(tmp_path)["train/images_seen"] == {1: 16.0, 3: 32.0}
