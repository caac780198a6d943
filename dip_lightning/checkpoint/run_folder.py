"""The run folder: one fixed folder per experiment (``trainer.default_root_dir``) and the names of what lives in it.

::

    <run>/                      trainer.default_root_dir
      tensorboard/              the log folder: TensorBoard events, config.yaml, experiment.json,
                                eval_metrics.csv, grids/step_XXXXXXXX.png (artefact_dir)
      checkpoints/              step########.ckpt, last.ckpt (checkpoint_dir)
      phema/                    post-hoc EMA snapshots phema-<step>.pt (snapshot_dir;
                                :mod:`dip_lightning.checkpoint.posthoc`)
      hpc_ckpt_N.ckpt           preemption checkpoints (Lightning's name; :mod:`dip_lightning.checkpoint.resume`)

The one module that knows these names: training writes the folder, resume and the report read it. The logger's
version is pinned to ``tensorboard``, so a requeued job appends to the same folder instead of opening
``version_N+1``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_FOLDER",
    "CONFIG_RECORD",
    "DEFAULT_RUN_DIR",
    "EVAL_METRICS_CSV",
    "EXPERIMENT_RECORD",
    "GRID_FOLDER",
    "LOG_VERSION",
    "PREEMPTION_NAME",
    "SNAPSHOT_FOLDER",
    "artefact_dir",
    "checkpoint_dir",
    "locate_run",
    "log_dir",
    "preemption_path",
    "snapshot_dir",
]

#: ``trainer.default_root_dir`` when a config gives none.
DEFAULT_RUN_DIR = "runs/default"
#: The logger's pinned version, hence the log folder ``<run>/tensorboard``.
LOG_VERSION = "tensorboard"
#: The checkpoint folder ``<run>/checkpoints``.
CHECKPOINT_FOLDER = "checkpoints"
#: In the log folder: the parsed config of the latest job, every value (LightningCLI's writer).
CONFIG_RECORD = "config.yaml"
#: In the log folder: the ``--config`` files (path and text) and the command line of the latest ``fit`` job.
EXPERIMENT_RECORD = "experiment.json"
#: In the log folder: one row per in-training evaluation (``step,images_seen,<metrics>,...``).
EVAL_METRICS_CSV = "eval_metrics.csv"
#: In the log folder: the sample grids, ``step_XXXXXXXX.png`` with a JSON side file each.
GRID_FOLDER = "grids"
#: The post-hoc EMA snapshot folder ``<run>/phema``, beside the checkpoint folder.
SNAPSHOT_FOLDER = "phema"
#: Preemption checkpoints ``<run>/hpc_ckpt_N.ckpt``: Lightning's name and place, so that plain Lightning
#: (``fit(ckpt_path="hpc")``) finds them too. Group 1 is N.
PREEMPTION_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def artefact_dir(trainer: Any) -> Path:
    """Where this run's logs and artefacts (grids, metric CSVs) go: the logger's folder, else the run folder.

    Reads the logger's own attribute, not ``trainer.log_dir`` (a collective under DDP), so any rank may call it.
    """
    logger = getattr(trainer, "logger", None)
    log_dir = getattr(logger, "log_dir", None)
    return Path(log_dir) if log_dir else Path(trainer.default_root_dir)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The checkpoint folder of a run folder."""
    return Path(run_dir) / CHECKPOINT_FOLDER


def snapshot_dir(run_dir: str | Path) -> Path:
    """The post-hoc EMA snapshot folder of a run folder."""
    return Path(run_dir) / SNAPSHOT_FOLDER


def preemption_path(run_dir: str | Path, number: int) -> Path:
    """The preemption checkpoint number ``number`` of a run folder (a match of :data:`PREEMPTION_NAME`)."""
    return Path(run_dir) / f"hpc_ckpt_{number}.ckpt"


def log_dir(run_dir: str | Path) -> Path:
    """The log folder of a run folder (the TensorBoard logger's, pinned)."""
    return Path(run_dir) / LOG_VERSION


def locate_run(folder: str | Path) -> tuple[Path, Path]:
    """``(run folder, log folder)`` of a folder given as either.

    A run folder's logs are in ``<run>/tensorboard``; a folder without one holds its logs itself, and is the log
    folder of its parent when the parent has the checkpoint folder.
    """
    folder = Path(folder)
    nested = log_dir(folder)
    if nested.is_dir():
        return folder, nested
    if checkpoint_dir(folder.parent).is_dir():
        return folder.parent, folder
    return folder, folder
