"""The default progress bar: rich, and without a host-device sync (a metrics read) on every training step."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from dip_lightning.training.callbacks import RichProgress
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
