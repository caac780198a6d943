"""Preemption: save at a step boundary on SIGUSR1/SIGTERM/SIGINT, requeue under SLURM, continue exactly.

Why not Lightning's own handlers: they save or broadcast *inside* the signal handler, wherever the main thread is;
between the optimizer update and the step increment that stores new weights under the old step (the resumed run
repeats a step), and in DDP the save's barrier can pair with another rank's all-reduce and hang (Lightning issue
#21406). :class:`PreemptionGuard`'s handlers only record the signal; after an optimizer step the ranks agree on
what is pending, all take part in saving a preemption checkpoint in the run folder, rank 0 requeues the SLURM job
for the requeue signal, and the run stops with :class:`TrainingInterrupted`. Long work at a step boundary (the
evaluations of :mod:`~dip_lightning.training.callbacks.evaluation`) calls :meth:`PreemptionGuard.stop_if_signalled`
between its batches, so a signal stops it too. The guard also keeps every rank's global RNG states in the checkpoint.
:class:`PerJobTimer` makes ``max_time`` a per-job budget. Details: docs/design.md.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from datetime import timedelta
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, Timer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dip_lightning.checkpoint.resume import next_preemption_path, prune_preemption_checkpoints
from dip_lightning.core.compat import cluster_environment, restore_sigterm_broadcast, skip_sigterm_broadcast
from dip_lightning.core.distributed import is_distributed
from dip_lightning.core.errors import ConfigError

__all__ = ["PerJobTimer", "PreemptionGuard", "TrainingAborted", "TrainingInterrupted"]


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving a preemption checkpoint.

    A ``SystemExit``: uncaught, the process exits with :attr:`code`, 0 when the SLURM job was requeued (its
    work goes on), else ``128 + signum`` like a process killed by that signal, so wrappers see it did not
    finish.
    """

    def __init__(self, signum: int, step: int, ckpt_path: str, requeued: bool) -> None:
        super().__init__(0 if requeued else 128 + int(signum))
        self.signum = int(signum)
        self.step = step
        self.ckpt_path = ckpt_path
        self.requeued = requeued

    def __str__(self) -> str:
        action = "requeued the SLURM job" if self.requeued else "stopped"
        return (
            f"{signal.Signals(self.signum).name} at step {self.step}: saved {self.ckpt_path} and {action}; "
            "run `fit` again to continue"
        )


class TrainingAborted(SystemExit):
    """A second Ctrl-C: the run stops at once, without waiting for a step boundary or saving.

    Exit code 130 (``128 + SIGINT``), as for the first Ctrl-C, where Lightning would turn a ``KeyboardInterrupt``
    into exit code 1.
    """

    def __init__(self) -> None:
        super().__init__(128 + int(signal.SIGINT))

    def __str__(self) -> str:
        return "second Ctrl-C: aborted at once, without a preemption checkpoint"


def _signum(value: str | int | signal.Signals) -> signal.Signals:
    if isinstance(value, str):
        name = value.upper()
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    return signal.Signals(value)


