"""The run folder: one fixed folder per experiment (``trainer.default_root_dir``) and what lives in it.

::

    <run>/                      trainer.default_root_dir
      tensorboard/              logs, config.yaml, experiment.json, grids/step_XXXXXXXX.png, eval_metrics.csv
                                (artefact_dir)
      checkpoints/              step########.ckpt, last.ckpt
      phema/                    phema-########.pt post-hoc EMA snapshots (PowerFunctionEMA)
      hpc_ckpt_N.ckpt           preemption checkpoints (Lightning's name, so plain Lightning finds them too)

The logger's version is pinned to ``tensorboard``, so a requeued job appends to the same folder instead of
opening ``version_N+1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_RUN_DIR", "EXPERIMENT_RECORD", "LOG_VERSION", "artefact_dir", "checkpoint_dir"]

DEFAULT_RUN_DIR = "runs/default"
LOG_VERSION = "tensorboard"
#: In the artefact folder: the ``--config`` files (path and text) and the command line of the latest ``fit`` job.
EXPERIMENT_RECORD = "experiment.json"


def artefact_dir(trainer: Any) -> Path:
    """Where this run's logs and artefacts (grids, metric CSVs) go: the logger's folder, else the run folder.

    Reads the logger's own attribute, not ``trainer.log_dir`` (a collective under DDP), so any rank may call it.
    """
    logger = getattr(trainer, "logger", None)
    log_dir = getattr(logger, "log_dir", None)
    return Path(log_dir) if log_dir else Path(trainer.default_root_dir)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The checkpoint folder of a run folder."""
    return Path(run_dir) / "checkpoints"
