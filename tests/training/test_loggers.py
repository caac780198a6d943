"""Any logger, one run folder: real fits with a CSVLogger, a W&B logger in offline mode and an MLflow logger on a
local file store, each resumed once: the grids reach the logger and the run folder, everything stays in one
folder, one W&B run id and one MLflow run, and ``report`` reads the folders."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dip_lightning.checkpoint.run_folder import LOG_VERSION, MLFLOW_RUN_ID, WANDB_ID, log_dir
from dip_lightning.core.errors import MissingExtraError
from dip_lightning.evaluation.report import write_report
from dip_lightning.training.cli import DiPCLI
from dip_lightning.training.loggers import MLFLOW_FILE_STORE_OPT_IN, place_loggers
from tests.helpers.tiny import grid_callback, tiny_args

CSV = "lightning.pytorch.loggers.CSVLogger"
WANDB = "lightning.pytorch.loggers.WandbLogger"
MLFLOW = "lightning.pytorch.loggers.MLFlowLogger"
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


# ------------------------------------------------------------------------------------------ placing the loggers
def test_place_loggers_pins_folders_and_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MLFLOW_FILE_STORE_OPT_IN, raising=False)  # restored afterwards
    run = tmp_path / "run"
    assert place_loggers(None, run)["init_args"] == {"save_dir": str(run), "name": "", "version": LOG_VERSION}
    assert place_loggers(False, run) is False

    config = [
        {
            "class_path": CSV,
            "init_args": {"save_dir": "elsewhere", "name": "lightning_logs", "version": None},
        },
        {"class_path": CSV, "init_args": {"save_dir": "mine", "version": "v7"}},  # pinned by the user: kept
        {"class_path": WANDB, "init_args": {"save_dir": ".", "id": None, "resume": None}},
        {"class_path": MLFLOW, "init_args": {"save_dir": "./mlruns", "tracking_uri": None, "run_id": None}},
        {"class_path": "not.a.module.Logger"},  # left to jsonargparse to report
    ]
    placed = place_loggers(config, run)
    assert placed[0]["init_args"] == {"save_dir": str(run), "name": "", "version": LOG_VERSION}
    assert placed[1]["init_args"] == {"save_dir": "mine", "version": "v7"}
    wandb_init = placed[2]["init_args"]
    assert wandb_init["save_dir"] == str(run) and wandb_init["resume"] == "allow"
    assert wandb_init["id"] == (run / WANDB_ID).read_text().strip() and len(wandb_init["id"]) == 8
    assert (
        placed[3]["init_args"]["save_dir"] == str(run / "mlruns") and placed[3]["init_args"]["run_id"] is None
    )
    assert (
        os.environ[MLFLOW_FILE_STORE_OPT_IN] == "true"
    )  # the file store the kit chose, which MLflow 3 refuses

    # A later job: the same W&B id (written once), the MLflow run the first job recorded.
    (run / MLFLOW_RUN_ID).write_text("0123abcd\n")
    again = place_loggers(
        [{"class_path": WANDB}, {"class_path": MLFLOW, "init_args": {"tracking_uri": "x"}}], run
    )
    assert again[0]["init_args"]["id"] == wandb_init["id"]
    assert again[1]["init_args"] == {
        "tracking_uri": "x",
        "run_id": "0123abcd",
    }  # a tracking server: no file store


def test_a_logger_without_its_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        sys.modules, "wandb", None
    )  # what an environment without the package gives: ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'dip-lightning\[wandb\]'"):
        place_loggers({"class_path": WANDB}, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


# ------------------------------------------------------------------------------------------ real runs, resumed once
def metrics_callback(data: dict) -> dict[str, Any]:
    """FID every 2 steps with a cheap feature network, so that each job writes eval_metrics.csv rows."""
    return {
        "class_path": "dip_lightning.training.callbacks.MetricsCallback",
        "init_args": {
            "every_n_steps": 2,
            "num_samples": 8,
            "batch_size": 8,
            "num_steps": 2,
            "real_shards": data["val_shards"],
            "real_num_samples": 16,
            "metrics": ["fid"],
            "extractor": {"class_path": "dip_lightning.core.metrics.features.PixelProjection"},
        },
    }


def fit_twice(run: Path, data: dict, loggers: list[dict[str, Any]]) -> list[DiPCLI]:
    """``fit`` to step 2, then ``fit`` again to step 4 (a requeued job: it resumes); grids and FID every 2 steps,
    validation (``val/loss``) every 2 steps."""
    callbacks = [grid_callback(every_n_steps=2, rows=2, cols=2, num_steps=2), metrics_callback(data)]
    clis = []
    for steps in (2, 4):
        args = tiny_args(
            run,
            data,
            f"--trainer.logger={json.dumps(loggers)}",
            "--checkpoint.every_n_train_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=2",
            steps=steps,
            callbacks=callbacks,
        )
        clis.append(DiPCLI(args=["fit", *args]))
        if any(entry["class_path"] == WANDB for entry in loggers):
            import wandb

            wandb.finish()  # the job's process would end here
    return clis


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def assert_one_run_folder(run: Path) -> None:
    """Both jobs' files in the run folder's fixed places: no ``lightning_logs``, no ``version_N`` folders."""
    grids = log_dir(run) / "grids"
    assert sorted(p.name for p in grids.glob("*.png")) == ["step_00000002.png", "step_00000004.png"]
    assert not list(run.rglob("version_*")) and not (run / "lightning_logs").exists()
    with open(log_dir(run) / "eval_metrics.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["2", "4"]
    assert (log_dir(run) / "config.yaml").is_file() and (log_dir(run) / "experiment.json").is_file()


@pytest.mark.slow  # four short fits and a report
def test_csv_and_wandb_offline_runs_resume_in_one_folder_and_report_reads_both(
    tmp_path: Path, demo_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")

    csv_run = tmp_path / "csv_run"
    fit_twice(csv_run, demo_data, [{"class_path": CSV, "init_args": {"save_dir": str(tmp_path)}}])
    assert_one_run_folder(csv_run)
    # The CSVLogger's scalars of both jobs: the first job's file kept beside the second's (it would be deleted).
    first_job = list(log_dir(csv_run).glob("metrics-*.csv"))
    assert len(first_job) == 1 and (log_dir(csv_run) / "metrics.csv").is_file()

    wandb_run = tmp_path / "wandb_run"
    clis = fit_twice(wandb_run, demo_data, [{"class_path": WANDB, "init_args": {"project": "dip-test"}}])
    assert_one_run_folder(wandb_run)
    run_id = (wandb_run / WANDB_ID).read_text().strip()
    assert [cli.trainer.logger.version for cli in clis] == [run_id, run_id]
    # One offline folder per job, both of the one W&B run; each job's grid logged through W&B, pixel for pixel.
    jobs = sorted((wandb_run / "wandb").glob("offline-run-*"))
    assert len(jobs) == 2 and all(job.name.endswith(f"-{run_id}") for job in jobs)
    for job, step in zip(jobs, (2, 4)):
        logged = list((job / "files" / "media" / "images" / "samples").glob("grid_*.png"))
        assert len(logged) == 1
        expected = pixels(log_dir(wandb_run) / "grids" / f"step_{step:08d}.png")
        assert np.array_equal(pixels(logged[0]), expected)

    report, runs = write_report([csv_run, wandb_run], tmp_path / "report", plots=False)
    by_label = {r.label: r for r in runs}
    for summary in by_label.values():
        assert summary.steps == 4 and summary.metrics["fid"].steps == [2, 4]
    # val/loss of both jobs, from the CSVLogger's two files (Lightning logs the validation after step 2 at step 1).
    assert by_label["csv_run"].metrics["loss"].steps == [1, 3]
    text = report.read_text()
    assert "csv_run" in text and "wandb_run" in text and "No metrics were logged" not in text


@pytest.mark.slow  # two short fits
def test_mlflow_and_tensorboard_run_resumed_once_continues_its_mlflow_run(
    tmp_path: Path, demo_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two loggers at once: MLflow first (Lightning's trainer.log_dir would be its save_dir), TensorBoard second."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv(MLFLOW_FILE_STORE_OPT_IN, raising=False)  # set by the kit; restored afterwards
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    loggers = [
        {"class_path": MLFLOW, "init_args": {"experiment_name": "dip"}},
        {"class_path": TENSORBOARD, "init_args": {"save_dir": "tb"}},
    ]
    clis = fit_twice(run, demo_data, loggers)
    assert_one_run_folder(run)
    run_id = (run / MLFLOW_RUN_ID).read_text().strip()
    assert [cli.trainer.loggers[0].run_id for cli in clis] == [run_id, run_id]
    # TensorBoard: one event file per job, in the one log folder (its save_dir "tb" is replaced by the run folder).
    assert len(list(log_dir(run).glob("events.out.tfevents.*"))) == 2 and not Path("tb").exists()
    stored = [p for p in (run / "mlruns").glob("*/*") if p.is_dir() and (p / "meta.yaml").is_file()]
    assert [p.name for p in stored] == [run_id]  # one MLflow run, in the run folder's file store
    for step in (2, 4):
        artifact = stored[0] / "artifacts" / "samples" / "grid" / f"step_{step:08d}.png"
        assert np.array_equal(pixels(artifact), pixels(log_dir(run) / "grids" / f"step_{step:08d}.png"))
    fid_lines = (stored[0] / "metrics" / "val" / "fid").read_text().split()
    assert [int(line) for line in fid_lines[2::3]] == [2, 4]  # "<time> <value> <step>" lines, one per job
