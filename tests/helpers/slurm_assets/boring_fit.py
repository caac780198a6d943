"""Tiny deterministic Lightning fit used to prove the SLURM harness (independent of dip_lightning).

``python boring_fit.py ROOT_DIR WEIGHTS_OUT [--max-steps N] [--devices D] [--step-sleep S] [--seed K]``

* Every batch is a pure function of ``(seed, global_step, rank)``, drawn from a ``torch.Generator``: a
  resumed run sees exactly the data an uninterrupted run sees, whatever the dataloader position was. So a run
  that is preempted, requeued and resumed must end with bit-identical weights to one that was not.
* ``SLURMEnvironment(auto_requeue=True)`` is added only when SLURM is detected, so the same script gives the
  uninterrupted reference when started outside SLURM.
* Signals are taken at step boundaries, by all ranks at the same step. Lightning runs its USR1 handler (save
  ``hpc_ckpt_N.ckpt``; rank 0 runs ``scontrol requeue``) and its SIGTERM handler wherever the main thread is
  when the signal lands. Two ways that goes wrong:
  (1) landing between the in-place optimizer update and the step counter increment stores updated weights
  with the old ``global_step``, so the resumed run applies that step twice (rare, but bit-exact tests flake);
  (2) in DDP both handlers run collectives (the barrier in ``Trainer.save_checkpoint``, the SIGTERM
  broadcast): when rank 0 takes the signal at batch k while rank 1 already waits in batch k's gradient
  all-reduce, the collectives pair up wrongly and the job hangs until SLURM kills it (seen here with gloo).
  So USR1 and TERM are blocked in every thread from the start (before torch is imported, so that all helper
  threads inherit the mask). At each batch start the ranks all-reduce which signals are pending anywhere,
  wait until each rank has them too, and only then unblock: Lightning's handlers run at the same step on
  every rank.

Output lines the tests read: ``TRAINING STARTED rank=R global_step=G restart_count=C``,
``PROGRESS global_step=G``, ``WEIGHTS SAVED global_step=G``.
"""

from __future__ import annotations

import signal

# Order matters: ranks agree on a vector of "pending" flags in this order.
_DEFERRED_ORDER = (signal.SIGUSR1, signal.SIGTERM)
_DEFERRED_SIGNALS = set(_DEFERRED_ORDER)
signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything  # noqa: E402
from lightning.pytorch.plugins.environments import SLURMEnvironment  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

DIM = 32
BATCH = 16


class StepSeededRegression(LightningModule):
    """Linear regression whose batch for step ``g`` on rank ``r`` is generated from seed ``(seed, g, r)``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.layer = nn.Linear(DIM, 1)
        target = torch.Generator().manual_seed(seed)
        self.register_buffer("true_w", torch.randn(DIM, 1, generator=target), persistent=False)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        step_seed = (self.seed * 1_000_003 + self.global_step) * 64 + self.global_rank
        gen = torch.Generator().manual_seed(step_seed)
        x = torch.randn(BATCH, DIM, generator=gen)
        y = x @ self.true_w + 0.1 * torch.randn(BATCH, 1, generator=gen)
        return x, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._batch()  # the loader's batch is ignored on purpose (see module docstring)
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Adam: the resumed run must also restore optimizer state to match bit for bit.
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(range(64)), batch_size=1)


class StepBoundarySignals(Callback):
    """Let the deferred signals in only at batch starts, on all ranks at once; report progress (flushed)."""

    def __init__(self, step_sleep: float, agree_timeout: float = 30.0) -> None:
        self.step_sleep = step_sleep
        self.agree_timeout = agree_timeout

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        rank, step = trainer.global_rank, trainer.global_step
        print(f"TRAINING STARTED rank={rank} global_step={step} restart_count={restarts}", flush=True)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.step_sleep:  # makes the job last long enough to be preempted; no effect on the weights
            time.sleep(self.step_sleep)
        pending = signal.sigpending()
        flags = torch.tensor([float(sig in pending) for sig in _DEFERRED_ORDER])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # same collective, same step, on every rank
        wanted = {sig for sig, flag in zip(_DEFERRED_ORDER, flags.tolist()) if flag}
        if not wanted:
            return
        # Another rank already has it: ours is on its way (slurmstepd signals the tasks one after the other).
        deadline = time.monotonic() + self.agree_timeout
        while not wanted <= signal.sigpending() and time.monotonic() < deadline:
            time.sleep(0.001)
        # Python runs the pending handlers inside this call.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == 0 and trainer.global_step % 100 == 0:
            print(f"PROGRESS global_step={trainer.global_step}", flush=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED_SIGNALS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "root_dir", help="trainer.default_root_dir; fixed, so a requeued job finds its hpc_ckpt"
    )
    parser.add_argument("weights_out", help="final state_dict (torch.save) written by rank 0 after fit")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument(
        "--step-sleep", type=float, default=0.0, help="seconds per step (no effect on weights)"
    )
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    torch.set_num_threads(1)
    seed_everything(args.seed, verbose=False)
    model = StepSeededRegression(args.seed)
    plugins = [SLURMEnvironment(auto_requeue=True)] if SLURMEnvironment.detect() else []
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=1,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        default_root_dir=args.root_dir,
        plugins=plugins,
        callbacks=[StepBoundarySignals(args.step_sleep)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    try:
        # ckpt_path=None: under SLURM, Lightning resumes from the newest <root_dir>/hpc_ckpt_N.ckpt.
        trainer.fit(model, ckpt_path=None)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED_SIGNALS)
    if trainer.global_rank == 0 and trainer.global_step == args.max_steps:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"global_step": trainer.global_step, "state_dict": state}, args.weights_out)
        print(f"WEIGHTS SAVED global_step={trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()
