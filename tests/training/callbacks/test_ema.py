"""EMA in real ``fit`` runs through the CLI (callbacks configured as YAML/JSON, as in a run).

The network is a 64-wide DiP on the embedded real-image dataset, so a run of a few steps costs about a second.
What is checked, with exact tensor equality:

* the EMA weights differ from the raw ones, and they are what validation and the sample grid use;
* checkpoints hold the EMA weights in ``state_dict`` and the raw ones in ``current_model_state``, also when
  written while validation has the EMA weights swapped in; resuming restores both sets;
* before the first EMA update (``update_starting_at_step`` past the first validation) validation uses the raw
  weights and warns, and a checkpoint stores the raw weights as its ``state_dict``, not the stale initial copy
  (Lightning's stock callback is run alongside to show the gap this closes);
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging

from dip_lightning.core.compat import average_model
from dip_lightning.core.images import to_uint8
from dip_lightning.training.callbacks import EMA, SampleGrid
from dip_lightning.training.callbacks.ema import find_ema, sampling_module
from dip_lightning.training.callbacks.sample_grid import make_grid
from dip_lightning.training.loading import load_module
from tests.helpers.tiny import HIGH_LR, ema_callback, fit_with, grid_callback, read_png, tiny_args
from tests.helpers.weights import STATE, assert_same, differing, state


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


class EMAProbe(Callback):
    """Records, after the last optimizer step, the raw and EMA weights and a raw-weight grid; during
    validation, the live weights and a checkpoint written while they are swapped."""

    def __init__(self, last_step: int, raw_grid: SampleGrid, mid_val_ckpt: Path) -> None:
        self.last_step = last_step
        self.raw_grid = raw_grid
        self.mid_val_ckpt = mid_val_ckpt
        self.raw: STATE = {}
        self.ema: STATE = {}
        self.raw_grid_image: torch.Tensor | None = None
        self.val: STATE = {}
        self.sampler_during_train: Any = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.last_step:
            return
        ema = find_ema(trainer)
        assert ema is not None and ema.averaged_module is not None
        self.raw, self.ema = state(pl_module), state(ema.averaged_module)
        self.sampler_during_train = sampling_module(trainer, pl_module, use_ema=True)
        self.raw_grid_image, _ = self.raw_grid.generate_grid(trainer, pl_module)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if not self.val:
            self.val = state(pl_module)
            trainer.save_checkpoint(self.mid_val_ckpt)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> dict:
    """3 steps with EMA (decay 0.5), an EMA sample grid, validation and a checkpoint at step 3."""
    tmp = tmp_path_factory.mktemp("ema_run")
    grid_args = {"every_n_steps": 3, "classes": [2, 5], "cols": 3, "num_steps": 4, "seed": 7}
    probe = EMAProbe(3, SampleGrid(**grid_args, use_ema=False), tmp / "mid_val.ckpt")
    args = tiny_args(
        tmp / "run",
        demo_data,
        HIGH_LR,
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=1",
        "--checkpoint.every_n_train_steps=3",
        steps=3,
        callbacks=[ema_callback(), grid_callback(**grid_args)],
    )
    cli = fit_with(args, probe)
    return {"tmp": tmp, "args": args, "cli": cli, "probe": probe, "grid_args": grid_args}


def test_ema_weights_differ_from_raw_and_generate_the_grid(ema_run: dict) -> None:
    cli, probe = ema_run["cli"], ema_run["probe"]
    ema = find_ema(cli.trainer)
    assert isinstance(ema, EMA) and ema.num_updates == 3  # built from the YAML/JSON callback list
    changed = differing(probe.raw, probe.ema)
    assert len(changed) > len(probe.raw) // 2, "EMA and raw weights should differ after 3 steps at decay 0.5"
    # Validation ran with the EMA weights swapped in.
    assert_same(probe.val, probe.ema)
    # Everything that generates gets the EMA copy by default.
    assert probe.sampler_during_train is ema.averaged_module

    # The grid PNG is exactly what the EMA weights of the checkpoint generate for the fixed classes and seeds.
    args = ema_run["grid_args"]
    png = ema_run["tmp"] / "run" / "tensorboard" / "grids" / "step_00000003.png"
    ema_module = load_module(ema_run["tmp"] / "run" / "checkpoints" / "last.ckpt")
    assert_same(state(ema_module), probe.ema)
    labels = torch.tensor([c for c in args["classes"] for _ in range(args["cols"])])
    seeds = torch.arange(len(labels)) + args["seed"]
    images = ema_module.generate(labels, seeds, num_steps=args["num_steps"])
    expected = make_grid(to_uint8(images), cols=args["cols"])
    assert torch.equal(read_png(png), expected)
    # ... and not what the raw weights generate (the use_ema=False switch).
    assert probe.raw_grid_image is not None and not torch.equal(probe.raw_grid_image, expected)
    raw_module = load_module(ema_run["tmp"] / "run" / "checkpoints" / "last.ckpt", weights="raw")
    raw_images = raw_module.generate(labels, seeds, num_steps=args["num_steps"])
    assert torch.equal(probe.raw_grid_image, make_grid(to_uint8(raw_images), cols=args["cols"]))


def test_ema_checkpoints_hold_both_sets(ema_run: dict) -> None:
    probe = ema_run["probe"]
    for path in (ema_run["tmp"] / "run" / "checkpoints" / "last.ckpt", ema_run["tmp"] / "mid_val.ckpt"):
        # mid_val.ckpt is written during validation, with the EMA weights swapped into the live module.
        ckpt = load_ckpt(path)
        assert_same(ckpt["state_dict"], probe.ema)
        assert_same(ckpt["current_model_state"], probe.raw)
        assert int(ckpt["averaging_state"]["n_averaged"]) == 3
        assert ckpt["ema"] == {"decays": [0.5], "weights": {}}  # the one-decay shorthand: nothing else stored
    # DiPModule.load_from_checkpoint (what validate/predict with a checkpoint use) gets the EMA weights.
    from dip_lightning.training.module import DiPModule

    loaded = DiPModule.load_from_checkpoint(
        ema_run["tmp"] / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert_same(state(loaded), probe.ema)


class RestoreProbe(Callback):
    def __init__(self) -> None:
        self.live: STATE = {}
        self.ema: STATE = {}
        self.updates_at_start = -1
        self.updates_at_end = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = find_ema(trainer)
        assert ema is not None and ema.averaged_module is not None
        self.live, self.ema = state(pl_module), state(ema.averaged_module)
        self.updates_at_start = ema.num_updates

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        ema = find_ema(trainer)
        assert ema is not None
        self.updates_at_end = ema.num_updates


def test_resume_restores_raw_and_ema_weights(ema_run: dict, tmp_path: Path) -> None:
    probe = ema_run["probe"]
    restore = RestoreProbe()
    args = [
        a for a in ema_run["args"] if not a.startswith(("--trainer.default_root_dir", "--trainer.max_steps"))
    ]
    args += [f"--trainer.default_root_dir={tmp_path / 'resumed'}", "--trainer.max_steps=4"]
    fit_with(args, restore, ckpt_path=str(ema_run["tmp"] / "run" / "checkpoints" / "last.ckpt"))
    assert_same(restore.live, probe.raw)
    assert_same(restore.ema, probe.ema)
    assert restore.updates_at_start == 3 and restore.updates_at_end == 4


class GuardProbe(Callback):
    """Records the stale initial copy, the raw weights after the last step and the weights validation uses."""

    def __init__(self) -> None:
        self.initial_copy: STATE = {}
        self.raw: STATE = {}
        self.val: STATE = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        averaging = next(c for c in trainer.callbacks if isinstance(c, WeightAveraging))
        self.initial_copy = state(average_model(averaging).module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.raw = state(pl_module)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        self.val = state(pl_module)


@pytest.mark.parametrize(
    "callback", ["dip_lightning.training.callbacks.EMA", "lightning.pytorch.callbacks.EMAWeightAveraging"]
)
def test_validation_before_the_first_ema_update(tmp_path: Path, demo_data: dict, callback: str) -> None:
    probe = GuardProbe()
    averaging = {"class_path": callback, "init_args": {"decay": 0.5, "update_starting_at_step": 100}}
    args = tiny_args(
        tmp_path / "run",
        demo_data,
        HIGH_LR,
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        steps=2,
        callbacks=[averaging],
    )
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        fit_with(args, probe)
    guard_warned = any("EMA has not been updated yet" in str(w.message) for w in warned)
    ckpt = load_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert differing(probe.raw, probe.initial_copy), "the weights should have moved in 2 steps"
    if callback == "dip_lightning.training.callbacks.EMA":
        # Guarded: validation sees the trained (raw) weights and says so; the checkpoint's EMA slot is the raw
        # weights too, never the initial copy.
        assert guard_warned
        assert_same(probe.val, probe.raw)
        assert_same(ckpt["state_dict"], probe.raw)
        assert_same(ckpt["current_model_state"], probe.raw)
    else:
        # Lightning's stock callback (issue #21724): validation silently swaps in the initial weights, and the
        # checkpoint's state_dict (what predict/load_from_checkpoint use) is that stale copy.
        assert not guard_warned
        assert_same(probe.val, probe.initial_copy)
        assert_same(ckpt["state_dict"], probe.initial_copy)


def test_last_checkpoint_written_at_train_end_keeps_the_raw_weights(tmp_path: Path, demo_data: dict) -> None:
    probe = GuardProbe()
    # checkpoint.every_n_train_steps stays at the config's 150: ModelCheckpoint.on_train_end writes last.ckpt.
    fit_with(tiny_args(tmp_path / "run", demo_data, HIGH_LR, callbacks=[ema_callback()], steps=3), probe)
    ckpt = load_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert differing(ckpt["state_dict"], probe.raw)
    assert_same(ckpt["current_model_state"], probe.raw)


def test_ema_outside_fit_has_no_average() -> None:
    ema = EMA(decay=0.9)
    assert ema.num_updates == 0 and ema.averaged_module is None
    module = torch.nn.Linear(2, 2)
    assert sampling_module(None, module, use_ema=True) is module
