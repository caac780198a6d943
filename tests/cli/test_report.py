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
from dip_lightning.report import (
    MetricSeries,
    best_point,
    paper_row,
    read_metric_csv,
    summarize_run,
    write_report,
)
from tests.helpers.tiny import REPO, ema_callback, fit_with, tiny_args

STEPS = 4
BATCH = 8
HEAD_MLP = str(REPO / "experiments" / "ablations" / "head_mlp.yaml")


def _fid_callback(data: dict) -> dict:
    # The cheap pixel-projection features: a real FID of real samples, in a fraction of a second.
    return {
        "class_path": "dip_lightning.callbacks.FIDCallback",
        "init_args": {
            "every_n_steps": 2,
            "num_samples": 8,
            "batch_size": 8,
            "num_steps": 2,
            "real_shards": data["val_shards"],
            "extractor": {"class_path": "dip_lightning.fid.PixelProjection"},
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
    fid_run = _fit(
        root / "dip_fid", demo_data, *validation, callbacks=[ema_callback(), _fid_callback(demo_data)]
    )
    # An overlay, as an ablation is run: the experiment YAML, then the overlay (whose run folder is replaced).
    overlay = _fit(
        root / "mlp_head", demo_data, "--config", HEAD_MLP, f"--trainer.default_root_dir={root / 'mlp_head'}"
    )
    plain = _fit(root / "suite", demo_data)
    # The metrics callback's file (header of the metrics contract), as a run with the full suite writes it.
    with open(plain / "tensorboard" / "eval_metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["step", "images_seen", "fid", "precision", "patch_seam", "num_samples", "seconds", "unix_time"]
        )
        writer.writerows(
            [
                [2, 16, 300.0, 0.1, 1.5, 8, 1.0, 0],
                [4, 32, 250.0, "", 0.9, 8, 1.0, 0],
                [4, 32, 240.0, 0.2, 1.2, 8, 1.0, 0],
            ]
        )
    return {"fid": fid_run, "overlay": overlay, "suite": plain}


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
    assert (
        run_command(["report", str(runs["fid"]), str(runs["overlay"]), str(runs["suite"]), "--out", str(out)])
        == 0
    )
    rows = _rows(out / "report.md")
    assert set(rows) == {"dip_fid", "mlp_head", "suite"}
    for row in rows.values():  # steps from the newest checkpoint; images seen = steps x batch (1 device)
        assert row["steps"] == str(STEPS) and row["images seen"] == str(STEPS * BATCH)
    assert rows["mlp_head"]["experiment"] == "tiny_cpu.yaml + head_mlp.yaml"
    assert rows["mlp_head"]["paper row"].startswith('Paper Table 2 row "+ Standard MLP head" (630M, FID 6.92')
    assert rows["dip_fid"]["paper row"] == "—"  # tiny_cpu.yaml: "Reproduces: no paper row"

    # FID as fid.csv has it: final value, best value and its step.
    with open(runs["fid"] / "tensorboard" / "fid.csv") as f:
        written = [(int(r["step"]), float(r["fid"])) for r in csv.DictReader(f)]
    assert [s for s, _ in written] == [2, 4]
    best = min(written, key=lambda p: p[1])
    assert rows["dip_fid"]["fid"] == f"{written[-1][1]:.2f} ({best[1]:.2f} @ {best[0]})"
    assert rows["dip_fid"]["loss"] != "—"  # val/loss from the TensorBoard event file
    # eval_metrics.csv: the later row of a step logged twice wins; an empty cell is skipped; patch_seam's best is
    # the value nearest 1.0, precision's the highest.
    assert rows["suite"]["fid"] == "240.0 (240.0 @ 4)"
    assert rows["suite"]["patch_seam"] == "1.200 (1.200 @ 4)"
    assert rows["suite"]["precision"] == "0.2000 (0.2000 @ 4)"
    assert rows["mlp_head"]["fid"] == "—"

    for metric, runs_in_plot in (("fid", 2), ("loss", 1), ("patch_seam", 1)):
        png = out / f"{metric}.png"
        assert f"]({metric}.png)" in (out / "report.md").read_text()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (640, 400)
            colours = len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])
        assert colours > 10, (metric, runs_in_plot)  # axes, text and curves, not a blank canvas


def test_a_resumed_runs_repeated_step_keeps_the_later_row(runs: dict[str, Path]) -> None:
    series, seen = read_metric_csv(runs["suite"] / "tensorboard" / "eval_metrics.csv")
    assert series["fid"].steps == [2, 4] and series["fid"].values == [300.0, 240.0]
    assert series["precision"].values == [0.1, 0.2] and seen == {2: 16, 4: 32}
    assert (
        summarize_run(runs["suite"] / "tensorboard").run_dir == runs["suite"]
    )  # the artefact folder works too


def test_best_point_follows_each_metrics_direction() -> None:
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
    assert run_command(["report", str(runs["fid"]), "--out", str(out)]) == 2
    assert "pip install 'dip-lightning[report]'" in capsys.readouterr().err
    assert not out.exists()
    report, _ = write_report([runs["fid"]], out, plots=False)  # --no_plots needs no matplotlib
    assert report.is_file() and not list(out.glob("*.png"))


def test_a_folder_that_is_no_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert run_command(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and "empty" in err
    assert run_command(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
