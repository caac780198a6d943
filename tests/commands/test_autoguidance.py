"""``sample --guide``: autoguidance end to end from real checkpoints; a guide that does not fit is refused
before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dip_lightning.commands import run_command
from dip_lightning.core.images import to_uint8
from dip_lightning.core.seeding import sample_labels_and_seeds
from dip_lightning.training.autoguidance import load_guide
from dip_lightning.training.loading import load_module

SAMPLE = ["--num_samples", "4", "--batch_size", "4", "--num_steps", "3"]


def sample(ckpt: Path, out: Path, *extra: str) -> np.ndarray:
    assert run_command(["sample", "--ckpt_path", str(ckpt), "--out", str(out), *SAMPLE, *extra]) == 0
    with np.load(out) as npz:
        return npz["arr_0"]


def test_sample_with_a_guide(guide_checkpoints: dict, tmp_path: Path) -> None:
    ckpt, guide = guide_checkpoints["main"], str(guide_checkpoints["guide"])
    guided = sample(ckpt, tmp_path / "guided.npz", "--guide", guide, "--cfg_scale", "2.0")
    # The images generate gives with that guide (EMA weights of both), labels i mod C and seeds i.
    main = load_module(ckpt)
    labels, seeds = sample_labels_and_seeds(np.arange(4), main.num_classes, 0)
    expected = main.generate(
        torch.from_numpy(labels),
        torch.from_numpy(seeds),
        guide=load_guide(guide, main),
        num_steps=3,
        cfg_scale=2.0,
    )
    assert np.array_equal(guided, to_uint8(expected).permute(0, 2, 3, 1).numpy())
    cfg = sample(ckpt, tmp_path / "cfg.npz", "--cfg_scale", "2.0")
    assert not np.array_equal(guided, cfg)  # the guide, not the unconditional branch
    # w = 1: the guide is never used, the model alone.
    assert np.array_equal(
        sample(ckpt, tmp_path / "w1.npz", "--guide", guide, "--cfg_scale", "1.0"),
        sample(ckpt, tmp_path / "plain.npz", "--cfg_scale", "1.0"),
    )


def test_sample_refuses_a_guide_that_does_not_fit(
    guide_checkpoints: dict, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.npz"
    argv = ["sample", "--ckpt_path", str(guide_checkpoints["main"]), "--out", str(out), *SAMPLE]
    assert run_command([*argv, "--guide", str(guide_checkpoints["other"]), "--cfg_scale", "2.0"]) == 2
    err = capfd.readouterr().err
    assert "patch size 16 (the model's: 8)" in err and str(guide_checkpoints["other"]) in err
    assert run_command([*argv, "--guide_weights", "raw"]) == 2
    assert "--guide_weights chooses the weights of --guide" in capfd.readouterr().err
    assert not out.exists() and not out.with_name("s.npz.parts").exists()  # nothing was written
