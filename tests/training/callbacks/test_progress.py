"""The default progress bar: rich, and without a host-device sync (a metrics read) on every training step."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from dip_lightning.training.callbacks import RichProgress, TrainingMonitor
from dip_lightning.training.callbacks.progress import format_images
from dip_lightning.training.cli import DiPCLI
from tests.helpers.tiny import TINY_CONFIG
from tests.helpers.toy_fit import ToyRegression, cpu_trainer


class LoggingRegression(ToyRegression):
    """Logs what DiPModule shows on the bar: the loss and the image rate, under DiPModule's names."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Linear(4, 1), lr=0.01, samples=64)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/images_per_sec", 123.0)
        return loss


def metric_reads(bar: ProgressBar, monkeypatch: pytest.MonkeyPatch, steps: int = 20) -> tuple[int, dict]:
    """Train `steps` steps with `bar`; count reads of the logged metrics (each one a sync on GPU)."""
    reads = []
    original = ProgressBar.get_metrics

    def counting(self, trainer, pl_module):  # noqa: ANN001, ANN202
        reads.append(trainer.global_step)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(ProgressBar, "get_metrics", counting)
    trainer = cpu_trainer(max_steps=steps, callbacks=[bar], enable_progress_bar=True)
    trainer.fit(LoggingRegression())
    return len(reads), bar.get_metrics(trainer, trainer.lightning_module)


def test_rich_progress_reads_metrics_every_n_steps(monkeypatch):
    stock, _ = metric_reads(RichProgressBar(), monkeypatch)
    ours, shown = metric_reads(RichProgress(metrics_every_n_steps=5), monkeypatch)
    assert stock >= 20  # Lightning's bar: one read (one sync) per step
    assert ours <= 6  # steps 1, 6, 11, 16 and the epoch end
    assert "train/loss" in shown and "v_num" not in shown


def test_plain_lines_when_output_is_not_a_terminal(capsys):
    # Under pytest stdout is a capture buffer, as it is a log file under SLURM: rich would stay silent until the
    # bar stops, so a plain line comes every log_every_n_steps.
    bar = RichProgress(metrics_every_n_steps=5, log_every_n_steps=5)
    trainer = cpu_trainer(max_steps=20, callbacks=[bar], enable_progress_bar=True)
    trainer.fit(LoggingRegression())
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["step 5/20", "step 10/20", "step 15/20", "step 20/20"]
    assert all("123.0 img/s" in ln and "train/loss" in ln for ln in lines), lines


def test_rich_progress_validates_its_arguments():
    with pytest.raises(ValueError, match="metrics_every_n_steps"):
        RichProgress(metrics_every_n_steps=0)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        RichProgress(log_every_n_steps=-1)


def _trainer(tmp_path: Path, *extra: str) -> pl.Trainer:
    args = [
        "--config",
        TINY_CONFIG,
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks=null",
        *extra,
    ]
    return DiPCLI(args=args, run=False).trainer


def test_cli_uses_rich_progress_by_default_and_respects_choices(tmp_path):
    assert isinstance(_trainer(tmp_path).progress_bar_callback, RichProgress)
    assert _trainer(tmp_path, "--trainer.enable_progress_bar=false").progress_bar_callback is None
    tqdm = ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
    assert isinstance(_trainer(tmp_path, *tqdm).progress_bar_callback, TQDMProgressBar)


class BarProbe(pl.Callback):
    """Records the training bar's task (total, completed, description, time remaining) after every batch."""

    def __init__(self, bar: RichProgress) -> None:
        self.bar, self.seen = bar, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        task = self.bar.train_progress_bar
        self.seen.append((trainer.global_step, task.id, task.total, task.completed, task.description))
        self.remaining = task.time_remaining


def test_bar_counts_the_runs_steps_and_images_across_epochs():
    # 4 batches of 2 per epoch, 10 steps: three epochs on one bar whose end is max_steps, not the epoch's end.
    bar = RichProgress()
    probe = BarProbe(bar)
    module = ToyRegression(torch.nn.Linear(4, 1), samples=8, batch_size=2)
    trainer = cpu_trainer(max_steps=10, callbacks=[bar, probe, TrainingMonitor()], enable_progress_bar=True)
    trainer.fit(module)
    assert {description.split(" | ")[0] for *_, description in probe.seen} == {
        "Epoch 0",
        "Epoch 1",
        "Epoch 2",
    }
    assert [(step, total, completed) for step, _, total, completed, _ in probe.seen] == [
        (step, 10, step) for step in range(1, 11)
    ]
    assert len({task_id for _, task_id, *_ in probe.seen}) == 1
    assert probe.seen[-1][-1].startswith("Epoch 2") and probe.seen[-1][-1].endswith("| 20 img")
    assert probe.remaining == 0  # rich's estimate: the remaining steps over the recent step rate


def test_plain_lines_count_images_and_show_the_eta_under_accumulation(capsys):
    bar = RichProgress(log_every_n_steps=2)
    module = ToyRegression(torch.nn.Linear(4, 1), samples=64, batch_size=2)
    trainer = cpu_trainer(
        max_steps=4, accumulate_grad_batches=3, callbacks=[bar, TrainingMonitor()], enable_progress_bar=True
    )
    trainer.fit(module)
    lines = [ln.split(" | ") for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    # No line while the first step accumulates (global step 0); 2 x 3 images per step.
    assert [ln[:3] for ln in lines] == [["step 2/4", "epoch 0", "12 img"], ["step 4/4", "epoch 0", "24 img"]]
    assert all(any(part.startswith("ETA 0:00:") for part in ln) for ln in lines), lines
    assert "ETA 0:00:00" in lines[-1]  # at max_steps


def test_format_images():
    assert [format_images(n) for n in (950, 12_345, 1_281_167, 1_536_000_000)] == [
        "950",
        "12.3k",
        "1.28M",
        "1.54B",
    ]
