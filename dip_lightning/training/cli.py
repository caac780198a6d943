"""``python -m dip_lightning fit|validate|test|predict --config experiments/<exp>.yaml``: LightningCLI for DiP.

What it adds to LightningCLI, so that a cluster job can be killed and requeued at any time: one fixed run folder
per experiment (logs, checkpoints, config and ``experiment.json`` with the ``--config`` files' text), held by one
``fit`` at a time; automatic resume (``--ckpt_path``, else the newest complete checkpoint, damaged ones set aside;
checked against the model before anything is written); atomic checkpoints; a preemption guard and SLURM
auto-requeue; a per-job ``max_time``; a fixed default seed; a progress bar that does not synchronise with the GPU;
``fit --init_from`` (weights only); ``--weights`` for the checkpoint-driven commands
(:class:`~dip_lightning.checkpoint.format.WeightRequest`).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionYesNo
from jsonargparse.typing import PositiveFloat
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, Timer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dip_lightning.checkpoint.compatibility import check_compatible
from dip_lightning.checkpoint.format import ACCEPTED_FORMS, DEFAULT_WEIGHTS, WeightRequest
from dip_lightning.checkpoint.io import AtomicCheckpointIO, clean_partial_files, peek_checkpoint
from dip_lightning.checkpoint.resume import (
    ResumeDecision,
    optimizer_setting_changes,
    resolve_resume,
    supersede_newer,
)
from dip_lightning.checkpoint.run_folder import (
    CONFIG_RECORD,
    DEFAULT_RUN_DIR,
    EXPERIMENT_RECORD,
    STEP_FILENAME,
    artefact_dir,
    checkpoint_dir,
)
from dip_lightning.checkpoint.run_lock import DEFAULT_STALE_AFTER, RunLock
from dip_lightning.checkpoint.stored_config import check_checkpoint_config
from dip_lightning.core.atomic import atomic_write_json
from dip_lightning.core.distributed import launch_place
from dip_lightning.core.errors import ConfigError, KitError, exception_chain
from dip_lightning.core.recipes import with_recipe_paths
from dip_lightning.training.callbacks.launched_ranks import StopLaunchedRanks
from dip_lightning.training.callbacks.loss_spike import fit_with_rollbacks
from dip_lightning.training.callbacks.monitor import TrainingMonitor
from dip_lightning.training.callbacks.preemption import PerJobTimer, PreemptionGuard
from dip_lightning.training.callbacks.progress import RichProgress
from dip_lightning.training.init_from import init_from_checkpoint
from dip_lightning.training.loggers import RecordLoggerRuns, keep_csv_metrics, place_loggers

# Importing the module also enables sampler subclasses in YAML (see dip_lightning.training.module).
from dip_lightning.training.module import DiPModule


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


#: Values that data and model share, set once in the model's config and linked into the data's.
MODEL_TO_DATA = {
    "model.net.init_args.num_classes": "data.init_args.num_classes",
    "model.net.init_args.input_size": "data.init_args.image_size",
}


#: The network's patch size, linked into the REPA encoder's (which must give one feature per DiT token).
PATCH_SIZE_TO_REPA = (
    "model.net.init_args.patch_size",
    "model.repa.init_args.encoder.init_args.dit_patch_size",
)


def config_sources(config: Any) -> list[dict[str, str]]:
    """The ``--config`` files of a parsed config, in order: ``{"path": as given, "absolute": where it was found,
    "text": its text}`` each.

    A ``--config`` given as an inline YAML string, or a file that can no longer be read, is left out.
    """
    sources = []
    for entry in _as_list(config.get("config") if hasattr(config, "get") else None):
        if entry is None:
            continue
        # jsonargparse's Path: `relative` is the path as given, `absolute` where it was found.
        given = str(getattr(entry, "relative", entry))
        found = str(getattr(entry, "absolute", entry))
        try:
            text = Path(found).read_text(encoding="utf-8")
        except (OSError, TypeError, ValueError):
            continue
        sources.append({"path": given, "absolute": found, "text": text})
    return sources


class RecordingSaveConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` writer, plus ``experiment.json`` beside it (rank 0, atomic, rewritten by
    each job as ``config.yaml`` is): the ``--config`` files with their text and the command line. Both go to the
    run's log folder whatever the loggers (:func:`~dip_lightning.checkpoint.run_folder.artefact_dir`).

    The parsed ``config.yaml`` holds every value but not which experiment file and overlays produced them, nor
    their comments (a ``# Reproduces:`` line); reports need both.
    """

    def __init__(self, *args: Any, argv: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.argv = list(argv) if argv is not None else None

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Into the run's log folder, not LightningCLI's trainer.log_dir (that follows the first logger).
        folder = artefact_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config,
            folder / self.config_filename,
            skip_none=False,
            overwrite=True,
            multifile=self.multifile,
        )
        record = {"configs": config_sources(self.config), "argv": self.argv}
        atomic_write_json(folder / EXPERIMENT_RECORD, record)


