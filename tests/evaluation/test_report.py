"""`python -m dip_lightning report`: real run folders made by short real Trainer runs, read back into one table
and one PNG per metric; the values in the table are the ones the runs wrote."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from dip_lightning.commands import run_command
from dip_lightning.core.metrics import METRIC_GOALS, METRIC_NAMES
from dip_lightning.evaluation.report import (
    MetricSeries,
    best_point,
    paper_row,
    read_metric_csv,
    summarize_run,
    write_report,
)
from dip_lightning.evaluation.tables import format_number
from tests.helpers.tiny import REPO, ema_callback, fit_with, tiny_args

STEPS = 4
BATCH = 8
HEAD_MLP = str(REPO / "experiments" / "ablations" / "head_mlp.yaml")


def _metrics_callback(data: dict) -> dict:
    # The cheap pixel-projection features: real metrics of real samples, in a fraction of a second.
    return {
        "class_path": "dip_lightning.training.callbacks.MetricsCallback",
        "init_args": {
            "every_n_steps": 2,
            "num_samples": 8,
            "batch_size": 8,
            "num_steps": 2,
            "real_shards": data["val_shards"],
            "metrics": ["fid", "precision", "recall", "patch_seam"],
            "extractor": {"class_path": "dip_lightning.core.metrics.features.PixelProjection"},
        },
    }


def _fit(run_dir: Path, data: dict, *extra: str, callbacks: list[dict] | None = None) -> Path:
    args = tiny_args(run_dir, data, *extra, steps=STEPS, batch_size=BATCH, callbacks=callbacks)
    fit_with(args + ["--checkpoint.every_n_train_steps=2"])
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_runs")
    validation = ["--trainer.limit_val_batches=1", "--trainer.val_check_interval=2"]
    metrics_run = _fit(
        root / "dip_metrics", demo_data, *validation, callbacks=[ema_callback(), _metrics_callback(demo_data)]
    )
    # An overlay, as an ablation is run: the experiment YAML, then the overlay (whose run folder is replaced).
    overlay = _fit(
        root / "mlp_head", demo_data, "--config", HEAD_MLP, f"--trainer.default_root_dir={root / 'mlp_head'}"
    )
    resumed = _fit(root / "resumed", demo_data)
    # The metrics callback's layout with step 4 written twice, as a run resumed from before an evaluation leaves it.
    with open(resumed / "tensorboard" / "eval_metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "images_seen", "fid", "num_samples", "seconds", "unix_time"])
        writer.writerows([[2, 16, 300.0, 8, 1.0, 0], [4, 32, 250.0, 8, 1.0, 0], [4, 32, 240.0, 8, 1.0, 0]])
    return {"metrics": metrics_run, "overlay": overlay, "resumed": resumed}


def _rows(report: Path) -> dict[str, dict[str, str]]:
    lines = [line for line in report.read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]
    return {row["run"]: row for row in rows}


def test_fit_records_its_config_files_with_their_text(runs: dict[str, Path]) -> None:
    record = json.loads((runs["overlay"] / "tensorboard" / "experiment.json").read_text())
    assert [Path(c["path"]).name for c in record["configs"]] == ["tiny_cpu.yaml", "head_mlp.yaml"]
    assert record["configs"][1]["text"] == Path(HEAD_MLP).read_text()
    assert "--config" in record["argv"] and any("max_steps=4" in a for a in record["argv"])


def test_report_over_three_real_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    folders = [str(runs[k]) for k in ("metrics", "overlay", "resumed")]
    assert run_command(["report", *folders, "--out", str(out)]) == 0
    rows = _rows(out / "report.md")
    assert set(rows) == {"dip_metrics", "mlp_head", "resumed"}
    for row in rows.values():  # steps from the newest checkpoint; images seen = steps x batch (1 device)
        assert row["steps"] == str(STEPS) and row["images seen"] == str(STEPS * BATCH)
    assert rows["mlp_head"]["experiment"] == "tiny_cpu.yaml + head_mlp.yaml"
    assert (
        rows["mlp_head"]["paper row"]
        == 'Paper Table 2 row "+ Standard MLP head" (630M, FID 6.92 at 160 epochs)'
    )
    assert rows["dip_metrics"]["paper row"] == "—"  # tiny_cpu.yaml: "Reproduces: no paper row"

    # Every metric as the metrics callback wrote it: final value, best value and its step.
    with open(runs["metrics"] / "tensorboard" / "eval_metrics.csv") as f:
        written = list(csv.DictReader(f))
    assert [int(r["step"]) for r in written] == [2, 4]
    for metric, pick in (("fid", min), ("precision", max), ("recall", max)):
        points = [(int(r["step"]), float(r[metric])) for r in written]
        best = pick(points, key=lambda p: (p[1], -p[0]) if pick is max else (p[1], p[0]))
        assert (
            rows["dip_metrics"][metric]
            == f"{format_number(points[-1][1])} ({format_number(best[1])} @ {best[0]})"
        )
    seams = [(int(r["step"]), float(r["patch_seam"])) for r in written]
    best = min(seams, key=lambda p: abs(p[1] - 1.0))  # nearest 1.0: seams like the reference's
    assert (
        rows["dip_metrics"]["patch_seam"]
        == f"{format_number(seams[-1][1])} ({format_number(best[1])} @ {best[0]})"
    )
    assert rows["dip_metrics"]["loss"] != "—"  # val/loss from the TensorBoard event file
    # A step written twice: the later row wins.
    assert rows["resumed"]["fid"] == "240.0 (240.0 @ 4)"
    assert rows["mlp_head"]["fid"] == "—"

    text = (out / "report.md").read_text()
    for metric in ("fid", "loss", "patch_seam"):
        assert f"]({metric}.png)" in text
        with Image.open(out / f"{metric}.png") as image:
            assert image.format == "PNG" and image.size == (640, 400)
            colours = len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])
        assert colours > 10, metric  # axes, text and curves, not a blank canvas


def test_a_repeated_step_keeps_the_later_row_and_empty_cells_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "eval_metrics.csv"
    path.write_text(
        "step,images_seen,fid,precision,num_samples,seconds,unix_time\n"
        "2,16,300.0,0.1,8,1.0,0\n4,32,250.0,,8,1.0,0\n4,32,240.0,0.2,8,1.0,0\n5,40,230\n6"
    )  # the last line cut short by a killed writer
    series, seen = read_metric_csv(path)
    assert series["fid"].steps == [2, 4, 5] and series["fid"].values == [300.0, 240.0, 230.0]
    assert series["precision"].values == [0.1, 0.2] and seen == {2: 16, 4: 32, 5: 40}


def test_a_metric_over_seeds_shows_its_spread(tmp_path: Path) -> None:
    """``<metric>_std``, ``_min``, ``_max`` beside ``<metric>`` (the layout of sweep.csv) are its spread over
    seeds, not metrics of their own; the table shows the final value ± std [min–max]."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_metrics.csv").write_text(
        "step,fid,fid_std,fid_min,fid_max,recall_std,num_samples\n"
        "2,300.0,4.0,296.0,305.0,0.1,8\n4,250.0,2.5,247.5,252.0,,8\n"
    )  # recall_std without a recall column stays a metric of its own
    series, _ = read_metric_csv(run / "eval_metrics.csv")
    assert set(series) == {"fid", "recall_std"} and series["fid"].values == [300.0, 250.0]
    assert series["fid"].spread[4] == {"std": 2.5, "min": 247.5, "max": 252.0}
    report, _ = write_report([run], tmp_path / "report", plots=False)
    assert "250.0 ± 2.500 [247.5–252.0] (250.0 @ 4)" in report.read_text()


