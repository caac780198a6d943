"""Any Lightning logger, one run folder: where each logger writes, which run a requeued job continues, and how an
image reaches each logger.

:func:`place_loggers` rewrites the ``trainer.logger`` config before the loggers are built, so that a resumed run stays
in its run folder whatever logs it:

- ``TensorBoardLogger``, ``CSVLogger`` (and subclasses) with no ``version`` of their own: ``save_dir`` = the run
  folder, ``name`` empty, ``version`` = :data:`~dip_lightning.checkpoint.run_folder.LOG_VERSION`, i.e. the run's
  log folder ``<run>/tensorboard`` (no ``version_0``/``version_1`` split on resume). A pinned ``version`` is left as
  it is.
- ``WandbLogger``: local files under the run folder (unless ``save_dir``/``dir`` is given), the W&B run id pinned in
  ``<run>/wandb_id`` (chosen by the first job, read by every later one; unless ``id``/``version`` is given) and
  ``resume="allow"``, so a requeued job continues the same W&B run.
- ``MLFlowLogger``: a local file store ``<run>/mlruns`` when neither ``tracking_uri`` nor ``save_dir`` is set
  (without a tracking URI, ``MLFLOW_ALLOW_FILE_STORE=true`` unless the environment says otherwise); the run id
  the first job recorded in ``<run>/mlflow_run_id`` (:class:`RecordLoggerRuns`) is passed to later ones.

:func:`log_image` sends an image through each logger's own image API (TensorBoard ``add_image``, W&B
``log_image``, MLflow ``log_image``); the kit's callbacks also write every image as a PNG in the run folder.
"""

from __future__ import annotations

import importlib
import os
import re
import secrets
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from dip_lightning.checkpoint.run_folder import (
    CSV_LOGGER_METRICS,
    LOG_VERSION,
    MLFLOW_RUN_ID,
    WANDB_ID,
    earlier_job_path,
    logger_id_path,
)
from dip_lightning.core.atomic import write_once
from dip_lightning.core.errors import MissingExtraError

__all__ = [
    "RecordLoggerRuns",
    "default_logger",
    "keep_csv_metrics",
    "log_image",
    "place_loggers",
    "wandb_run_id",
]

#: ``MLFlowLogger``'s default ``save_dir``: a file store relative to the working directory.
MLFLOW_DEFAULT_SAVE_DIR = "./mlruns"
#: The environment variable through which MLflow 3 accepts a local file store.
MLFLOW_FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"


def default_logger(run_dir: str | Path) -> dict[str, Any]:
    """The logger when the config names none: TensorBoard in the run's log folder."""
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": "", "version": LOG_VERSION},
    }


def wandb_run_id(run_dir: str | Path) -> str:
    """The W&B run id of a run folder: the one its first job chose (``<run>/wandb_id``), else a new one, written."""
    # W&B ids: lowercase letters and digits (8 of them is what wandb itself generates).
    return write_once(logger_id_path(run_dir, WANDB_ID), secrets.token_hex(4) + "\n").strip()


def place_loggers(logger_config: Any, run_dir: str | Path) -> Any:
    """The ``trainer.logger`` config with every logger placed in the run folder (module docstring); ``None`` or
    ``True`` gives :func:`default_logger`, ``False`` stays off. Entries that are built objects are left alone."""
    if logger_config is None or logger_config is True:
        return default_logger(run_dir)
    if logger_config is False:
        return logger_config
    entries = logger_config if isinstance(logger_config, (list, tuple)) else [logger_config]
    for entry in entries:
        _place(entry, Path(run_dir))
    return logger_config


def _logger_class(entry: Any) -> type | None:
    class_path = entry.get("class_path") if hasattr(entry, "get") else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse reports it when it builds the class
    return cls if isinstance(cls, type) else None


def _place_file_logger(init: Any, run_dir: Path) -> None:
    if init.get("version") is None:  # a pinned version is the user's choice
        init["save_dir"], init["name"], init["version"] = str(run_dir), "", LOG_VERSION


