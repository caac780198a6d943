"""Several EMA decays in one run (``EMA(decays: [...])``), in real ``fit`` runs through the CLI, and picking one
of them afterwards (``select_weights``, ``load_module``, ``load_from_checkpoint``, ``sample``, ``validate``,
``predict`` with ``--weights ema:D``).

Every average is compared, with exact tensor equality, to an EMA computed here from the raw weights the run had
after each optimizer step (``torch.lerp`` per tensor, the update torch's ``get_ema_multi_avg_fn`` does with
foreach kernels; the first update copies).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from dip_lightning.__main__ import main as dip_main
from dip_lightning.checkpoint.format import WeightRequest, select_weights
from dip_lightning.checkpoint.io import CheckpointError, read_checkpoint
from dip_lightning.core.images import to_uint8
from dip_lightning.training.callbacks import EMA
from dip_lightning.training.callbacks.ema import find_ema
from dip_lightning.training.cli import DiPCLI
from dip_lightning.training.loading import load_module
from dip_lightning.training.module import DiPModule
from tests.helpers.tiny import HIGH_LR, TINY_CONFIG, ema_callback, fit_with, tiny_args
from tests.helpers.weights import STATE, assert_same, differing, state

DECAYS = [0.5, 0.8]
STEPS = 4


def ema_by_hand(raw_after_each_step: list[STATE], decay: float) -> STATE:
    """The EMA of a sequence of weights: the first update copies, every later one is ``lerp(ema, w, 1 - decay)``."""
    average = state(raw_after_each_step[0])
    for weights in raw_after_each_step[1:]:
        for name, tensor in weights.items():
            average[name] = torch.lerp(average[name], tensor, 1 - decay)
    return average


class RecordSteps(Callback):
    """The raw weights after every optimizer step, every average after the last one, and a checkpoint written
    while validation has the first decay's weights swapped in."""

    def __init__(self, last_step: int, mid_val_ckpt: Path | None = None) -> None:
        self.last_step = last_step
        self.mid_val_ckpt = mid_val_ckpt
        self.raw: list[STATE] = []
        self.averages: dict[float, STATE] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.raw.append(state(pl_module))
        if trainer.global_step == self.last_step:
            ema = find_ema(trainer)
            assert ema is not None
            self.averages = {d: state(weights) for d, weights in ema.averages().items()}

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.mid_val_ckpt is not None and not self.mid_val_ckpt.exists():
            trainer.save_checkpoint(self.mid_val_ckpt)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> dict:
    """4 steps tracking decays 0.5 (first) and 0.8; validation and checkpoints at step 4."""
    tmp = tmp_path_factory.mktemp("ema_decays")
    probe = RecordSteps(STEPS, tmp / "mid_val.ckpt")
    args = tiny_args(
        tmp / "run",
        demo_data,
        HIGH_LR,
        f"--trainer.val_check_interval={STEPS}",
        "--trainer.limit_val_batches=1",
        f"--checkpoint.every_n_train_steps={STEPS}",
        "--model.sampler.init_args.num_steps=3",
        steps=STEPS,
        callbacks=[{"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decays": DECAYS}}],
    )
    fit_with(args, probe)
    assert len(probe.raw) == STEPS
    by_hand = {d: ema_by_hand(probe.raw, d) for d in DECAYS}
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    return {"tmp": tmp, "args": args, "probe": probe, "by_hand": by_hand, "ckpt": ckpt, "data": demo_data}


def test_each_decay_is_its_own_ema_of_the_raw_weights(run: dict) -> None:
    probe, by_hand = run["probe"], run["by_hand"]
    raw = probe.raw[-1]
    assert list(probe.averages) == DECAYS
    for decay in DECAYS:
        assert_same(probe.averages[decay], by_hand[decay])
        assert len(differing(by_hand[decay], raw)) > len(raw) // 2, f"decay {decay} should differ from raw"
    assert len(differing(by_hand[0.5], by_hand[0.8])) > len(raw) // 2
    # The textbook form decay * ema + (1 - decay) * w, up to rounding (lerp rounds differently).
    textbook = state(probe.raw[0])
    for weights in probe.raw[1:]:
        textbook = {k: 0.8 * textbook[k] + 0.2 * w for k, w in weights.items()}
    for name, tensor in textbook.items():
        torch.testing.assert_close(tensor, by_hand[0.8][name], rtol=1e-5, atol=1e-6)


