"""End the ranks Lightning's own launcher started when the run fails in the process that started them.

With ``devices=N`` and no torchrun/srun, Lightning starts ranks 1..N-1 as child processes of rank 0 and ends
them itself only on Ctrl-C. When rank 0 fails on its own (a checkpoint save, which only rank 0 writes, meets a
full disk) the others wait in their next collective: with gloo they die of the lost connection with a traceback
of their own, with NCCL they hang until the process group's timeout (30 minutes). The CLI adds
:class:`StopLaunchedRanks` to every Trainer; under torchrun and ``srun --kill-on-bad-exit=1`` (the kit's SLURM
scripts) the launcher ends the other ranks itself.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from dip_lightning.core.compat import stop_launched_processes
from dip_lightning.training.callbacks.loss_spike import LossSpikeRollback

__all__ = ["StopLaunchedRanks"]


class StopLaunchedRanks(Callback):
    """On a failure in the process that launched the other ranks, kill them (a rank blocked in a collective
    answers nothing milder than SIGKILL) before the failure is reported."""

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # SystemExit (the preemption guard's exit after a save all ranks took part in) and KeyboardInterrupt
        # (Lightning ends its children itself) take their own paths; a loss-spike rollback is raised on every rank
        # at once and the fit continues (fit_with_rollbacks).
        if isinstance(exception, Exception) and not isinstance(exception, LossSpikeRollback):
            stop_launched_processes(trainer)
