"""`python -m dip_lightning sweep`: a real checkpoint with two EMA decays, swept over 2 EMAs x 2 guidance scales
with the real metrics engine; each cell's samples are those `sample --weights ... --cfg_scale ...` exports, its
metrics those `compute_metrics` gives them; a rerun keeps finished cells, other weights are refused."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dip_lightning.checkpoint.format import WeightRequest
from dip_lightning.commands import run_command
from dip_lightning.core.metrics import compute_metrics
from dip_lightning.evaluation.export import _save_npz
from dip_lightning.evaluation.sweep import grid_cells
from tests.helpers.tiny import HIGH_LR, REPO, fit_with, subprocess_env, tiny_args

NUM_SAMPLES = 6
METRICS = ["fid", "precision", "recall", "patch_seam"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    run_dir = root / "run"
    ema = {"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decays": [0.9, 0.5]}}
    fit_with(
        tiny_args(run_dir, demo_data, HIGH_LR, "--checkpoint.every_n_train_steps=2", steps=4, callbacks=[ema])
    )
    from dip_lightning.core.metrics.sources import iter_shard_images

    images = [
        b.permute(0, 2, 3, 1).numpy() for b in iter_shard_images(demo_data["val_shards"], 16, 32, limit=16)
    ]
    reference = root / "reference.npz"
    _save_npz(reference, arr_0=np.concatenate(images))
    return {"ckpt": run_dir / "checkpoints" / "last.ckpt", "reference": reference, "root": root}


@pytest.fixture(autouse=True)
def metrics_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # One reference feature cache for the module's sweeps (features are cached by the file's content hash).
    monkeypatch.setenv("DIP_METRICS_CACHE", str(tmp_path_factory.getbasetemp() / "metrics_cache"))


def sweep_args(
    setup: dict,
    out: Path,
    *extra: str,
    weights: tuple[str, ...] = ("ema:0.9", "ema:0.5"),
    cfg: tuple[str, ...] = ("1.0", "2.0"),
) -> list[str]:
    return [
        "sweep", "--ckpt_path", str(setup["ckpt"]), "--reference", str(setup["reference"]),
        "--num_samples", str(NUM_SAMPLES), "--weights", *weights, "--cfg_scale", *cfg, "--num_steps", "2",
        "--chunk_size", "4", "--batch_size", "4", "--metrics", *METRICS, "--out", str(out), *extra,
    ]  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_order_and_names() -> None:
    ema, raw, phema = (WeightRequest.parse(w) for w in ("ema:0.9", "raw", "phema:0.05"))
    cells = grid_cells([ema, raw, phema], [1.0, 2.0], [(0.1, 1.0)], [25])
    assert [(c.weights, c.cfg_scale) for c in cells] == [
        (ema, 1.0), (ema, 2.0), (raw, 1.0), (raw, 2.0), (phema, 1.0), (phema, 2.0)
    ]  # fmt: skip
    assert cells[0].name == "ema0.9_cfg1.0_interval0.1-1.0_steps25"
    assert cells[-1].name == "phema0.05_cfg2.0_interval0.1-1.0_steps25"
    assert grid_cells()[0].name == "ema_cfgdefault_intervaldefault_stepsdefault"


@pytest.mark.slow
def test_sweep_two_emas_by_two_guidance_scales(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    # First a part of the grid, as a killed sweep leaves it; then the whole grid continues it.
    assert run_command(sweep_args(setup, out, "--keep_samples", weights=("ema:0.9",))) == 0
    first = {p.parent.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/result.json")}
    assert len(first) == 2
    # The whole grid from a YAML file (--config, the layout --print_config writes): the same sweep as the flags.
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "ckpt_path": str(setup["ckpt"]),
                "reference": str(setup["reference"]),
                "num_samples": NUM_SAMPLES,
                "out": str(out),
                "weights": ["ema:0.9", "ema:0.5"],
                "cfg_scale": [1.0, 2.0],
                "num_steps": [2],
                "chunk_size": 4,
                "batch_size": 4,
                "metrics": METRICS,
                "keep_samples": True,
            }
        )
    )
    assert run_command(["sweep", "--config", str(grid)]) == 0
    kept = {p.parent.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/result.json")}
    assert len(kept) == 4 and all(kept[name] == mtime for name, mtime in first.items())  # not redone

    rows = read_csv(out / "sweep.csv")
    assert list(rows[0]) == [
        "weights",
        "guide",
        "cfg_scale",
        "cfg_interval",
        "num_steps",
        *METRICS,
        "num_samples",
    ]
    assert {r["guide"] for r in rows} == {"none"}  # classifier-free guidance: no guide network
    assert [(r["weights"], r["cfg_scale"]) for r in rows] == [
        ("ema 0.9", "1.0"),
        ("ema 0.9", "2.0"),
        ("ema 0.5", "1.0"),
        ("ema 0.5", "2.0"),
    ]
    assert {r["num_steps"] for r in rows} == {"2"} and {r["cfg_interval"] for r in rows} == {
        "0.0-1.0"
    }  # the default

    # A cell's samples are what `sample` exports with the same weights and settings, its metrics the engine's.
    cell = out / "cells" / "ema0.5_cfg2.0_intervaldefault_steps2"
    exported = tmp_path / "sample.npz"
    sample = [
        "sample",
        "--ckpt_path",
        str(setup["ckpt"]),
        "--out",
        str(exported),
        "--num_samples",
        str(NUM_SAMPLES),
    ]
    assert (
        run_command(
            [*sample, "--weights", "ema:0.5", "--cfg_scale", "2.0", "--num_steps", "2", "--batch_size", "4"]
        )
        == 0
    )
    with np.load(exported) as a, np.load(cell / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        expected = compute_metrics(b["arr_0"], setup["reference"], metrics=METRICS, patch_size=8)
    for metric in METRICS:
        assert float(rows[3][metric]) == pytest.approx(expected[metric], rel=1e-6), metric
    with np.load(out / "cells" / "ema0.9_cfg2.0_intervaldefault_steps2" / "samples.npz") as other:
        assert not np.array_equal(other["arr_0"], np.load(exported)["arr_0"])  # the other decay's weights

    md = (out / "sweep.md").read_text()
    assert "| weights | guide | cfg_scale | cfg_interval | num_steps | fid |" in md and "best fid:" in md
    png = out / "sweep_fid.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](sweep_fid.png)" in md


@pytest.mark.slow
def test_other_weights_at_the_same_path_are_refused(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sweep"
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(setup["ckpt"], ckpt)
    args = sweep_args({**setup, "ckpt": ckpt}, out, "--no_plots", weights=("ema:0.9",), cfg=("1.0",))
    assert run_command(args) == 0
    before = (out / "sweep.csv").read_bytes()
    step2 = setup["ckpt"].parent / "step00000002.ckpt"
    shutil.copy(step2, ckpt)  # the checkpoint was overwritten (training went on)
    assert run_command(args) == 2
    err = capsys.readouterr().err
    assert "cell.json" in err and "weights_sha256" in err
    assert (out / "sweep.csv").read_bytes() == before  # nothing changed


def test_untracked_decay_and_missing_reference_are_clear_errors(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_command(sweep_args(setup, tmp_path / "a", weights=("ema:0.9", "ema:0.7"))) == 2
    err = capsys.readouterr().err
    assert "no EMA of decay 0.7" in err and "ema:0.9, ema:0.5" in err  # names the tracked decays
    assert not list((tmp_path / "a").glob("cells/*"))  # refused before the first cell, not after it
    assert run_command(sweep_args(setup, tmp_path / "c", weights=("ema", "ema:0.9"))) == 2
    assert "--weights ema and ema:0.9 are the same weights" in capsys.readouterr().err
    assert not (tmp_path / "c" / "cells").exists()
    missing = {**setup, "reference": tmp_path / "nope.npz"}
    assert run_command(sweep_args(missing, tmp_path / "b")) == 2
    assert "nope.npz: no such file" in capsys.readouterr().err
    mu = np.zeros(2048)
    mu[0] = np.nan
    np.savez(tmp_path / "nan.npz", mu=mu, sigma=np.eye(2048))
    damaged = {**setup, "reference": tmp_path / "nan.npz"}
    assert run_command(sweep_args(damaged, tmp_path / "d")) == 2
    assert "nan.npz: mu holds NaN" in capsys.readouterr().err
    assert not (tmp_path / "d" / "cells").exists()  # refused before the first cell's sampling
    # Seeds closer than the sample count would share their noise: refused before anything is written.
    assert run_command(sweep_args(setup, tmp_path / "e", "--seeds", "0", "1")) == 2
    assert "--seeds 0 and 1 are less than --num_samples 6 apart" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_a_metric_a_cell_cannot_give_is_null_with_its_reason(setup: dict, tmp_path: Path) -> None:
    """3 samples: precision and recall need more than k = 3; result.json says so (valid JSON), the CSV is empty
    there."""
    out = tmp_path / "few"
    args = sweep_args(setup, out, "--no_plots", weights=("ema:0.9",), cfg=("1.0",))
    args[args.index("--num_samples") + 1] = "3"
    assert run_command(args) == 0
    (result_path,) = (out / "cells").glob("*/result.json")
    result = json.loads(result_path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in result.json"))
    for metric in ("precision", "recall"):
        assert result["metrics"][metric] is None and "more than 3 samples" in result["unavailable"][metric]
    assert result["metrics"]["fid"] is not None and "fid" not in result["unavailable"]
    row = read_csv(out / "sweep.csv")[0]
    assert row["precision"] == row["recall"] == "" and float(row["fid"]) == result["metrics"]["fid"]


@pytest.mark.slow
def test_two_processes_spread_the_samples(setup: dict, tmp_path: Path) -> None:
    """torchrun-style launch (RANK / WORLD_SIZE): each process makes its chunks, rank 0 scores; same results as
    one process."""
    single, double = tmp_path / "single", tmp_path / "double"
    # One thread, as each process below: the exact comparison must not depend on which test modules were imported
    # before (several set one thread at import; run alone, this one had two and FID differed in the 8th digit).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_command(sweep_args(setup, single, "--no_plots", weights=("ema:0.5",), cfg=("2.0",))) == 0
    finally:
        torch.set_num_threads(threads)
    cmd = [
        sys.executable,
        "-m",
        "dip_lightning",
        *sweep_args(setup, double, "--no_plots", weights=("ema:0.5",), cfg=("2.0",)),
    ]
    procs = []
    for rank in (0, 1):
        env = {**subprocess_env(1), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        env["DIP_METRICS_CACHE"] = os.environ["DIP_METRICS_CACHE"]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "rank 1" in outputs[1] and "(rank 1)" in outputs[1]  # rank 1 generated chunks of its own
    assert read_csv(double / "sweep.csv") == read_csv(single / "sweep.csv")
    assert json.loads((double / "sweep.json").read_text())["num_samples"] == NUM_SAMPLES


@pytest.mark.slow
def test_sweep_over_three_seeds_reports_mean_std_and_range(setup: dict, tmp_path: Path) -> None:
    """``--seeds 0 6 12``: each seed scored in its own folder as a one-seed sweep scores it; the cell's metric is
    the mean, with its standard deviation and range in result.json, sweep.csv and sweep.md; a rerun redoes
    nothing."""
    out = tmp_path / "seeds"
    one_cell = {"weights": ("ema:0.5",), "cfg": ("2.0",)}
    args = sweep_args(setup, out, "--seeds", "0", "6", "12", **one_cell)
    assert run_command(args) == 0
    cell = out / "cells" / "ema0.5_cfg2.0_intervaldefault_steps2"
    result = json.loads((cell / "result.json").read_text())
    per_seed = [json.loads((cell / f"seed{s}" / "result.json").read_text())["metrics"] for s in (0, 6, 12)]
    assert result["seeds"] == [0, 6, 12] and result["per_seed"]["6"] == per_seed[1]
    fids = [m["fid"] for m in per_seed]
    assert len(set(fids)) == 3  # other noise, other images
    assert result["metrics"]["fid"] == pytest.approx(np.mean(fids))
    assert result["spread"]["fid"]["std"] == pytest.approx(np.std(fids, ddof=1))
    assert json.loads((out / "sweep.json").read_text())["seed"] == [0, 6, 12]

    # Seed 12's numbers are those of a one-seed sweep with --seed 12.
    alone = tmp_path / "alone"
    assert run_command(sweep_args(setup, alone, "--seed", "12", "--no_plots", **one_cell)) == 0
    (alone_result,) = (alone / "cells").glob("*/result.json")
    assert json.loads(alone_result.read_text())["metrics"] == pytest.approx(per_seed[2])
    assert "seeds" not in read_csv(alone / "sweep.csv")[0]  # one seed: the one-seed columns

    (row,) = read_csv(out / "sweep.csv")
    assert list(row)[5:9] == ["fid", "fid_std", "fid_min", "fid_max"] and row["seeds"] == "0 6 12"
    assert float(row["fid_min"]) == min(fids) and float(row["fid_max"]) == max(fids)
    assert float(row["fid"]) == result["metrics"]["fid"]
    md = (out / "sweep.md").read_text()
    assert " ± " in md and "Over seeds 0 6 12" in md and (out / "sweep_fid.png").is_file()

    mtimes = {p: p.stat().st_mtime_ns for p in cell.rglob("result.json")}
    assert run_command(args) == 0
    assert {p: p.stat().st_mtime_ns for p in cell.rglob("result.json")} == mtimes