def refusal_reasons(err: BaseException) -> str:
    """What a constructor said when jsonargparse could not build a class: the kit's own message where the chain holds
    one, else the reasons jsonargparse lists (without its "Expected a NoneType" alternatives)."""
    kit = next((e for e in exception_chain(err) if isinstance(e, KitError)), None)
    if kit is not None:
        return str(kit)
    text = str(err)
    reasons = [
        line.strip()[2:]
        for line in text.partition("Errors:")[2].splitlines()
        if line.strip().startswith("- ") and "NoneType" not in line
    ]
    return "; ".join(reasons) if reasons else text.splitlines()[0]


class KitArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors show one usage line: jsonargparse printed every option (about 90 lines)
    above the error itself; its tip to run ``--help`` follows the line."""

    def print_usage(self, file: Any = None) -> None:
        (file or sys.stdout).write(f"usage: {self.prog.replace(' [options]', '')} [options]\n")


class DiPCLI(LightningCLI):
    """LightningCLI for DiP: model = :class:`DiPModule`, data = any LightningDataModule (``class_path``)."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        torch.set_float32_matmul_precision("high")
        argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else sys.argv[1:]
        self.run_lock: RunLock | None = None  # fit's hold of the run folder (before_fit), released below
        try:
            super().__init__(
                model_class=DiPModule,
                datamodule_class=LightningDataModule,
                subclass_mode_data=True,
                save_config_callback=RecordingSaveConfig,
                save_config_kwargs={
                    "overwrite": True,
                    "argv": argv,
                    "config_filename": CONFIG_RECORD,
                    "save_to_log_dir": False,  # save_config writes it (rank 0)
                },
                seed_everything_default=0,
                auto_configure_optimizers=False,
                parser_class=KitArgumentParser,
                # allow_abbrev off: argparse took a typo such as --trainer.max_step for --trainer.max_steps.
                parser_kwargs={
                    "parser_mode": "yaml",
                    "prog": "python -m dip_lightning",
                    "allow_abbrev": False,
                },
                args=args,
                run=run,
                **kwargs,
            )
        finally:
            # However fit ended: completed, an exception, a signal's TrainingInterrupted (a requeued job takes
            # its own hold back in any case: same owner token).
            if self.run_lock is not None:
                self.run_lock.release()

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's, with ``--config`` taking a shipped recipe's name too (``--config tiny_cpu``).

        A list of arguments is parsed here, not by LightningCLI, which warns whenever ``args`` is given while
        ``sys.argv`` holds anything: the kit's commands (``demo``, ``sample`` ...) build their arguments on
        purpose and the user's command line is theirs."""
        given = sys.argv[1:] if args is None else args
        if isinstance(given, (list, tuple)):
            self.config = parser.parse_args(with_recipe_paths([str(a) for a in given]))
            return
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        _add_run_callbacks(parser)
        # The class count and the image size are the model's; the data follows them (set them once, in
        # model.net). Checkpoint-driven commands (predict/validate --ckpt_path) thereby get matching data too.
        for model_key, data_key in MODEL_TO_DATA.items():
            parser.link_arguments(model_key, data_key)
        # The REPA encoder matches the DiT's token grid: its patch size is the network's, never set apart.
        parser.link_arguments(*PATCH_SIZE_TO_REPA)
        parser.add_argument(
            "--weights",
            type=WeightRequest | None,
            default=None,
            help=f"validate/test/predict: which weights of --ckpt_path: {ACCEPTED_FORMS}. Default: ema.",
        )
        _add_init_from_arguments(parser)
        parser.add_argument(
            "--lock_stale_after",
            type=PositiveFloat,
            default=DEFAULT_STALE_AFTER,
            help="fit: seconds without a heartbeat after which another job may take over the run folder's hold "
            "(the holding fit touches <run>/run.lock every min(60, this/5) s).",
        )

    def _parse_ckpt_path(self) -> None:
        # A private LightningCLI hook (dip_lightning.core.compat): with --ckpt_path it replaces the model config by the
        # checkpoint's hyperparameters. Right for predict/validate/test (the checkpoint defines the model), but a
        # fit would silently drop this run's settings (a new lr, activation checkpointing); there the kit
        # compares the two configs instead (before_fit: check_compatible).
        subcommand = self.config.get("subcommand")
        if subcommand != "fit":
            config = self.config[subcommand] if subcommand else {}
            ckpt_path = config.get("ckpt_path")
            _check_readable_checkpoint(ckpt_path)  # missing or unreadable: the kit's one-line error
            # The names its stored config would make jsonargparse import, checked before they are.
            if ckpt_path and Path(ckpt_path).is_file():
                check_checkpoint_config(ckpt_path, trusted=config.get("weights_only") is False)
            super()._parse_ckpt_path()

    # ------------------------------------------------------------------ run folder, logger, SLURM
    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        run_dir = Path(config.trainer.default_root_dir)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(checkpoint_dir(run_dir))
        # Every (re)started job of this run logs to the same folders and logger runs, whatever the loggers.
        config.trainer.logger = place_loggers(config.trainer.logger, run_dir)

    def instantiate_classes(self) -> None:
        """LightningCLI's, with a class that refuses its options reported as the option error it is (jsonargparse
        wraps a constructor's error in its own "Does not validate ..." text)."""
        try:
            super().instantiate_classes()
        except KitError:
            raise
        except (ValueError, TypeError) as err:
            raise ConfigError(f"the configuration cannot be built: {refusal_reasons(err)}") from err

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer, with atomic checkpoint IO, SLURM auto-requeue (under SLURM only), a per-job timer."""
        config = self._subconfig()
        trainer_init = (
            self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        )
        plugins = _as_list(kwargs.get("plugins", trainer_init.get("plugins")))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            sig = getattr(signal, config.requeue_signal)
            plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=sig))
            rank_zero_info(f"SLURM detected: auto-requeue on {config.requeue_signal}.")
        kwargs["plugins"] = plugins
        max_time = kwargs.get("max_time", trainer_init.get("max_time"))
        callbacks = _as_list(kwargs.get("callbacks", trainer_init.get("callbacks")))
        if max_time is not None and not any(isinstance(c, Timer) for c in callbacks):
            # Lightning's own Timer would add the time of earlier jobs back on resume (see PerJobTimer).
            kwargs["max_time"] = None
            callbacks.append(PerJobTimer(duration=max_time, interval="step"))
        enable_bar = kwargs.get("enable_progress_bar", trainer_init.get("enable_progress_bar"))
        if enable_bar is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            # Rich bars by default (a YAML `trainer.callbacks` entry of any ProgressBar replaces it).
            callbacks.append(RichProgress())
        callbacks.append(StopLaunchedRanks())  # rank 0's failure must not leave the ranks it started waiting
        callbacks.append(RecordLoggerRuns())  # an MLflow run id, for the next job of this run
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------ which weights of a checkpoint
    def _request_weights(self) -> None:
        """``--weights``: which weights of ``--ckpt_path`` the model loads (:attr:`DiPModule.weight_request`)."""
        config = self.config_init[self.subcommand]
        request = config.get("weights")
        if request is None:
            return
        if not config.get("ckpt_path"):
            raise ConfigError("--weights chooses weights of a checkpoint: pass --ckpt_path too.")
        self.model.weight_request = request

    def _before_checkpoint_command(self) -> None:
        if launch_place().rank == 0:
            keep_csv_metrics(self.trainer.loggers)
        self._request_weights()

    before_validate = before_test = before_predict = _before_checkpoint_command

    def fit(self, model: Any, **kwargs: Any) -> None:
        """``trainer.fit``, continued after each rollback a ``LossSpikeGuard`` asks for."""
        fit_with_rollbacks(self.trainer, model, **kwargs)

    # ------------------------------------------------------------------ resume
    def before_fit(self) -> None:
        """Pick the checkpoint to continue from and check it fits this model, before anything is written."""
        config = self.config_init["fit"]
        _check_fit_weight_options(config)
        explicit = config.get("ckpt_path")
        if explicit not in (None, "last", "hpc", "best") and not Path(explicit).is_file():
            raise FileNotFoundError(f"--ckpt_path {explicit}: no such checkpoint file")
        self._hold_run_folder(config.get("lock_stale_after", DEFAULT_STALE_AFTER))
        if launch_place().rank == 0:  # the earlier jobs' CSV scalars, which a CSVLogger would delete
            keep_csv_metrics(self.trainer.loggers)
        if explicit in ("last", "hpc", "best"):  # Lightning's own keywords: its rules apply
            rank_zero_info(f"Resume: --ckpt_path {explicit} (resolved by Lightning).")
            return
        self._clean_interrupted_saves()
        weights_only = config.get("weights_only") is not False  # torch's default, as Lightning's load
        decision = self._resume_decision(explicit, weights_only)
        if decision.path is not None:
            config["ckpt_path"] = str(decision.path)
        for old, new, why in decision.set_aside:
            rank_zero_warn(
                f"Damaged checkpoint {old} ({why}) set aside as {new}; resuming from the next one."
            )
        rank_zero_info(decision.message())
        if explicit and decision.step is not None:
            self._supersede_newer(decision.step, weights_only)
        if config.get("init_from"):
            self._init_from(config, explicit, resuming=decision.path is not None, weights_only=weights_only)

    def _hold_run_folder(self, stale_after: float) -> None:
        """One fit per run folder (:class:`RunLock`): rank 0 takes the hold, the other ranks check it is their
        job's. Before anything is written into the folder."""
        run_dir = str(self.trainer.default_root_dir)
        if "://" in run_dir:
            rank_zero_info(f"Run folder: {run_dir} is remote; not held (one fit per folder is up to you).")
            return
        lock = RunLock(run_dir, stale_after=stale_after)
        place = launch_place()
        # A parent process on node NODE_RANK > 0 (Lightning's launcher across nodes) is not rank 0.
        if place.rank != 0 or (place.world_size == 1 and os.environ.get("NODE_RANK", "0") not in ("", "0")):
            lock.verify(place.rank)
            return
        rank_zero_info(lock.acquire())
        self.run_lock = lock

    def _supersede_newer(self, step: int, weights_only: bool) -> None:
        """``--ckpt_path`` at an earlier step of this run: its later checkpoints go to ``superseded/`` (rank 0),
        so that a later resume continues this fit, not the abandoned one."""
        if launch_place().rank != 0:
            return
        run_dir = Path(self.trainer.default_root_dir)
        folder = self._checkpoint_folder() or checkpoint_dir(run_dir)
        for old, new in supersede_newer(run_dir, folder, step, weights_only):
            rank_zero_warn(f"{old} is after --ckpt_path's step {step}: moved to {new}.")

    def _checkpoint_folder(self) -> str | None:
        return getattr(self.trainer.checkpoint_callback, "dirpath", None)

    def _clean_interrupted_saves(self) -> None:
        """Rank 0 deletes the leftovers of saves that were killed midway; no save can be running yet."""
        if launch_place().rank != 0:
            return
        run_dir = Path(self.trainer.default_root_dir)
        removed = clean_partial_files({run_dir, Path(self._checkpoint_folder() or checkpoint_dir(run_dir))})
        if removed:
            rank_zero_info(f"Removed {len(removed)} unfinished checkpoint file(s) of an interrupted save.")

    def _resume_decision(self, explicit: str | None, weights_only: bool) -> ResumeDecision:
        """Where ``fit`` continues from (:func:`resolve_resume`), checked against this model
        (:func:`check_compatible`), with the settings this run changes."""
        checkpoints = self._checkpoint_folder()
        run_dir = Path(self.trainer.default_root_dir)
        decision = resolve_resume(
            run_dir,
            checkpoints,
            explicit=explicit,
            weights_only=weights_only,
            move_damaged=launch_place().rank == 0,
        )
        if decision.path is None:
            return decision
        checkpoint = peek_checkpoint(decision.path, weights_only)
        decision.changed = check_compatible(checkpoint, self.model, decision.path)
        # What DiPModule.on_load_checkpoint will apply to the restored optimizer.
        configured = getattr(self.model, "configured_optimizer", None)
        if configured is not None:
            decision.changed += [str(c) for c in optimizer_setting_changes(checkpoint, configured())]
        if checkpoints is not None:
            # A resumed run's checkpoint folder is not empty by design; Lightning's warning would only alarm.
            warnings.filterwarnings(
                "ignore", message=re.escape(f"Checkpoint directory {checkpoints} exists and is not empty")
            )
        return decision

    def _init_from(self, config: Any, explicit: str | None, resuming: bool, weights_only: bool) -> None:
        """``--init_from``: this run starts from another run's weights, unless it continues its own checkpoint."""
        init_from = config.get("init_from")
        if explicit:
            raise ConfigError(
                "--init_from (weights only, fresh trainer state) and --ckpt_path (continue a run) exclude each "
                "other: choose one."
            )
        if resuming:
            rank_zero_info(f"--init_from {init_from} ignored: the run continues from its own checkpoint.")
            return
        if not Path(init_from).is_file():
            raise FileNotFoundError(f"--init_from {init_from}: no such checkpoint file")
        report = init_from_checkpoint(
            self.model,
            init_from,
            patch_embed=config.get("init_patch_embed") or "reinit",
            strict=config.get("init_from_strict") is not False,
            weights=config.get("init_from_weights") or DEFAULT_WEIGHTS,
            weights_only=weights_only,
        )
        rank_zero_info(report.message())


