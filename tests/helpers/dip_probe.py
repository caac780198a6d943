"""Test-only instruments for DiP resume tests, for in-process tests and CLI runs
(``--trainer.callbacks+=tests.helpers.dip_probe.ResumeProbe`` with the repository on PYTHONPATH).

* :class:`ResumeProbe` prints the lines the SLURM tests wait for, records what every step saw, dumps the final
  state (raw weights, EMA weights, optimizer state) and can send itself a signal or hold at a step until one
  arrives. None of it changes the training computation.
* :class:`LaunchReport` writes down, per rank and job, what Lightning derived from the launcher's environment
  (ranks, world size, node rank, rendezvous address and port) next to that environment, for the SLURM tests.
* :class:`SlowSaveCheckpointIO` is the kit's :class:`~dip_lightning.checkpoint.io.AtomicCheckpointIO` with one
  save stalled halfway through writing, so a test can ``kill -9`` the process in the middle of a real save.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from dip_lightning.checkpoint.io import AtomicCheckpointIO
from dip_lightning.core.compat import average_model
from dip_lightning.training.callbacks.ema import find_ema
from dip_lightning.training.callbacks.preemption import PreemptionGuard


def _guard(trainer: pl.Trainer) -> PreemptionGuard | None:
    return next((c for c in trainer.callbacks if isinstance(c, PreemptionGuard)), None)


class ResumeProbe(pl.Callback):
    """Observe a training run for resume tests.

    Args:
        out_dir: where ``steps_rank{R}.jsonl`` (one line per optimizer step: step, epoch, labels) and, at
            ``max_steps``, ``final_rank{R}.pt`` (raw weights, the first EMA's state_dict, every further EMA
            decay's weights, optimizer state, step) are written.
        progress_every: rank 0 prints ``PROGRESS global_step=N`` every N steps (0: never).
        signal_at_step: send ``signal_name`` to this process while the step that starts at this
            ``global_step`` runs (from a thread, ``signal_delay`` s after the batch start: it lands mid-step; the
            step's end waits for it).
        signal_rank: only this rank signals itself (None: every rank).
        hold_at_step: in the first job of a SLURM job (``SLURM_RESTART_COUNT`` unset or 0), wait at the end of
            this step until the preemption guard has received a signal (at most ``hold_timeout`` s), so that
            a test's ``scancel -s USR1`` lands before training can finish.
        step_sleep: seconds of sleep per step (makes a job last; no effect on the weights).
        late_worker: make this DataLoader worker start ``late_worker_delay`` s late (a busy machine), to show
            that the data stream does not depend on worker timing.
    """

    def __init__(
        self,
        out_dir: str | None = None,
        progress_every: int = 0,
        signal_at_step: int | None = None,
        signal_name: str = "SIGTERM",
        signal_rank: int | None = None,
        signal_delay: float = 0.05,
        hold_at_step: int | None = None,
        hold_timeout: float = 120.0,
        step_sleep: float = 0.0,
        late_worker: int | None = None,
        late_worker_delay: float = 1.5,
    ) -> None:
        self.out_dir = Path(out_dir) if out_dir else None
        self.progress_every = progress_every
        self.signal_at_step = signal_at_step
        self.signal_name = signal_name
        self.signal_rank = signal_rank
        self.signal_delay = signal_delay
        self.hold_at_step = hold_at_step
        self.hold_timeout = hold_timeout
        self.step_sleep = step_sleep
        self.late_worker = late_worker
        self.late_worker_delay = late_worker_delay
        self.records: list[dict[str, Any]] = []
        self._step_at_start = -1
        self._signal_timer: threading.Timer | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if self.late_worker is None or datamodule is None:
            return
        make_loader = datamodule.train_dataloader
        late = _LateWorker(self.late_worker, self.late_worker_delay)

        def train_dataloader() -> Any:  # the loader is built after this hook; its workers start later still
            loader = make_loader()
            loader.worker_init_fn = late
            return loader

        datamodule.train_dataloader = train_dataloader

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        rank, step = trainer.global_rank, trainer.global_step
        print(f"TRAINING STARTED rank={rank} global_step={step} restart_count={restarts}", flush=True)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_start = trainer.global_step
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if (
            self.signal_at_step is not None
            and trainer.global_step == self.signal_at_step
            and (self.signal_rank is None or self.signal_rank == trainer.global_rank)
        ):
            sig = signal.Signals[self.signal_name]
            self._signal_timer = threading.Timer(self.signal_delay, os.kill, args=(os.getpid(), sig))
            self._signal_timer.daemon = True
            self._signal_timer.start()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._signal_timer is not None:
            # A step shorter than signal_delay (an idle machine, a tiny net) must not carry the signal past the
            # last step: the signal is sent before this step ends (the main thread runs its handler on waking).
            self._signal_timer.join()
            self._signal_timer = None
        step = trainer.global_step
        record = {
            "step": step,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "labels": batch[1].tolist(),
        }
        self.records.append(record)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / f"steps_rank{trainer.global_rank}.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.progress_every and trainer.global_rank == 0 and step % self.progress_every == 0:
            print(f"PROGRESS global_step={step}", flush=True)
        if self.hold_at_step is not None and step == self.hold_at_step:
            self._hold(trainer)
        if step == trainer.max_steps and step != self._step_at_start:
            self._dump(trainer, pl_module)

    def _hold(self, trainer: pl.Trainer) -> None:
        if os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
            return
        guard = _guard(trainer)
        print(f"HOLDING rank={trainer.global_rank} global_step={trainer.global_step}", flush=True)
        deadline = time.monotonic() + self.hold_timeout
        while guard is not None and not guard.pending and time.monotonic() < deadline:
            time.sleep(0.02)

    def _dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out_dir is None:
            return
        ema = find_ema(trainer)
        state = {
            "global_step": trainer.global_step,
            "raw": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "ema": None,
            "optimizer": trainer.optimizers[0].state_dict(),
        }
        if ema is not None and average_model(ema) is not None:
            state["ema"] = {k: v.detach().cpu().clone() for k, v in average_model(ema).state_dict().items()}
            # Every further decay's average, by decay.
            state["further_emas"] = {
                decay: {k: v.detach().cpu().clone() for k, v in weights.items()}
                for decay, weights in list(ema.averages().items())[1:]
            }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out_dir / f"final_rank{trainer.global_rank}.pt")
        print(f"FINAL STATE SAVED rank={trainer.global_rank} global_step={trainer.global_step}", flush=True)


# The launcher's variables a LaunchReport records (SLURM's, and those the batch template sets).
LAUNCH_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_RESTART_COUNT",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_NNODES",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
)


class LaunchReport(pl.Callback):
    """At fit setup (process group up, before any step) write ``launch_rank{R}_restart{C}.json`` to ``out_dir``.

    The report holds what Lightning made of the launch (cluster environment, ranks, world size, node rank,
    rendezvous address and port, the address that name resolves to on this node), what torch.distributed
    agreed on, and the raw launcher variables, so a test can check one against the other. Observes only.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        env = getattr(trainer.strategy, "cluster_environment", None)
        nodelist = os.environ.get("SLURM_NODELIST", "")
        report: dict[str, Any] = {
            "hostname": socket.gethostname(),
            "hostname_address": socket.gethostbyname(socket.gethostname()),
            "cluster_environment": type(env).__name__,
            "strategy": type(trainer.strategy).__name__,
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "num_devices": trainer.num_devices,
            "root_device": str(trainer.strategy.root_device),
            "main_address": env.main_address if env is not None else None,
            "main_port": env.main_port if env is not None else None,
            # What Lightning takes from the node list when MASTER_ADDR is not set.
            "nodelist_root": SLURMEnvironment.resolve_root_node_address(nodelist) if nodelist else None,
            "torch_threads": torch.get_num_threads(),
            "env": {key: os.environ.get(key) for key in LAUNCH_VARIABLES},
        }
        if env is not None:
            report["main_address_resolved"] = socket.gethostbyname(env.main_address)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            report["dist"] = {
                "rank": torch.distributed.get_rank(),
                "world_size": torch.distributed.get_world_size(),
                "backend": torch.distributed.get_backend(),
            }
        restarts = os.environ.get("SLURM_RESTART_COUNT") or "0"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"launch_rank{trainer.global_rank}_restart{restarts}.json"
        path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")


class _LateWorker:
    """``worker_init_fn`` that sleeps in one worker (picklable, for any multiprocessing start method)."""

    def __init__(self, worker: int, delay: float) -> None:
        self.worker, self.delay = worker, delay

    def __call__(self, worker_id: int) -> None:
        if worker_id == self.worker:
            time.sleep(self.delay)


class SlowSaveCheckpointIO(AtomicCheckpointIO):
    """Atomic saves, but save number ``stall_save`` writes half its bytes, creates ``marker`` and sleeps.

    The write goes through the real save path (temporary file in ``.partial/``, fsync, rename), so killing the
    process while it sleeps is a kill in the middle of a checkpoint save.
    """

    def __init__(self, marker: str, stall_save: int = 2, stall_seconds: float = 600.0) -> None:
        super().__init__()
        self.marker = Path(marker)
        self.stall_save = stall_save
        self.stall_seconds = stall_seconds
        self.saves = 0

    def _write(self, checkpoint: dict[str, Any], fh: Any) -> None:
        self.saves += 1
        if self.saves != self.stall_save:
            super()._write(checkpoint, fh)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        self.marker.write_text(f"{fh.name}\n")
        time.sleep(self.stall_seconds)
        fh.write(data[len(data) // 2 :])
