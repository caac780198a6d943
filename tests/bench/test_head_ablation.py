"""The toy head ablation (bench/head_ablation.py): its verdicts and curve crossings from known numbers, and a real
two-head study of a few steps that a rerun continues without redoing anything."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
try:
    import head_ablation
    import head_ablation_report as rep
finally:
    sys.path.remove(str(REPO / "bench"))


def _finals(fids: dict[str, list[float]]) -> rep.Nested:
    return {name: {seed: {"fid": v} for seed, v in enumerate(values)} for name, values in fids.items()}


def test_pair_verdicts_follow_the_means_and_call_overlapping_seeds_unresolved() -> None:
    finals = _finals(
        {"conv_unet": [10.0, 11.0, 12.0], "dit_only": [20.0, 21.0, 19.0], "mlp": [11.5, 30.0, 9.0]}
    )
    lines = rep.ordering_lines(finals)
    assert lines[0].startswith(
        "- conv_unet < dit_only: holds (11.00 vs 20.00; seed ranges apart; 3 vs 3 seeds)"
    )
    (mlp_vs_conv,) = [line for line in lines if line.startswith("- conv_unet < mlp")]
    assert "holds" in mlp_vs_conv and "seed ranges overlap" in mlp_vs_conv  # 11 < 16.8, but 9 < 10
    (dit_vs_mlp,) = [line for line in lines if line.startswith("- dit_only < mlp")]
    assert "does NOT hold" in dit_vs_mlp  # 20 > 16.83
    assert not [line for line in lines if "coord_mlp" in line]  # a head with no finished seed is left out


def test_patch_seam_is_judged_by_its_distance_from_one() -> None:
    finals = {"conv_unet": {0: {"patch_seam": 1.1}}, "dit_only": {0: {"patch_seam": 0.7}}}
    assert rep.ranking_line(finals, "patch_seam") == "conv_unet 1.100 < dit_only 0.7000"
    verdict = rep.pair_verdict(finals, "conv_unet", "dit_only", "patch_seam")
    assert verdict.startswith("conv_unet < dit_only: holds") and "a single seed" in verdict


def test_crossings_name_the_interval_where_the_mean_curves_swap() -> None:
    curves = {
        "conv_unet": {0: {100: {"fid": 50.0}, 200: {"fid": 40.0}, 300: {"fid": 30.0}}},
        "dit_only": {
            0: {100: {"fid": 45.0}, 200: {"fid": 42.0}, 300: {"fid": 35.0}},
            1: {100: {"fid": 47.0}},
        },
    }
    means = rep.curve_means(curves, "fid")
    assert means["dit_only"][100]["mean"] == 46.0 and means["dit_only"][100]["n"] == 2
    assert rep.crossings(means, "conv_unet", "dit_only", "fid") == [
        "between step 100 and 200 (dit_only ahead before, conv_unet after)"
    ]
    # precision: higher is better, so the same numbers read the other way round
    prec = {
        n: {s: {k: {"precision": v["fid"]} for k, v in p.items()} for s, p in c.items()}
        for n, c in curves.items()
    }
    pmeans = rep.curve_means(prec, "precision")
    assert rep.crossings(pmeans, "conv_unet", "dit_only", "precision") == [
        "between step 100 and 200 (conv_unet ahead before, dit_only after)"
    ]


def test_metric_rows_round_trip_and_a_later_row_of_a_step_wins(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    rep.append_row(path, {"step": 4, "fid": 3.5, "precision": None, "num_samples": 8})
    rep.append_row(path, {"step": 2, "fid": 9.0, "num_samples": 8})
    rep.append_row(path, {"step": 4, "fid": 3.0, "num_samples": 16})
    rows = rep.read_rows(path)
    assert rows == {4: {"fid": 3.0, "num_samples": 16.0}, 2: {"fid": 9.0, "num_samples": 8.0}}
    assert path.read_text().splitlines()[0] == ",".join(rep.CSV_COLUMNS)


def test_class_grid_puts_one_class_per_column() -> None:
    images = np.zeros((24, 2, 2, 3), np.uint8)
    for i in range(24):
        images[i] = i  # sample i has label i % 3
    grid = rep.class_grid(images, num_classes=3, rows=4)
    assert grid.shape == (8, 6, 3)
    assert [[int(grid[2 * r, 2 * c, 0]) for c in range(3)] for r in range(4)] == [
        [3 * r + c for c in range(3)] for r in range(4)
    ]


def test_run_order_puts_dip_and_dit_only_first_for_every_seed(tmp_path: Path) -> None:
    args = head_ablation.parse_args(["--work", str(tmp_path), "--seeds", "0", "1", "--steps", "8"])
    order = head_ablation.run_order(args)
    assert order[:4] == [("conv_unet", 0), ("dit_only", 0), ("conv_unet", 1), ("dit_only", 1)]
    assert len(order) == 10 and order[4] == ("coord_mlp", 0)
    assert head_ablation.eval_steps(args) == [2, 4, 6, 8]


@pytest.mark.slow
def test_study_runs_end_to_end_and_a_rerun_redoes_nothing(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Two heads, one seed, 2 steps of the tests' 32 px config; the cheap PixelProjection features stand in for the
    CPU Inception (minutes)."""
    from dip_lightning.core.metrics.features import PixelProjection

    monkeypatch.setattr(head_ablation, "_extractor", lambda: PixelProjection())
    work = tmp_path / "work"
    argv = [
        "--work",
        str(work),
        "--config",
        str(REPO / "experiments" / "tiny_cpu.yaml"),
        "--smoke",
        "--steps",
        "2",
        "--eval_every",
        "1",
        "--seeds",
        "0",
    ]
    argv += ["--variants", "conv_unet", "dit_only", "--num_samples", "16", "--curve_samples", "8"]
    assert head_ablation.main(argv) == 0
    runs = {name: work / "runs" / f"{name}_seed0" for name in ("conv_unet", "dit_only")}
    curve = {n: rep.read_rows(r / "tensorboard" / "eval_metrics.csv") for n, r in runs.items()}
    final = {n: rep.read_rows(r / "tensorboard" / head_ablation.FINAL_CSV) for n, r in runs.items()}
    assert all(set(c) == {1, 2} and c[1]["num_samples"] == 8 for c in curve.values())
    assert all(set(f) == {2} and f[2]["num_samples"] == 16 and f[2]["fid"] > 0 for f in final.values())
    # Class agreement: a fraction of the samples, a multiple of 1/16 for 16 of them.
    assert all(0 <= 16 * f[2]["class_agreement"] <= 16 for f in final.values())
    assert all(float(16 * f[2]["class_agreement"]).is_integer() for f in final.values())
    text = (work / "results" / "head_ablation.md").read_text()
    assert "| conv_unet | + Conv U-Net (DiP) | 2.16 | 0 |" in text and "- conv_unet < dit_only: " in text
    assert "Class agreement (samples whose nearest validation crop is of their class)" in text
    assert "sampler EulerSampler (num_steps 25, cfg_scale 1.0" in text  # the recipe's, as the runs sample
    assert f"OMP_NUM_THREADS={head_ablation.run_threads()} per training run" in text  # what the runs got
    assert (work / "results" / "head_ablation_curves.png").is_file()
    assert (work / "results" / "head_ablation_grids.png").is_file()

    # A rerun trains and scores nothing again; a reading written below the mark survives it.
    ckpt = runs["conv_unet"] / "checkpoints" / "step00000002.ckpt"
    before = ckpt.stat().st_mtime_ns
    csvs = {p: p.read_text() for r in runs.values() for p in (r / "tensorboard").glob("*metrics.csv")}
    (work / "results" / "head_ablation.md").write_text(text + "\n<!-- reading -->\nhand-written\n")
    assert head_ablation.main(argv) == 0
    assert ckpt.stat().st_mtime_ns == before
    assert {p: p.read_text() for p in csvs} == csvs
    assert (work / "results" / "head_ablation.md").read_text().endswith("<!-- reading -->\nhand-written\n")
