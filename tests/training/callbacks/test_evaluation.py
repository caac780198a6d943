"""Evaluations during training (grids, metrics) come after their step's checkpoint, and a signal stops them.

Real Lightning fits of a toy generator on one process (and two gloo processes), real signals sent with ``os.kill``
from inside an evaluation's ``generate`` call, the kit's checkpoint IO and preemption guard.
"""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dip_lightning.checkpoint.io import AtomicCheckpointIO
from dip_lightning.checkpoint.run_folder import log_dir
from dip_lightning.core.metrics.features import PixelProjection
from dip_lightning.training.callbacks import EMA, MetricsCallback, SampleGrid
from dip_lightning.training.callbacks.preemption import PreemptionGuard, TrainingAborted, TrainingInterrupted
from tests.helpers.toy_fit import ToyRegression

torch.set_num_threads(1)
SIZE = 8


class Painter(ToyRegression):
    """A toy regression with the sampling API (images are a function of label, seed and the weights) that sends
    itself ``signals[n]`` during its n-th ``generate`` call (counted over the run, on ``signal_rank``)."""

    num_classes = 2
    image_shape = (3, SIZE, SIZE)

    def __init__(self, signals: dict[int, list[int]] | None = None, signal_rank: int = 0) -> None:
        super().__init__(samples=64, batch_size=2)
        self.signals = signals or {}
        self.signal_rank = signal_rank
        self.generate_calls = 0

    @torch.no_grad()
    def generate(
        self, labels: torch.Tensor, seeds: torch.Tensor, guide: Any = None, **overrides: Any
    ) -> torch.Tensor:
        self.generate_calls += 1
        if self.global_rank == self.signal_rank:
            for sig in self.signals.get(self.generate_calls, []):
                os.kill(os.getpid(), sig)
        noise = torch.stack(
            [torch.randn(self.image_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        )
        return torch.tanh(noise * self.net.weight.sum() + labels.view(-1, 1, 1, 1))


EVENTS: list[tuple[str, int]] = []


class Recorder(pl.Callback):
    """Records every checkpoint save (``on_save_checkpoint`` runs inside ``trainer.save_checkpoint``)."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        EVENTS.append(("save", trainer.global_step))


class RecordedGrid(SampleGrid):
    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        EVENTS.append(("grid", trainer.global_step))
        return super().write(trainer, pl_module)


class RecordedMetrics(MetricsCallback):
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float | None]:
        EVENTS.append(("metrics", trainer.global_step))
        return super().evaluate(trainer, pl_module)


def reference(folder: Path) -> str:
    """An image npz (the evaluate command's sample layout) as the metrics reference."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ref.npz"
    g = torch.Generator().manual_seed(7)
    images = (torch.rand(24, SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
    np.savez(path, arr_0=images)
    return str(path)


def metrics(folder: Path, cls: type[MetricsCallback] = MetricsCallback, **options: Any) -> MetricsCallback:
    settings = {"every_n_steps": 2, "num_samples": 8, "batch_size": 2, "metrics": ["fid"]}
    return cls(
        **{**settings, **options},
        reference=reference(folder),
        extractor=PixelProjection(num_features=6, size=4),
        cache_dir=str(folder / "cache"),
    )


def fit(
    folder: Path, module: Painter, callbacks: list[pl.Callback], max_steps: int = 3, **trainer: Any
) -> pl.Trainer:
    run = pl.Trainer(
        default_root_dir=folder,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=callbacks,
        **trainer,
    )
    run.fit(module)
    return run


def checkpoint(folder: Path, **options: Any) -> ModelCheckpoint:
    settings = {
        "every_n_train_steps": 2,
        "save_top_k": -1,
        "save_last": True,
        "filename": "step{step}",
        "auto_insert_metric_name": False,
    }
    return ModelCheckpoint(dirpath=folder / "checkpoints", **{**settings, **options})


def csv_steps(folder: Path) -> list[int]:
    path = log_dir(folder) / "eval_metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def test_the_step_is_saved_before_its_grid_and_metrics(tmp_path: Path) -> None:
    """Evaluations listed before the EMA still come after it and after the step's save; the end-of-training
    evaluation comes after the end-of-training ``last.ckpt``."""
    EVENTS.clear()
    grid = RecordedGrid(every_n_steps=2, rows=1, cols=2, num_steps=None)
    evaluation = metrics(tmp_path, RecordedMetrics)
    ema = EMA(decay=0.5)
    trainer = fit(tmp_path, Painter(), [grid, evaluation, ema, Recorder(), checkpoint(tmp_path)])
    # step 2: step2.ckpt and last.ckpt, then the grid and the metrics; step 3 (train end): no save, evaluations.
    assert EVENTS == [("save", 2), ("save", 2), ("grid", 2), ("metrics", 2), ("grid", 3), ("metrics", 3)]
    names = [type(c).__name__ for c in trainer.callbacks]
    assert names[names.index("EMA") :] == [
        "EMA",
        "Recorder",
        "RecordedGrid",
        "RecordedMetrics",
        "ModelCheckpoint",
    ]
    # The step's checkpoint holds the step's EMA update although the evaluations were listed before the EMA.
    saved = torch.load(tmp_path / "checkpoints" / "step2.ckpt", map_location="cpu", weights_only=False)
    assert int(saved["averaging_state"]["n_averaged"]) == 2

    # Nothing saved during training: ModelCheckpoint's end-of-training last.ckpt precedes the final evaluation.
    EVENTS.clear()
    end = tmp_path / "end"
    fit(
        end,
        Painter(),
        [
            metrics(end, RecordedMetrics, every_n_steps=10),
            Recorder(),
            checkpoint(end, every_n_train_steps=10),
        ],
    )
    assert EVENTS == [("save", 3), ("metrics", 3)]


def test_a_checkpoint_ranked_by_the_evaluation_is_written_after_it(tmp_path: Path) -> None:
    EVENTS.clear()
    ranked = checkpoint(tmp_path, monitor="val/fid", save_last=False, save_top_k=1, filename="best")
    fit(tmp_path, Painter(), [metrics(tmp_path, RecordedMetrics), Recorder(), ranked], max_steps=2)
    assert EVENTS == [("metrics", 2), ("save", 2)]
    assert ranked.best_model_score is not None and torch.isfinite(ranked.best_model_score)


@pytest.mark.parametrize("checkpoint_step", [True, False])
def test_sigterm_during_the_metrics_stops_them_and_saves_only_an_unsaved_step(
    tmp_path: Path, checkpoint_step: bool
) -> None:
    """SIGTERM during the second batch of samples at step 2: the third batch is never generated, no row for step
    2; a preemption checkpoint is written only when step 2 is not a checkpoint step."""
    module = Painter(signals={2: [signal.SIGTERM]})
    saves = checkpoint(tmp_path, every_n_train_steps=2 if checkpoint_step else 5)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(tmp_path, module, [metrics(tmp_path), PreemptionGuard(), saves], max_steps=10)
    assert stop.value.code == 128 + signal.SIGTERM and stop.value.step == 2
    assert module.generate_calls == 2
    assert csv_steps(tmp_path) == []
    preemption = sorted(p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt"))
    if checkpoint_step:
        assert preemption == [] and stop.value.ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt")
    else:
        assert preemption == ["hpc_ckpt_1.ckpt"] and not (tmp_path / "checkpoints").exists()
    saved = torch.load(stop.value.ckpt_path, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 and saved["optimizer_states"]


def test_sigterm_during_the_end_of_training_evaluation_saves_the_last_step(tmp_path: Path) -> None:
    """The evaluation at train end (step 3, not a checkpoint step) stops at the next batch; the step is saved as a
    preemption checkpoint and the run exits 143 instead of 0."""
    module = Painter(signals={5: [signal.SIGTERM]})  # step 2: calls 1-4; train end: call 5 is the first
    with pytest.raises(TrainingInterrupted) as stop:
        fit(tmp_path, module, [metrics(tmp_path), PreemptionGuard(), checkpoint(tmp_path)], max_steps=3)
    assert stop.value.code == 128 + signal.SIGTERM and stop.value.step == 3
    assert module.generate_calls == 5 and csv_steps(tmp_path) == [2]
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3 and saved["optimizer_states"]


def test_sigterm_during_the_grid_stops_after_it(tmp_path: Path) -> None:
    module = Painter(signals={1: [signal.SIGTERM]})
    grid = SampleGrid(every_n_steps=2, rows=1, cols=2, num_steps=None)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(
            tmp_path, module, [grid, metrics(tmp_path), PreemptionGuard(), checkpoint(tmp_path)], max_steps=10
        )
    assert stop.value.step == 2 and module.generate_calls == 1  # the metrics never started
    assert grid.last_written is not None and grid.last_written.name == "step_00000002.png"


def test_second_ctrl_c_during_an_evaluation_aborts_at_once_with_130(tmp_path: Path) -> None:
    module = Painter(signals={1: [signal.SIGINT, signal.SIGINT]})
    with pytest.raises(TrainingAborted) as stop:
        fit(tmp_path, module, [metrics(tmp_path), PreemptionGuard(), checkpoint(tmp_path)], max_steps=10)
    assert stop.value.code == 128 + signal.SIGINT
    assert module.generate_calls == 1  # aborted inside the first batch
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))


def test_a_signal_after_the_last_evaluation_still_exits_with_its_code(tmp_path: Path) -> None:
    """SIGTERM while the last step trains (no evaluation left to stop): training completes and saves as usual,
    then the run reports the signal instead of success."""

    class SignalAtLastStep(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == trainer.max_steps - 1:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stop:
        fit(tmp_path, Painter(), [SignalAtLastStep(), PreemptionGuard(), checkpoint(tmp_path)], max_steps=2)
    assert stop.value.code == 128 + signal.SIGTERM and stop.value.step == 2
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


@pytest.mark.slow  # two processes
@pytest.mark.timeout(300)  # ranks that disagree on stopping hang in a collective
def test_ddp_signal_on_one_rank_stops_both_between_batches_of_unequal_count(tmp_path: Path) -> None:
    """9 samples in batches of 2 over two ranks: rank 0 generates 3 batches per evaluation, rank 1 two; the signal
    checks still pair up (without a signal the fit completes), and a SIGTERM on rank 1 alone stops both ranks in
    the first evaluation, after the step's checkpoint."""
    from torch.multiprocessing import ProcessExitedException

    def run(folder: Path, signals: dict[int, list[int]]) -> None:
        callbacks = [metrics(folder, num_samples=9), PreemptionGuard(), checkpoint(folder)]
        fit(folder, Painter(signals, signal_rank=1), callbacks, max_steps=3, devices=2, strategy="ddp_fork")

    run(tmp_path / "plain", {})
    assert csv_steps(tmp_path / "plain") == [2, 3]
    with pytest.raises(ProcessExitedException) as stop:
        run(tmp_path / "signal", {1: [signal.SIGTERM]})
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert csv_steps(tmp_path / "signal") == []
    last = torch.load(tmp_path / "signal" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2
    assert not list((tmp_path / "signal").glob("hpc_ckpt_*.ckpt"))
