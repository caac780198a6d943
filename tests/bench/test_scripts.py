"""The GPU benchmark script runs end to end (tiny models, CPU, eager compile backend), so it cannot rot between
the rare sessions that have a GPU to run it on. It measures nothing here: speed is never asserted in tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # smoke runs of the benchmark scripts


def test_gpu_benchmark_smoke_run_fills_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    sections = "peak,head,syncs,sdpa,train_eager,train_compiled,sample_compiled,latency_graphs"
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--sections", sections]
    cmd += ["--models", "DiT-XL/16,DiP-XL/16+dense2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] and res["device"] == "cpu"
    assert not [k for k, v in res["head"].items() if isinstance(v, str)], res["head"]
    assert {"nchw_dense0_eager", "nhwc_dense2_eager", "nhwc_dense2_compiled"} <= res["head"].keys()
    assert res["syncs"]["steps_watched"] == 20  # a real Lightning fit ran (syncs are counted on CUDA only)
    assert isinstance(res["sdpa"]["math"], dict)  # the math backend always runs
    for section in sections.split(",")[4:]:
        for model in ("DiT-XL/16", "DiP-XL/16+dense2"):
            assert isinstance(res[section][model], dict), (section, model, res[section][model])
    assert res["train_eager"]["DiP-XL/16+dense2"]["mfu"] > 0
    assert "train_compiled DiP-XL/16+dense2" in res["head_overhead"]


def test_memory_benchmark_smoke_run_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "memory.md"
    cmd = [sys.executable, str(REPO / "bench" / "memory.py"), "--smoke", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert table.count("| DiP-S/16 @ 64 |") == 6 and table.count("| DiP-S/32 @ 64 |") == 6


def test_objectives_benchmark_smoke_run(tmp_path: Path, demo_data: dict, monkeypatch) -> None:  # noqa: ANN001
    """bench/objectives.py --smoke end to end: two real 4-step trainings (v and x), both grids, every sampler part.

    The CPU Inception would take minutes for the six FIDs, so the bench's one FID function runs here on the kit's
    cheap PixelProjection features (the same statistics and Fréchet distance, other features)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import objectives
    finally:
        sys.path.remove(str(REPO / "bench"))
    from dip_lightning.commands import demo
    from dip_lightning.core.metrics.features import PixelProjection

    monkeypatch.setattr(objectives, "_extractor", lambda cls: PixelProjection())
    real_reference_stats = demo.reference_stats
    monkeypatch.setattr(
        demo,
        "reference_stats",
        lambda shards, out, size: real_reference_stats(shards, out, size, PixelProjection()),
    )
    # A copy: the reference statistics written next to the shards must not reach other tests' demo folder.
    data_dir = tmp_path / "demo"
    shutil.copytree(demo_data["root"], data_dir)
    runs = tmp_path / "runs"
    assert (
        objectives.main(["--smoke", "--data", str(data_dir), "--runs", str(runs), "--phase", "evaluate"]) == 0
    )
    for prediction in ("v", "x"):
        assert (runs / f"pred_{prediction}" / "checkpoints" / "step00000004.ckpt").is_file()
    found = json.loads((runs / "eval_objectives.json").read_text())
    assert set(found["objectives"]) == {"v", "x"} and Path(found["grid"]).is_file()
    for name in objectives.SAMPLER_NAMES:
        (row,) = json.loads((runs / f"eval_{name}.json").read_text())["samplers"]
        assert row["fid"] > 0 and row["nfe"] in (3, 4)