def test_checkpoints_hold_every_decay(run: dict) -> None:
    raw, by_hand = run["probe"].raw[-1], run["by_hand"]
    # last.ckpt at a step boundary, and one written mid-validation (first decay swapped into the live module).
    for path in (run["ckpt"], run["tmp"] / "mid_val.ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["ema"]["decays"] == DECAYS and list(ckpt["ema"]["weights"]) == ["0.8"]
        assert_same(ckpt["state_dict"], by_hand[0.5])
        assert_same(ckpt["ema"]["weights"]["0.8"], by_hand[0.8])
        assert_same(ckpt["current_model_state"], raw)


def test_the_weights_of_a_decay_are_chosen_in_one_place(run: dict) -> None:
    path, by_hand, raw = run["ckpt"], run["by_hand"], run["probe"].raw[-1]
    checkpoint = read_checkpoint(path)
    assert_same(select_weights(checkpoint, path), by_hand[0.5])
    assert_same(select_weights(checkpoint, path, "ema"), by_hand[0.5])
    assert_same(select_weights(checkpoint, path, "ema:0.8"), by_hand[0.8])
    assert_same(select_weights(checkpoint, path, WeightRequest("ema", decay=0.5)), by_hand[0.5])
    assert_same(select_weights(checkpoint, path, "raw"), raw)
    with pytest.raises(CheckpointError) as error:
        select_weights(checkpoint, path, "ema:0.7")
    assert str(error.value) == (
        f"{path} has no EMA of decay 0.7; it holds EMA decay(s) 0.5, 0.8 and the raw weights: choose one of "
        "--weights ema:0.5, ema:0.8."
    )

    module = load_module(path, weights="ema:0.8")
    assert module.loaded_weights == "ema 0.8"
    assert_same(state(module), by_hand[0.8])
    assert load_module(path).loaded_weights == "ema 0.5"
    assert load_module(path, weights=WeightRequest("raw")).loaded_weights == "raw"

    # Lightning's own load_from_checkpoint: the default request (other weights: load_module).
    loaded = DiPModule.load_from_checkpoint(path, map_location="cpu")
    assert_same(state(loaded), by_hand[0.5]) and loaded.loaded_weights == "ema 0.5"


def test_sample_with_ema_exports_what_load_module_generates(
    run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["sample", "--ckpt_path", str(run["ckpt"]), "--num_samples", "4", "--batch_size", "4"]

    def sample(name: str, *flags: str) -> tuple[np.ndarray, dict]:
        out = tmp_path / f"{name}.npz"
        assert dip_main([*base, "--out", str(out), *flags]) == 0
        job = json.loads((out.with_name(out.name + ".parts") / "job.json").read_text())
        return np.load(out)["arr_0"], job

    images, job = sample("ema08", "--weights", "ema:0.8")
    expected = load_module(run["ckpt"], weights="ema:0.8").generate(torch.arange(4), torch.arange(4))
    assert np.array_equal(images, to_uint8(expected).permute(0, 2, 3, 1).numpy())
    assert job["weights"] == "ema 0.8"
    default_images, default_job = sample("default")
    assert default_job["weights"] == "ema 0.5" and not np.array_equal(images, default_images)

    # An export folder holds one set of weights: another decay into the same --out is refused.
    capsys.readouterr()
    assert dip_main([*base, "--out", str(tmp_path / "ema08.npz"), "--weights", "ema:0.5", "--overwrite"]) == 2
    assert "different weights, weights_sha256" in capsys.readouterr().err

    assert dip_main([*base, "--out", str(tmp_path / "untracked.npz"), "--weights", "ema:0.7"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "no EMA of decay 0.7" in error and "ema:0.5, ema:0.8" in error


def checkpoint_command(run: dict, tmp_path: Path, command: str, *extra: str) -> DiPCLI:
    """``validate``/``predict`` of the run's last.ckpt through the CLI, in-process."""
    args = tiny_args(
        tmp_path / command, run["data"], "--trainer.limit_val_batches=1", f"--ckpt_path={run['ckpt']}"
    )
    return DiPCLI(args=[command, *args, *extra])


def test_validate_with_ema_runs_that_decay(run: dict, tmp_path: Path) -> None:
    chosen = checkpoint_command(run, tmp_path, "validate", "--weights=ema:0.8")
    assert chosen.model.loaded_weights == "ema 0.8"
    assert_same(state(chosen.model), run["by_hand"][0.8])
    default = checkpoint_command(run, tmp_path, "validate")
    assert default.model.loaded_weights == "ema 0.5"
    assert_same(state(default.model), run["by_hand"][0.5])
    loss = chosen.trainer.callback_metrics["val/loss"]
    assert not torch.equal(loss, default.trainer.callback_metrics["val/loss"])
    with pytest.raises(CheckpointError, match=r"no EMA of decay 0\.3.*ema:0\.5, ema:0\.8"):
        checkpoint_command(run, tmp_path, "validate", "--weights=ema:0.3")


def test_predict_with_ema_generates_with_that_decay(run: dict, tmp_path: Path) -> None:
    cli = DiPCLI(
        args=[
            "predict",
            "--config",
            TINY_CONFIG,
            f"--ckpt_path={run['ckpt']}",
            "--weights=ema:0.8",
            "--data",
            "dip_lightning.core.data.LabelSeedDataModule",
            "--data.num_samples=4",
            "--data.batch_size=4",
            f"--trainer.default_root_dir={tmp_path / 'predict'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    (batch,) = cli.trainer.predict_loop.predictions
    expected = load_module(run["ckpt"], weights="ema:0.8").generate(batch["labels"], batch["seeds"])
    assert torch.equal(batch["images"], to_uint8(expected))


def test_fit_refuses_weight_selection(run: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fit resumes every EMA"):
        fit_args = tiny_args(tmp_path / "run", run["data"], "--weights=ema:0.8")
        DiPCLI(args=["fit", *fit_args])


class AtTrainStart(Callback):
    def __init__(self) -> None:
        self.averages: dict[float, STATE] = {}
        self.updates = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = find_ema(trainer)
        assert ema is not None
        self.averages = {d: state(w) for d, w in ema.averages().items()}
        self.updates = ema.num_updates


def test_resume_maps_decays_by_value(run: dict, tmp_path: Path) -> None:
    """Resumed with decays [0.8, 0.3]: the first average is the checkpoint's 0.8 (not its state_dict, which is
    0.5), and the new 0.3 starts from the state_dict, with a warning."""
    probe = AtTrainStart()
    args = [a for a in run["args"] if not a.startswith(("--trainer.default_root_dir", "--trainer.callbacks"))]
    callbacks = [{"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decays": [0.8, 0.3]}}]
    args += [
        f"--trainer.default_root_dir={tmp_path / 'resumed'}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
    ]
    args += [f"--trainer.max_steps={STEPS + 1}"]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        fit_with(args, probe, ckpt_path=str(run["ckpt"]))
    assert probe.updates == STEPS
    assert_same(probe.averages[0.8], run["by_hand"][0.8])
    assert_same(probe.averages[0.3], run["by_hand"][0.5])
    assert any("no EMA of decay(s) [0.3]" in str(w.message) for w in warned)


def test_before_the_first_update_every_slot_holds_the_raw_weights(tmp_path: Path, demo_data: dict) -> None:
    probe = RecordSteps(2)
    averaging = ema_callback(decay=None, decays=DECAYS, update_starting_at_step=100)
    fit_with(tiny_args(tmp_path / "run", demo_data, HIGH_LR, steps=2, callbacks=[averaging]), probe)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert_same(ckpt["state_dict"], probe.raw[-1])
    assert_same(ckpt["ema"]["weights"]["0.8"], probe.raw[-1])


def test_train_end_checkpoint_keeps_every_average_and_the_raw_weights(
    tmp_path: Path, demo_data: dict
) -> None:
    # checkpoint.every_n_train_steps stays at the config's 150: ModelCheckpoint.on_train_end writes last.ckpt,
    # after EMA.on_train_end has copied the first average into the live module.
    probe = RecordSteps(3)
    averaging = ema_callback(decay=None, decays=DECAYS)
    fit_with(tiny_args(tmp_path / "run", demo_data, HIGH_LR, steps=3, callbacks=[averaging]), probe)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert_same(ckpt["current_model_state"], probe.raw[-1])
    assert_same(ckpt["state_dict"], ema_by_hand(probe.raw, 0.5))
    assert_same(ckpt["ema"]["weights"]["0.8"], ema_by_hand(probe.raw, 0.8))


def test_decay_is_the_one_decay_shorthand() -> None:
    assert EMA(decay=0.9).decays == (0.9,) and EMA(decay=0.9).decay == 0.9
    assert EMA().decays == (0.9999,)
    assert EMA(decays=[0.9999, 0.9996]).decay == 0.9999
    for bad, match in (
        ({"decay": 0.9, "decays": [0.9]}, "not both"),
        ({"decays": []}, "at least one"),
        ({"decays": [0.9, 0.9]}, "must differ"),
        ({"decays": [1.5]}, r"\[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=match):
            EMA(**bad)