def _require(module: str, logger: str, extra: str) -> None:
    """A missing logger package as the kit's one-line error naming the extra, before anything is written."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{logger} needs the {module} package, an optional extra of the kit: pip install 'dip-lightning[{extra}]'"
        ) from err


def _place_wandb(init: Any, run_dir: Path) -> None:
    _require("wandb", "WandbLogger", "wandb")
    if init.get("save_dir") in (None, ".") and init.get("dir") is None:
        init["save_dir"] = str(run_dir)
    if init.get("id") is None and init.get("version") is None:
        init["id"] = wandb_run_id(run_dir)
    if init.get("resume") is None:
        init["resume"] = "allow"  # the pinned id names a run that may already exist


def _place_mlflow(init: Any, run_dir: Path) -> None:
    _require("mlflow", "MLFlowLogger", "mlflow")
    if not init.get("tracking_uri"):
        if init.get("save_dir") in (None, MLFLOW_DEFAULT_SAVE_DIR):
            init["save_dir"] = str(run_dir / "mlruns")
        # MLflow 3 refuses its file store unless asked for; the kit asks only when no tracking URI was given
        # (mlflow-skinny has no database backend to offer instead).
        os.environ.setdefault(MLFLOW_FILE_STORE_OPT_IN, "true")
    recorded = logger_id_path(run_dir, MLFLOW_RUN_ID)
    if init.get("run_id") is None and recorded.is_file():
        init["run_id"] = recorded.read_text(encoding="utf-8").strip()


#: How each kind of logger is placed in the run folder (the first class an entry's class derives from).
_PLACERS = (
    ((TensorBoardLogger, CSVLogger), _place_file_logger),
    ((WandbLogger,), _place_wandb),
    ((MLFlowLogger,), _place_mlflow),
)


def _place(entry: Any, run_dir: Path) -> None:
    cls = _logger_class(entry)
    placer = next((p for bases, p in _PLACERS if cls is not None and issubclass(cls, bases)), None)
    if placer is None:
        return
    if entry.get("init_args") is None:
        entry["init_args"] = {}
    placer(entry["init_args"], run_dir)


def keep_csv_metrics(loggers: Iterable[Logger]) -> list[tuple[Path, Path]]:
    """Set aside the ``metrics.csv`` an earlier job of the run left in a CSVLogger's folder, as
    ``metrics-<UTC time>.csv`` beside it, before the logger starts (a CSVLogger deletes the file it finds); returns
    ``(old, new)`` pairs. Call it on one process, holding the run folder."""
    moved = []
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / CSV_LOGGER_METRICS
        # "Previous log files ... will be deleted": no longer true, and the folder is not empty by design.
        warnings.filterwarnings(
            "ignore", message=re.escape(f"Experiment logs directory {logger.log_dir} exists and is not empty")
        )
        if path.is_file():
            aside = earlier_job_path(path)
            path.rename(aside)
            moved.append((path, aside))
    return moved


class RecordLoggerRuns(Callback):
    """Records the run id of each MLflow logger in the run folder (``<run>/mlflow_run_id``, once: global rank 0, at
    setup), so that :func:`place_loggers` continues the same MLflow run in a requeued job. MLflow chooses its run
    ids itself; W&B ids are chosen by the kit before the logger is built."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and logger.run_id:
                write_once(logger_id_path(trainer.default_root_dir, MLFLOW_RUN_ID), logger.run_id + "\n")


def log_image(
    loggers: Iterable[Logger], key: str, image: torch.Tensor, step: int, caption: str | None = None
) -> list[Logger]:
    """Send a uint8 (C, H, W) image to every logger that takes images, through its own API; returns those loggers.

    Loggers without an image API (CSV) are skipped: the PNG in the run folder is the record for them.
    """
    hwc = image.permute(1, 2, 0).contiguous().cpu().numpy()
    sent = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="CHW")
            if caption:
                logger.experiment.add_text(f"{key}_caption", caption, global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[hwc], step=step, **({"caption": [caption]} if caption else {}))
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, hwc, artifact_file=f"{key}/step_{step:08d}.png")
        else:
            continue
        sent.append(logger)
    return sent