def test_the_artefact_folder_names_the_run_too(runs: dict[str, Path]) -> None:
    assert summarize_run(runs["resumed"] / "tensorboard").run_dir == runs["resumed"]


def test_best_point_follows_each_metrics_direction() -> None:
    assert set(METRIC_GOALS) == set(METRIC_NAMES)  # every metric of the engine has a direction
    assert best_point(MetricSeries("fid", [1, 2, 3], [5.0, 3.0, 4.0])) == (2, 3.0)
    assert best_point(MetricSeries("inception_score", [1, 2, 3], [5.0, 3.0, 6.0])) == (3, 6.0)
    assert best_point(MetricSeries("patch_seam", [1, 2, 3], [1.5, 0.95, 1.04])) == (3, 1.04)
    assert best_point(MetricSeries("val_loss", [1, 2], [0.5, 0.4])) == (2, 0.4)
    assert best_point(MetricSeries("lr", [1, 2], [0.5, 0.4])) is None  # no known ordering: final value only


def test_paper_row_of_every_experiment_yaml() -> None:
    rows = {p.name: paper_row(p.read_text()) for p in (REPO / "experiments").rglob("*.yaml")}
    assert rows["tiny_cpu.yaml"] is None and rows["dip_l16.yaml"] is None  # both say "no paper row"
    assert rows["dip_xl16.yaml"].startswith('paper Table 1, row "DiP-XL/16, 600 epochs')
    assert (
        rows["head_attention.yaml"]
        == 'Paper Table 2 row "+ Intra-patch attention" (630M, FID 2.98 at 160 epochs)'
    )
    assert rows["dit_only.yaml"] == 'Paper Table 2 row "DiT-only 26L, 1152" (629M, FID 5.28 at 160 epochs)'
    assert rows["placement_hybrid.yaml"] == 'Paper Fig 5(c) / Fig 8 "hybrid" (FID 3.53 at 160 epochs)'
    assert rows["head_depth1.yaml"].startswith("Paper Fig 10a, head depth")
    assert rows["no_repa.yaml"] is None  # "not a paper row"


def test_missing_matplotlib_names_the_extra_and_writes_nothing(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "report"
    assert run_command(["report", str(runs["metrics"]), "--out", str(out)]) == 2
    assert "pip install 'dip-lightning[report]'" in capsys.readouterr().err
    assert not out.exists()
    report, _ = write_report([runs["metrics"]], out, plots=False)  # --no_plots needs no matplotlib
    assert report.is_file() and not list(out.glob("*.png"))


def test_a_folder_that_is_no_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert run_command(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and "empty" in err
    assert run_command(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