def _add_run_callbacks(parser: LightningArgumentParser) -> None:
    """The callbacks every run has: checkpoints into the run folder (``checkpoint.*``), the preemption guard
    (``preemption.*``, with ``--requeue_signal`` for SLURM) and the training monitors (``monitor.*``)."""
    parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
    parser.add_lightning_class_args(PreemptionGuard, "preemption")
    parser.add_lightning_class_args(TrainingMonitor, "monitor")
    parser.set_defaults(
        {
            "checkpoint.save_last": True,
            "checkpoint.every_n_train_steps": 1000,
            "checkpoint.save_top_k": -1,
            "checkpoint.filename": STEP_FILENAME,
            "checkpoint.auto_insert_metric_name": False,
            # A resumed run writes last.ckpt (and a step file it trains to again) under the same name, never
            # last-v1.ckpt beside a stale last.ckpt: the run folder holds one history.
            "checkpoint.enable_version_counter": False,
            "trainer.default_root_dir": DEFAULT_RUN_DIR,
        }
    )
    parser.add_argument(
        "--requeue_signal",
        type=str,
        default="SIGUSR1",
        help="Signal on which a SLURM job saves and requeues itself (SIGUSR2 where NCCL takes SIGUSR1).",
    )


def _add_init_from_arguments(parser: LightningArgumentParser) -> None:
    """``fit --init_from CKPT`` and how it transfers (:func:`init_from_checkpoint`)."""
    parser.add_argument(
        "--init_from",
        type=str | None,
        default=None,
        help="fit: start from this checkpoint's weights (--init_from_weights), with a fresh trainer state "
        "(step 0, new optimizer); e.g. a 256 px run for a 512 px one. Ignored once the run has its own "
        "checkpoint (a resume wins).",
    )
    parser.add_argument(
        "--init_patch_embed",
        type=str,
        default="reinit",
        help="fit --init_from: the patch embedding when the patch size changed: reinit (new initialisation) or "
        "upsample (each kernel weight spread over the pixels it covers at the new size, divided by their count).",
    )
    parser.add_argument(
        "--init_from_strict",
        action=ActionYesNo(),  # the kit's one boolean style: --x, --x true|false, --no_x (dip_lightning.commands)
        nargs="?",
        default=True,
        help="fit --init_from: any other tensor that does not match is an error (false: it keeps this model's "
        "initialisation, listed in the log).",
    )
    parser.add_argument(
        "--init_from_weights",
        type=WeightRequest | None,
        default=None,
        help=f"fit --init_from: which weights of that checkpoint: {ACCEPTED_FORMS}. Default: ema.",
    )


def _check_fit_weight_options(config: Any) -> None:
    """``--weights`` is not for ``fit``; ``--init_from_weights`` needs ``--init_from``."""
    if config.get("weights") is not None:
        raise ConfigError(
            "--weights chooses the weights validate, test and predict load; fit resumes every EMA (configure "
            "them with the EMA callback's decays), and --init_from_weights chooses those of --init_from."
        )
    if config.get("init_from_weights") is not None and not config.get("init_from"):
        raise ConfigError("--init_from_weights chooses weights of --init_from: pass --init_from too.")


def _check_readable_checkpoint(ckpt_path: str | None) -> None:
    """validate/test/predict ``--ckpt_path``: a missing or unreadable file is the kit's one-line error (a
    :class:`~dip_lightning.checkpoint.io.CheckpointError` naming the file and the fix), before LightningCLI's
    own ``torch.load`` turns it into a miniz error, a ``KeyError`` or an unpickling traceback."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):  # Lightning's keywords
        return
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    peek_checkpoint(ckpt_path, weights_only=True)  # LightningCLI reads it weights-only too


def cli_main(args: list[str] | None = None) -> DiPCLI:
    """Entry point used by ``python -m dip_lightning``."""
    return DiPCLI(args=args)