def test_loss_spike_benchmark_smoke_run_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "loss_spike.md"
    cmd = [sys.executable, str(REPO / "bench" / "loss_spike.py"), "--steps", "120", "--seeds", "0"]
    cmd += ["--batch_sizes", "8", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 0 | 8 |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[3] == "0"  # the recipe's guard fired on no step of the healthy run
    # Window 50: 70 steps judged (all below the median while the loss falls fast), none near 20 MADs.
    assert 0 <= float(cells[4].split()[0]) < 20


def test_objectives_benchmark_builds_its_data_beside_its_runs(tmp_path: Path) -> None:
    # Its 32 px data went to data/demo by default, replacing the 64 px data `make demo` had built there.
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import objectives
    finally:
        sys.path.remove(str(REPO / "bench"))
    runs = tmp_path / "runs"
    assert objectives.main(["--smoke", "--runs", str(runs), "--phase", "train", "--predictions", "v"]) == 0
    assert sorted(p.name for p in (runs / "demo_data").glob("*.tar"))[:1] == ["train-000000.tar"]
    assert (runs / "pred_v" / "checkpoints" / "step00000004.ckpt").is_file()


def test_demo_metric_bar_scores_real_and_degraded_crops(tmp_path: Path, demo_data: dict) -> None:
    out = tmp_path / "bar.md"
    cmd = [sys.executable, str(REPO / "bench" / "demo_metric_bar.py"), "--data", str(demo_data["root"])]
    cmd += ["--size", "32", "--num_samples", "48", "--extractor", "pixel-projection", "--results", str(out)]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| real")]
    assert len(rows) == 12  # unchanged, four blurs, three noise levels, three resizings, the patch mosaic
    unchanged = [float(v) for v in rows[0][1:]]
    assert unchanged[2] > 1 / 8  # the crops' own class is nearer than chance would put it
    # Realism (median): the unchanged crops sit nearer the validation crops' balls than the noisiest ones.
    noisiest = next(row for row in rows if row[0].strip() == "real crops + Gaussian noise 16/255")
    assert unchanged[3] > float(noisiest[4])


def test_demo_recipe_denoise_prints_a_ratio_per_time(guide_checkpoints: dict, demo_data: dict) -> None:
    ckpt = guide_checkpoints["main"]
    cmd = [sys.executable, str(REPO / "bench" / "demo_recipe.py"), "--denoise", str(ckpt)]
    cmd += ["--data", str(demo_data["root"])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, row = proc.stdout.strip().splitlines()[-2:]
    assert header.count("t=") == 8 and row.startswith(str(ckpt))
    ratios = [float(v) for v in row.split(" | ")[1:]]
    assert len(ratios) == 8 and all(0 < r < 10 for r in ratios)
    # At t = 0.3 doing nothing (x_t / t) multiplies the noise by 2.3: any estimate near x_t does better.
    assert ratios[0] < 1


def test_demo_recipe_denoise_without_a_data_folder_says_what_it_needs(tmp_path: Path) -> None:
    for data in ([], ["--data", str(tmp_path / "missing")]):
        cmd = [sys.executable, str(REPO / "bench" / "demo_recipe.py"), "--denoise", "any.ckpt", *data]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "--hf and --denoise need --data, a demo data folder with val-*.tar shards" in proc.stderr


def test_demo_metric_bar_scores_each_checkpoints_samples(
    tmp_path: Path, demo_data: dict, guide_checkpoints: dict
) -> None:
    out = tmp_path / "bar.md"
    cmd = [sys.executable, str(REPO / "bench" / "demo_metric_bar.py"), "--data", str(demo_data["root"])]
    cmd += ["--samples_only", "--num_samples", "16", "--extractor", "pixel-projection", "--results", str(out)]
    cmd += ["--checkpoint", str(guide_checkpoints["main"]), str(guide_checkpoints["guide"])]
    cmd += ["--sampler", "heun", "--num_steps", "2"]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith(("| EMA", "| ..."))
    ]
    names = [row[0].strip() for row in rows]
    # Per checkpoint: its samples, blurred, seams smoothed, then (estimate, noised) at t = 0.9 and 0.95.
    assert [name.split(",")[0].split()[-1] for name in names[::7]] == ["last", "step00000002"]
    assert all(name.endswith(", sampler heun, num_steps 2") for name in names[::7])
    assert all(name.startswith("... the same") for name in names[1::7] + names[2::7])
    assert [name.split(" to ")[-1] for name in names[3:7]] == [
        "t = 0.9: its one-step clean estimate",
        "t = 0.9, not denoised",
        "t = 0.95: its one-step clean estimate",
        "t = 0.95, not denoised",
    ]
    assert all(0 <= float(v) <= 1 for row in rows for v in row[1:4])


def test_smooth_seams_changes_only_the_bands_along_patch_borders() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from demo_metric_bar import smooth_seams
    finally:
        sys.path.remove(str(REPO / "bench"))
    images = torch.randint(
        0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    smoothed = smooth_seams(images, patch=16, width=2)
    changed = (smoothed != images).any(dim=(0, 1))
    position = torch.arange(32) % 16
    inside = (position >= 2) & (position < 14)
    assert not changed[inside[:, None] & inside[None, :]].any()
    assert changed[~(inside[:, None] & inside[None, :])].float().mean() > 0.9


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_demo_metric_bar_one_step_estimate_reads_the_runs_prediction(prediction: str) -> None:
    # The estimate took every network output for v: an x-prediction run's output x came back as x_t + (1 - t) x.
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from demo_metric_bar import one_step_estimates
    finally:
        sys.path.remove(str(REPO / "bench"))
    from types import SimpleNamespace

    from dip_lightning.core.diffusion.flow_matching import FlowMatching

    images = torch.randint(
        0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    clean = images.float() / 127.5 - 1

    def oracle(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # What a perfect network outputs in its space, from x_t and the known clean image.
        eps = (x_t - t[:, None, None, None] * clean) / (1 - t[:, None, None, None])
        return clean - eps if prediction == "v" else clean

    module = SimpleNamespace(flow=FlowMatching(prediction=prediction), net=oracle)
    estimate, noised = one_step_estimates(module, images, torch.zeros(2, dtype=torch.long), 0.9)
    assert (estimate.int() - images.int()).abs().max() <= 1  # the clean image back, to uint8 rounding
    assert (noised.int() - images.int()).abs().max() > 1
