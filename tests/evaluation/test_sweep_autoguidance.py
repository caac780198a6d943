"""``sweep --guide none <ckpt>``: the guide as a sweep axis, next to classifier-free guidance; each guided cell's
samples are those ``sample --guide`` exports; a guide that does not fit is refused before the first cell."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dip_lightning.commands import run_command
from dip_lightning.evaluation.export import _save_npz
from dip_lightning.evaluation.sweep import grid_cells


@pytest.fixture
def reference(demo_data: dict, tmp_path: Path) -> Path:
    from dip_lightning.core.metrics.sources import iter_shard_images

    images = next(iter(iter_shard_images(demo_data["val_shards"], 8, 32, limit=8)))
    path = tmp_path / "reference.npz"
    _save_npz(path, arr_0=images.permute(0, 2, 3, 1).numpy())
    return path


def sweep(ckpt: Path, reference: Path, out: Path, *guides: str) -> list[str]:
    return [
        "sweep", "--ckpt_path", str(ckpt), "--reference", str(reference), "--num_samples", "4",
        "--cfg_scale", "1.0", "2.0", "--num_steps", "2", "--batch_size", "4", "--metrics", "patch_seam",
        "--no_plots", "--keep_samples", "--out", str(out), "--guide", *guides,
    ]  # fmt: skip


def test_guide_names_and_order() -> None:
    cells = grid_cells(cfg_scale=[1.0, 2.0], guide=["none", "runs/a/last.ckpt"])
    assert [(c.guide, c.cfg_scale) for c in cells] == [
        (None, 1.0), (None, 2.0), ("runs/a/last.ckpt", 1.0), ("runs/a/last.ckpt", 2.0)
    ]  # fmt: skip
    assert cells[0].name == "ema_cfg1.0_intervaldefault_stepsdefault"  # a CFG cell keeps its old name
    assert cells[2].name.startswith("ema_cfg1.0_intervaldefault_stepsdefault_guide-last-")


def test_sweep_over_cfg_and_a_guide(guide_checkpoints: dict, reference: Path, tmp_path: Path) -> None:
    ckpt, guide = guide_checkpoints["main"], str(guide_checkpoints["guide"])
    out = tmp_path / "sweep"
    assert run_command(sweep(ckpt, reference, out, "none", guide)) == 0
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["guide"], r["cfg_scale"]) for r in rows] == [
        ("none", "1.0"), ("none", "2.0"), (guide, "1.0"), (guide, "2.0")
    ]  # fmt: skip
    assert all(r["patch_seam"] for r in rows)
    cells = {c.name: c for c in grid_cells(cfg_scale=[1.0, 2.0], num_steps=[2], guide=["none", guide])}
    samples = {(c.guide, c.cfg_scale): out / "cells" / name / "samples.npz" for name, c in cells.items()}

    def images(path: Path) -> np.ndarray:
        with np.load(path) as npz:
            return npz["arr_0"]

    exported = tmp_path / "sample.npz"
    argv = [
        "sample",
        "--ckpt_path",
        str(ckpt),
        "--out",
        str(exported),
        "--num_samples",
        "4",
        "--num_steps",
        "2",
    ]
    assert run_command([*argv, "--guide", guide, "--cfg_scale", "2.0"]) == 0
    assert np.array_equal(images(samples[(guide, 2.0)]), images(exported))
    assert not np.array_equal(images(samples[(guide, 2.0)]), images(samples[(None, 2.0)]))
    assert np.array_equal(images(samples[(guide, 1.0)]), images(samples[(None, 1.0)]))  # w = 1: no guide
    assert run_command(sweep(ckpt, reference, out, "none", guide)) == 0  # a rerun keeps every finished cell


def test_sweep_refuses_a_guide_that_does_not_fit_before_sampling(
    guide_checkpoints: dict, reference: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    assert (
        run_command(sweep(guide_checkpoints["main"], reference, out, "none", str(guide_checkpoints["other"])))
        == 2
    )
    assert "patch size 16 (the model's: 8)" in capfd.readouterr().err
    assert not (out / "cells").exists()