# -------------------------------------------------------------------------------------------- RNG states
def capture_rng_states() -> dict[str, Any]:
    """This process's global RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states["numpy"] = (
        str(kind),
        torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states`."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


# -------------------------------------------------------------------------------------------- the guard
class PreemptionGuard(Callback):
    """Turn SIGUSR1 (SLURM requeue) / SIGTERM / SIGINT into a checkpoint at the next step boundary, then stop.

    See the module docstring for why and how. The CLI always adds one (configurable as ``preemption.*``).

    Args:
        requeue_signal: the SLURM requeue signal; ``"auto"``: a ``SLURMEnvironment(auto_requeue=True)``'s; None: none.
        stop_signals: signals that save and stop without requeue.
        check_every_n_steps: agree on pending signals every N steps (one all-reduce and sync); a preemption waits <= N.
    """

    def __init__(
        self,
        requeue_signal: str | None = "auto",
        stop_signals: Sequence[str] = ("SIGTERM", "SIGINT"),
        check_every_n_steps: int = 1,
    ) -> None:
        if check_every_n_steps < 1:
            raise ConfigError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.requeue_signal_setting = requeue_signal
        self.stop_signals = [_signum(s) for s in stop_signals]
        self.check_every_n_steps = check_every_n_steps
        self.requeue_signal: signal.Signals | None = None
        self.received: list[signal.Signals] = []  # in arrival order, this process
        self.interrupted: TrainingInterrupted | None = None
        self._active = False
        self._previous: dict[signal.Signals, Any] = {}
        self._step_at_batch_start: int | None = None
        self._pending_rng: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ signal handling
    @property
    def signals(self) -> list[signal.Signals]:
        """The signals this guard handles, in priority order (requeue signal first)."""
        sigs = [self.requeue_signal] if self.requeue_signal is not None else []
        return sigs + [s for s in self.stop_signals if s not in sigs]

    @property
    def pending(self) -> bool:
        """Whether this process has received a handled signal that was not acted on yet."""
        return bool(self.received)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes: only record. Anything else (a save, a collective)
        # could land in the middle of an optimizer step or pair with another rank's all-reduce.
        sig = signal.Signals(signum)
        if not self._active:
            self._delegate(sig, frame)
            return
        if sig == signal.SIGINT and signal.SIGINT in self.received:
            raise TrainingAborted()
        if sig not in self.received:
            self.received.append(sig)

    def _delegate(self, sig: signal.Signals, frame: FrameType | None) -> None:
        """Outside fit: behave like the handler that was there before us."""
        previous = self._previous.get(sig, signal.SIG_DFL)
        if callable(previous):
            previous(sig, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    def _install(self, force: bool = False) -> None:
        """Set our handler for every handled signal; ``force`` sets it again even where Python thinks it is
        ours (native code, e.g. some NCCL builds, may have replaced it underneath)."""
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionGuard: not in the main thread, signal handlers not installed.")
            return
        for sig in self.signals:
            current = signal.getsignal(sig)
            # A guard of an earlier fit in this process may still be installed (Lightning restores it on
            # teardown after an exception): take what it had replaced instead of chaining guards.
            owner = getattr(current, "__self__", None)
            if isinstance(owner, PreemptionGuard):
                if owner is self:
                    if force:
                        signal.signal(sig, self._handler)
                    continue
                current = owner._previous.get(sig, signal.SIG_DFL)
            self._previous.setdefault(sig, current)
            signal.signal(sig, self._handler)

    def _uninstall(self) -> None:
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handler and previous is not None:
                signal.signal(sig, previous)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.requeue_signal_setting == "auto":
            env = cluster_environment(trainer)
            if isinstance(env, SLURMEnvironment) and env.auto_requeue:
                self.requeue_signal = _signum(env.requeue_signal or signal.SIGUSR1)
        elif self.requeue_signal_setting is not None:
            self.requeue_signal = _signum(self.requeue_signal_setting)
        self.received = []
        self.interrupted = None
        self._active = True
        # Before Trainer._run registers Lightning's handlers: its SLURM handler then sees ours and stays out.
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has registered its SIGTERM handler (always) in between; take SIGTERM back.
        self._install(force=True)
        if signal.SIGTERM in self.signals:
            # In DDP Lightning (2.6) broadcasts its SIGTERM flag and reads it back (`.item()`) before every
            # training step: a collective and a host-device sync per step. With SIGTERM ours that flag is never
            # set (the ranks agree on signals in on_train_batch_end instead), so the broadcast is skipped.
            skip_sigterm_broadcast(trainer)
        if self._pending_rng is not None:
            rng, self._pending_rng = self._pending_rng, None
            if len(rng) == trainer.world_size:
                restore_rng_states(rng[trainer.global_rank])
            else:
                rank_zero_warn(
                    f"The checkpoint holds RNG states of {len(rng)} ranks, this run has "
                    f"{trainer.world_size}: global RNGs not restored (training noise and data do not "
                    "depend on them)."
                )
        names = ", ".join(s.name for s in self.signals)
        action = f"requeue on {self.requeue_signal.name}" if self.requeue_signal else "no requeue"
        rank_zero_info(f"Preemption guard: {names} save at the next step boundary ({action}).")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._step_at_batch_start:
            return  # accumulating gradients: not a step boundary
        if step % self.check_every_n_steps or 0 < trainer.max_steps <= step:
            return  # not a checking step, or training is complete anyway (it ends normally right after)
        agreed = self._agree(trainer)
        if agreed is None:
            return
        self._preempt(trainer, agreed)

    def stop_if_signalled(self, trainer: pl.Trainer) -> None:
        """Act now on a signal pending on any rank: save (unless this step is on disk already), then stop or
        requeue, as at a step boundary.

        For long work between two steps (an evaluation): call it on every rank at the same points, e.g. before
        each batch. It costs a look at a list on one process, one tiny all-reduce in DDP.
        """
        if not self._active:
            return
        agreed = self._agree(trainer)
        if agreed is not None:
            self._preempt(trainer, agreed)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training completed with a stop request nobody acted on (it came after the last check, e.g. during the
        # final save): everything is saved, but a process asked to terminate must not report success.
        stop = next((s for s in self.received if s in self.stop_signals), None)
        if not self._active or stop is None:
            return
        self._active = False
        io = trainer.strategy.checkpoint_io
        written = getattr(io, "last_written", None) if trainer.is_global_zero else None
        self.interrupted = TrainingInterrupted(stop, trainer.global_step, str(written or "nothing"), False)
        rank_zero_info(f"Preemption: {stop.name} after training completed: {self.interrupted}.")
        raise self.interrupted

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._uninstall()
        restore_sigterm_broadcast(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall()
            restore_sigterm_broadcast(trainer)

    # ------------------------------------------------------------------ the preemption
    def _agree(self, trainer: pl.Trainer) -> signal.Signals | None:
        """The signal all ranks act on now (highest priority pending on any rank), or None."""
        sigs = self.signals
        pending = [s in self.received for s in sigs]
        if trainer.world_size > 1 and sigs:
            # One tiny collective per checked step, at the same step on every rank (Lightning itself
            # broadcasts its SIGTERM flag every step in DDP). Single process: no tensor, no device sync.
            flags = torch.tensor([float(p) for p in pending], device=trainer.strategy.root_device)
            pending = [bool(f) for f in trainer.strategy.reduce(flags, reduce_op="max").tolist()]
        return next((sig for sig, flag in zip(sigs, pending) if flag), None)

    def _saved_this_step(self, trainer: pl.Trainer) -> str | None:
        """The resumable checkpoint of this very step that this process already wrote (rank 0's answer), if any.

        A checkpoint callback that saves weights only could have written it: then it does not count.
        """
        io = trainer.strategy.checkpoint_io
        saved = None
        if getattr(io, "last_written_step", None) == trainer.global_step and not any(
            getattr(c, "save_weights_only", False) for c in trainer.checkpoint_callbacks
        ):
            saved = str(io.last_written)
        return trainer.strategy.broadcast(saved, src=0) if trainer.world_size > 1 else saved

    def _preempt(self, trainer: pl.Trainer, sig: signal.Signals) -> None:
        step = trainer.global_step
        here = ", ".join(s.name for s in self.received) or "none yet"
        path = self._saved_this_step(trainer)
        if path is not None:
            rank_zero_info(
                f"Preemption: {sig.name} (this rank received: {here}); step {step} is saved: {path}."
            )
        else:
            rank_zero_info(f"Preemption: {sig.name} (this rank received: {here}); saving at step {step}.")
            # Rank 0's name for everyone, even where ranks see the folder differently (network filesystems).
            path = trainer.strategy.broadcast(str(next_preemption_path(trainer.default_root_dir)), src=0)
            # Every rank takes part (its state, the RNG gather), only rank 0 writes, and it ends with a barrier:
            # the file is complete before anything below runs.
            trainer.save_checkpoint(path, weights_only=False)
            if trainer.is_global_zero:
                removed = prune_preemption_checkpoints(trainer.default_root_dir, keep=path)
                if removed:
                    rank_zero_info(f"Preemption: removed older {', '.join(p.name for p in removed)}.")
        requeued = False
        if trainer.is_global_zero and sig == self.requeue_signal:
            requeued = _scontrol_requeue()
        if sig == self.requeue_signal and trainer.world_size > 1:
            # Only for the exit code of the other ranks. SLURM may already send SIGTERM for the requeue; the
            # guard is still active, so it is only recorded.
            requeued = bool(trainer.strategy.broadcast(requeued, src=0))
        self.received = []
        self._active = False
        self.interrupted = TrainingInterrupted(sig, step, path, requeued)
        rank_zero_info(f"Preemption: {self.interrupted}.")
        raise self.interrupted

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        # Called on every rank inside Trainer.save_checkpoint (every rank calls it): a collective is safe.
        mine = capture_rng_states()
        if is_distributed():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        return {"rng": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored in on_train_start: after everything that draws from the global RNGs while setting up.
        self._pending_rng = state_dict.get("rng")


def _scontrol_requeue() -> bool:
    """``scontrol requeue`` this job (array jobs: ``ARRAYID_TASKID``); False (logged) when it fails."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = (
        f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if array_job
        else os.environ.get("SLURM_JOB_ID", "")
    )
    if not re.fullmatch(r"[0-9_]+", job_id):
        rank_zero_warn(f"Preemption: cannot requeue, no valid SLURM job id ({job_id!r}).")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        rank_zero_warn(
            f"Preemption: `scontrol requeue {job_id}` failed: {err}. Resubmit the job to continue."
        )
        return False
    if result.returncode != 0:
        rank_zero_warn(
            f"Preemption: `scontrol requeue {job_id}` exited {result.returncode}: {result.stderr.strip()}. "
            "Resubmit the job to continue."
        )
        return False
    rank_zero_info(f"Preemption: requeued SLURM job {job_id}.")
    return True


class PerJobTimer(Timer):
    """``Timer`` (``max_time``) whose budget counts per job, not per run.

    Lightning's ``Timer`` stores the elapsed training time in checkpoints and adds it back on resume, so a
    requeued job configured with the same ``max_time`` as the first one stops after its first step. On a
    cluster the natural meaning is "this job may train for ``max_time``" (a slot's length minus saving time),
    so this subclass keeps the elapsed time in the checkpoint (for information) but does not restore it. The
    CLI turns ``trainer.max_time`` into this callback.
    """

    def __init__(
        self,
        duration: str | timedelta | dict[str, int] | None = None,
        interval: str = "step",
        verbose: bool = True,
    ) -> None:
        super().__init__(duration=duration, interval=interval, verbose=verbose)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._offset = 0  # per job: ignore the time earlier jobs spent
