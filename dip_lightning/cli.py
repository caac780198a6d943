"""`python -m dip_lightning fit|validate|test|predict --config experiments/<exp>.yaml`.

A thin :class:`LightningCLI` subclass. What it adds, and why:

* one fixed run folder per experiment (``trainer.default_root_dir``): TensorBoard logs under ``<run>/tensorboard``
  (pinned version, so a requeued job appends instead of opening ``version_N+1``), checkpoints under
  ``<run>/checkpoints``, the parsed config written (and overwritten on requeue) next to the logs;
* automatic resume for ``fit``: explicit ``--ckpt_path`` > newest SLURM preemption checkpoint > ``last.ckpt`` >
  fresh start, said in one log line;
* SLURM auto-requeue only when SLURM is detected (never on a laptop), with a configurable signal;
* a fixed default seed, so a requeued job does not draw a new one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

from dip_lightning.diffusion import ODESampler
from dip_lightning.module import DiPModule

# Samplers are dataclasses; let YAML pick any subclass (`class_path: dip_lightning.diffusion.HeunSampler`).
set_parsing_settings(subclasses_enabled=[ODESampler])

DEFAULT_RUN_DIR = "runs/default"


def find_resume_checkpoint(run_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None) -> Path | None:
    """Newest preemption checkpoint (``hpc_ckpt_N.ckpt`` in the run folder), else ``last.ckpt``, else None."""
    run_dir = Path(run_dir)
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if hpc:
        return hpc[-1]
    last = Path(checkpoint_dir or run_dir / "checkpoints") / "last.ckpt"
    return last if last.exists() else None


class DiPCLI(LightningCLI):
    """LightningCLI for DiP: model = :class:`DiPModule`, data = any LightningDataModule (``class_path``)."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        torch.set_float32_matmul_precision("high")
        super().__init__(
            model_class=DiPModule,
            datamodule_class=LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,
            parser_kwargs={"parser_mode": "yaml"},
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A checkpoint callback that is always there (and configurable as `checkpoint.*`), writing into the run folder.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.save_top_k": -1,
                "checkpoint.filename": "step{step:08d}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.default_root_dir": DEFAULT_RUN_DIR,
            }
        )
        parser.add_argument(
            "--requeue_signal",
            type=str,
            default="SIGUSR1",
            help="Signal on which a SLURM job saves and requeues itself (SIGUSR2 where NCCL takes SIGUSR1).",
        )

    # ------------------------------------------------------------------ run folder, logger, SLURM
    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        run_dir = Path(config.trainer.default_root_dir)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(run_dir / "checkpoints")
        if config.trainer.logger in (None, True):
            # Pinned version: every (re)started job of this run logs to the same folder.
            config.trainer.logger = {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir), "name": "", "version": "tensorboard"},
            }

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self._subconfig()
        if SLURMEnvironment.detect():
            plugins = list(kwargs.get("plugins") or [])
            sig = getattr(signal, config.requeue_signal)
            plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=sig))
            kwargs["plugins"] = plugins
            rank_zero_info(f"SLURM detected: auto-requeue on {config.requeue_signal}.")
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------ resume
    def before_fit(self) -> None:
        config = self.config_init["fit"]
        if config.get("ckpt_path"):
            rank_zero_info(f"Resume: from --ckpt_path {config['ckpt_path']}.")
            return
        found = find_resume_checkpoint(self.trainer.default_root_dir, self.trainer.checkpoint_callback.dirpath)
        if found is None:
            rank_zero_info(f"Resume: no checkpoint in {self.trainer.default_root_dir}; starting fresh.")
            return
        rank_zero_info(f"Resume: from {found}.")
        config["ckpt_path"] = str(found)


def logger_dir(trainer: Any) -> Path:
    """The folder where this run's logs and artefacts (grids, FID csv) go."""
    logger = trainer.logger
    if isinstance(logger, TensorBoardLogger):
        return Path(logger.log_dir)
    return Path(trainer.default_root_dir)


def cli_main(args: list[str] | None = None) -> DiPCLI:
    """Entry point used by ``python -m dip_lightning``."""
    return DiPCLI(args=args)
