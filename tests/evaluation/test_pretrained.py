"""``export``: a trained run's weights as a pretrained folder with its card; loaded and sampled without pickle, the
outputs are those of the checkpoint."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dip_lightning.checkpoint.pretrained import CONFIG_FILE, GRID_FILE, WEIGHTS_FILE
from dip_lightning.commands import run_command
from dip_lightning.commands.evaluate import checkpoint_patch_size
from dip_lightning.training.loading import load_module
from dip_lightning.training.pretrained import load_pretrained
from tests.helpers.tiny import HIGH_LR, ema_callback, fit_with, grid_callback, tiny_args
from tests.helpers.weights import assert_same, differing

STEPS, BATCH = 2, 8


def _metrics_callback(data: dict) -> dict:
    # The pixel-projection features: real metrics of real samples in a fraction of a second.
    return {
        "class_path": "dip_lightning.training.callbacks.MetricsCallback",
        "init_args": {
            "every_n_steps": STEPS,
            "num_samples": 8,
            "batch_size": 8,
            "num_steps": 2,
            "real_shards": data["val_shards"],
            "metrics": ["fid", "patch_seam"],
            "extractor": {"class_path": "dip_lightning.core.metrics.features.PixelProjection"},
        },
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> Path:
    """A 2-step run with EMA (decay 0.5, high lr: EMA and raw weights differ), a grid and metrics at step 2."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    callbacks = [
        ema_callback(),
        grid_callback(every_n_steps=STEPS, rows=2, cols=2, num_steps=2),
        _metrics_callback(demo_data),
    ]
    args = tiny_args(run_dir, demo_data, HIGH_LR, steps=STEPS, batch_size=BATCH, callbacks=callbacks)
    fit_with(args)
    return run_dir


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("folders") / "ema"
    assert run_command(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    return out


def test_exported_folder_loads_without_pickle_to_the_checkpoints_weights_and_samples(
    run: Path, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = run / "checkpoints" / "last.ckpt"
    reference = load_module(ckpt)  # the default request: the EMA
    monkeypatch.setattr(torch, "load", pytest.fail)
    monkeypatch.setattr(pickle, "loads", pytest.fail)
    module = load_pretrained(exported)
    monkeypatch.undo()
    assert_same(module.net.state_dict(), reference.net.state_dict())
    assert module.loaded_weights == reference.loaded_weights == "ema 0.5"
    labels, seeds = torch.tensor([0, 3, 7]), torch.tensor([5, 6, 7])
    assert torch.equal(module.generate(labels, seeds), reference.generate(labels, seeds))
    raw = load_module(ckpt, weights="raw")
    assert differing(module.net.state_dict(), raw.net.state_dict())  # the EMA, not the raw weights


def test_config_and_card_say_what_was_trained(run: Path, exported: Path) -> None:
    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["format"] == "dip-lightning" and config["weights"] == "ema 0.5"
    assert (config["image_size"], config["num_classes"], config["patch_size"]) == (32, 8, 8)
    assert len(config["class_names"]) == 8
    assert config["training"]["step"] == STEPS and config["training"]["images_seen"] == STEPS * BATCH
    assert (
        config["training"]["source"] == "last.ckpt" and str(run) not in (exported / CONFIG_FILE).read_text()
    )
    assert set(config["model"]) == {"net", "flow", "sampler", "sample_dtype"}  # no optimizer, no REPA
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\n")
    assert "arXiv:2511.18822" in card and "@article" in card
    assert f"Trained for {STEPS} optimizer steps, {STEPS * BATCH} images seen" in card
    assert "| fid |" in card and "| patch_seam |" in card
    grids = sorted((run / "tensorboard" / "grids").glob("step_*.png"))
    assert (exported / GRID_FILE).read_bytes() == grids[-1].read_bytes()
    assert f"]({GRID_FILE})" in card


def test_other_weights_export_and_a_taken_folder_is_kept(run: Path, exported: Path, tmp_path: Path) -> None:
    ckpt = run / "checkpoints" / "last.ckpt"
    assert run_command(["export", str(ckpt), "--out", str(tmp_path / "raw"), "--weights", "raw"]) == 0
    raw = load_pretrained(tmp_path / "raw")
    assert raw.loaded_weights == "raw"
    assert_same(raw.net.state_dict(), load_module(ckpt, weights="raw").net.state_dict())
    before = (exported / WEIGHTS_FILE).read_bytes()
    assert run_command(["export", str(ckpt), "--out", str(exported), "--weights", "raw"]) == 2
    assert (exported / WEIGHTS_FILE).read_bytes() == before
    assert run_command(["export", str(ckpt), "--out", str(tmp_path / "x"), "--weights", "ema:0.9"]) == 2
    assert not (tmp_path / "x").exists()


def test_sample_and_evaluate_take_the_folder(run: Path, exported: Path, tmp_path: Path) -> None:
    """``sample`` of the folder writes the very file ``sample`` of the checkpoint writes."""
    common = ["--num_samples", "4", "--batch_size", "2", "--num_steps", "2", "--seed", "3"]
    from_folder, from_ckpt = tmp_path / "folder.npz", tmp_path / "ckpt.npz"
    assert run_command(["sample", "--ckpt_path", str(exported), "--out", str(from_folder), *common]) == 0
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert run_command(["sample", "--ckpt_path", ckpt, "--out", str(from_ckpt), *common]) == 0
    with np.load(from_folder) as a, np.load(from_ckpt) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert checkpoint_patch_size(exported) == 8
