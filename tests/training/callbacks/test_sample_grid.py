"""Sample grids in real ``fit`` runs: the same image for the same step and seed, logged to TensorBoard and as a
PNG, with the class of each row recorded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from dip_lightning.training.callbacks import SampleGrid
from dip_lightning.training.cli import DiPCLI
from tests.helpers.tiny import HIGH_LR, ema_callback, fit_with, grid_callback, read_png, tiny_args


def grid_run(run_dir: Path, data: dict) -> DiPCLI:
    grid = grid_callback(every_n_steps=2, classes=[3, 0, 7], cols=2, num_steps=3, seed=5)
    args = tiny_args(
        run_dir,
        data,
        HIGH_LR,
        "--checkpoint.every_n_train_steps=4",
        steps=4,
        callbacks=[ema_callback(), grid],
    )
    return fit_with(args)


def tensorboard_images(log_dir: Path, tag: str) -> dict[int, torch.Tensor]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    return {
        e.step: torch.from_numpy(np.asarray(Image.open(io.BytesIO(e.encoded_image_string))))
        .permute(2, 0, 1)
        .contiguous()
        for e in events.Images(tag)
    }


def test_sample_grid_same_step_and_seed_give_the_same_image(tmp_path: Path, demo_data: dict) -> None:
    first = grid_run(tmp_path / "a", demo_data)
    grid_run(tmp_path / "b", demo_data)
    grids_a = tmp_path / "a" / "tensorboard" / "grids"
    grids_b = tmp_path / "b" / "tensorboard" / "grids"
    # Every 2 steps: 2 and 4; the end of training (step 4) is not written twice.
    assert sorted(p.name for p in grids_a.glob("*.png")) == ["step_00000002.png", "step_00000004.png"]
    for name in ("step_00000002.png", "step_00000004.png"):
        assert (grids_a / name).read_bytes() == (grids_b / name).read_bytes()
        meta = json.loads((grids_a / name).with_suffix(".json").read_text())
        assert meta["row_classes"] == [3, 0, 7] and meta["cols"] == 2 and meta["seed"] == 5
        assert meta["step"] == int(name[5:13])
    # Rows of 2 images of 32 px with 2 px padding.
    step4 = read_png(grids_a / "step_00000004.png")
    assert step4.shape == (3, 3 * 34 + 2, 2 * 34 + 2)
    assert not torch.equal(read_png(grids_a / "step_00000002.png"), step4)  # the model moved between grids

    # TensorBoard holds the same images, at their steps.
    logged = tensorboard_images(tmp_path / "a" / "tensorboard", "samples/grid")
    assert sorted(logged) == [2, 4]
    assert torch.equal(logged[4], step4)

    # Regenerated from the same weights: the same seed gives the same image, another seed another one.
    trainer, module = first.trainer, first.model
    same, classes = SampleGrid(classes=[3, 0, 7], cols=2, num_steps=3, seed=5).generate_grid(trainer, module)
    other, _ = SampleGrid(classes=[3, 0, 7], cols=2, num_steps=3, seed=6).generate_grid(trainer, module)
    assert classes == [3, 0, 7]
    assert torch.equal(same, step4)
    assert not torch.equal(other, step4)


def test_sample_grid_default_classes_and_bad_classes() -> None:
    grid = SampleGrid(rows=4)
    assert grid.row_classes(1000) == [0, 250, 500, 750]
    assert SampleGrid(rows=8).row_classes(8) == list(range(8))
    with pytest.raises(ValueError, match="outside"):
        SampleGrid(classes=[0, 8]).row_classes(8)
    with pytest.raises(ValueError, match="every_n_steps"):
        SampleGrid(every_n_steps=0)


class NetworkCalls(pl.Callback):
    """Records ``(batch size, t)`` of every network call made outside training (the grid's sampling)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def record(net: torch.nn.Module, args: tuple) -> None:
            if not net.training:
                x, t = args[0], args[1]
                self.calls.append((int(x.shape[0]), round(float(t[0]), 4)))

        pl_module.net.register_forward_pre_hook(record)


def test_sample_grid_guidance_interval_reaches_the_sampler(tmp_path: Path, demo_data: dict) -> None:
    # 5 Euler steps at t = 0, 0.2, 0.4, 0.6, 0.8; guidance on (0.3, 0.7) doubles the batch at 0.4 and 0.6 only
    # (the configured interval would guide from 0.2 on).
    grid = grid_callback(
        every_n_steps=2,
        classes=[0, 1],
        cols=2,
        num_steps=5,
        cfg_scale=2.0,
        cfg_interval=[0.3, 0.7],
        use_ema=False,
    )
    calls = NetworkCalls()
    fit_with(tiny_args(tmp_path / "run", demo_data, steps=2, callbacks=[grid]), calls)
    assert calls.calls == [(4, 0.0), (4, 0.2), (8, 0.4), (8, 0.6), (4, 0.8)]
