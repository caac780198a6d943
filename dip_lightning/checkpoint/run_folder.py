"""The run folder: one fixed folder per experiment (``trainer.default_root_dir``) and the names of what lives in it.

::

    <run>/                      trainer.default_root_dir
      tensorboard/              the log folder, whichever loggers are configured (artefact_dir): config.yaml,
                                experiment.json, eval_metrics.csv, grids/step_XXXXXXXX.png; the TensorBoard
                                events and a CSVLogger's metrics.csv (metrics-<time>.csv: earlier jobs')
                                when those loggers are configured
      wandb/, wandb_id          a WandbLogger's local files, and the id of this run's W&B run (written once)
      mlruns/, mlflow_run_id    an MLFlowLogger's local file store (without a tracking URI), and this run's
                                MLflow run id (written once)
      checkpoints/              step########.ckpt, last.ckpt (checkpoint_dir)
      phema/                    post-hoc EMA snapshots phema-<step>.pt (snapshot_dir;
                                :mod:`dip_lightning.checkpoint.posthoc`)
      hpc_ckpt_N.ckpt           preemption checkpoints (Lightning's name; :mod:`dip_lightning.checkpoint.resume`)
      run.lock                  who holds the folder: the running ``fit`` (:mod:`dip_lightning.checkpoint.run_lock`)
      run.lock.taken-*          holds of ended jobs, set aside when a later ``fit`` took the folder over
    <run>/, checkpoints/:
      damaged/                  damaged checkpoints a resume set aside (damaged_path)
      superseded/               checkpoints after the step a ``fit --ckpt_path`` went back to (superseded_path)

The one module that knows these names: training writes the folder, resume and the report read it. The kit's own
files go to the log folder whatever the logger (:mod:`dip_lightning.training.loggers` places each logger in the run
folder): TensorBoard and CSV loggers get the pinned version ``tensorboard``, so a requeued job appends to the same
folder instead of opening ``version_N+1``, and a W&B or MLflow run is continued through its pinned id.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_FOLDER",
    "CONFIG_RECORD",
    "CSV_LOGGER_METRICS",
    "DAMAGED_FOLDER",
    "DEFAULT_RUN_DIR",
    "EVAL_METRICS_CSV",
    "EXPERIMENT_RECORD",
    "GRID_FOLDER",
    "LOG_VERSION",
    "MLFLOW_RUN_ID",
    "PREEMPTION_NAME",
    "RUN_LOCK",
    "SNAPSHOT_FOLDER",
    "STEP_FILENAME",
    "STEP_NAME",
    "SUPERSEDED_FOLDER",
    "WANDB_ID",
    "artefact_dir",
    "checkpoint_dir",
    "damaged_path",
    "earlier_job_path",
    "lock_path",
    "logger_id_path",
    "locate_run",
    "log_dir",
    "preemption_path",
    "snapshot_dir",
    "superseded_path",
    "taken_lock_path",
]

#: ``trainer.default_root_dir`` when a config gives none.
DEFAULT_RUN_DIR = "runs/default"
#: The log folder ``<run>/tensorboard`` (named after the default logger; the same for every logger), the pinned
#: version of the TensorBoard and CSV loggers.
LOG_VERSION = "tensorboard"
#: In the log folder: a CSVLogger's scalars. An earlier job's file is kept as ``metrics-<UTC time>.csv``
#: (:func:`earlier_job_path`; the CSVLogger would delete it).
CSV_LOGGER_METRICS = "metrics.csv"
#: In the run folder: the id of the run's W&B run, chosen by its first job and passed to every later one.
WANDB_ID = "wandb_id"
#: In the run folder: the id of the run's MLflow run, recorded by its first job and passed to every later one.
MLFLOW_RUN_ID = "mlflow_run_id"
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
#: ``checkpoint.filename`` of the periodic checkpoints (``ModelCheckpoint`` formats it, ``.ckpt`` appended) ...
STEP_FILENAME = "step{step:08d}"
#: ... and the names it gives. Group 1 is the step.
STEP_NAME = re.compile(r"^step(\d{8,})\.ckpt$")
#: The hold of the run folder by the ``fit`` running in it: ``<run>/run.lock`` (JSON: who, since when; its mtime is
#: the holder's heartbeat).
RUN_LOCK = "run.lock"
#: Where a resume moves a damaged checkpoint: ``damaged/`` beside it (same filesystem, so the move is a rename; a
#: sub-folder, so that neither Lightning's ``last*`` nor its ``*ckpt_*`` name scans see it).
DAMAGED_FOLDER = "damaged"
#: Where ``fit --ckpt_path <earlier step>`` moves the checkpoints saved after that step (the abandoned continuation).
SUPERSEDED_FOLDER = "superseded"


def artefact_dir(trainer: Any) -> Path:
    """Where this run's artefacts (config records, grids, metric CSVs) go: the log folder of the run folder
    (``trainer.default_root_dir``), whichever loggers are configured, none included.

    Not ``trainer.log_dir``: that follows the first logger (a W&B logger's ``save_dir``) and is a collective under
    DDP; this is the same on every rank and for every logger.
    """
    return log_dir(trainer.default_root_dir)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The checkpoint folder of a run folder."""
    return Path(run_dir) / CHECKPOINT_FOLDER


def snapshot_dir(run_dir: str | Path) -> Path:
    """The post-hoc EMA snapshot folder of a run folder."""
    return Path(run_dir) / SNAPSHOT_FOLDER


def preemption_path(run_dir: str | Path, number: int) -> Path:
    """The preemption checkpoint number ``number`` of a run folder (a match of :data:`PREEMPTION_NAME`)."""
    return Path(run_dir) / f"hpc_ckpt_{number}.ckpt"


def lock_path(run_dir: str | Path) -> Path:
    """The hold file of a run folder."""
    return Path(run_dir) / RUN_LOCK


def _aside_path(path: Path, folder_name: str, when: float | None) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    folder = path.parent / folder_name
    candidate, number = folder / f"{path.stem}-{stamp}{path.suffix}", 1
    while candidate.exists():
        number += 1
        candidate = folder / f"{path.stem}-{stamp}-{number}{path.suffix}"
    return candidate


def taken_lock_path(run_dir: str | Path, when: float | None = None) -> Path:
    """Where a take-over moves a hold whose job has ended: ``run.lock.taken-<UTC time>-<random>``, a name no other
    contender uses (a rename onto an existing name would replace that file)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    return lock_path(run_dir).with_name(f"{RUN_LOCK}.taken-{stamp}-{secrets.token_hex(6)}")


def takeover_mutex_path(run_dir: str | Path) -> Path:
    """The file a take-over holds while it checks and moves a hold aside: ``run.lock.takeover``."""
    return lock_path(run_dir).with_name(f"{RUN_LOCK}.takeover")


def damaged_path(path: str | Path, when: float | None = None) -> Path:
    """A free name in ``damaged/`` beside ``path`` for a damaged checkpoint set aside: ``<stem>-<UTC time><suffix>``
    (``last-20261207T044100Z.ckpt``), numbered when taken."""
    return _aside_path(Path(path), DAMAGED_FOLDER, when)


def superseded_path(path: str | Path, when: float | None = None) -> Path:
    """A free name in ``superseded/`` beside ``path``, named as :func:`damaged_path`."""
    return _aside_path(Path(path), SUPERSEDED_FOLDER, when)


def earlier_job_path(path: str | Path, when: float | None = None) -> Path:
    """A free name beside ``path`` for the file an earlier job wrote there: ``<stem>-<UTC time><suffix>``
    (``metrics-20261207T061400Z.csv``), numbered when taken."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    candidate, number = path.with_name(f"{path.stem}-{stamp}{path.suffix}"), 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{stamp}-{number}{path.suffix}")
    return candidate


def log_dir(run_dir: str | Path) -> Path:
    """The log folder of a run folder (the kit's artefacts; the TensorBoard and CSV loggers', pinned)."""
    return Path(run_dir) / LOG_VERSION


def logger_id_path(run_dir: str | Path, name: str) -> Path:
    """The file of a run folder that pins a logger's run id (:data:`WANDB_ID`, :data:`MLFLOW_RUN_ID`)."""
    if name not in (WANDB_ID, MLFLOW_RUN_ID):
        raise ValueError(f"no logger id file named {name!r}; one of {WANDB_ID}, {MLFLOW_RUN_ID}")
    return Path(run_dir) / name


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
