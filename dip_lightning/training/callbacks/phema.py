"""Power-function EMA profiles tracked during training and written every N steps as snapshots, for post-hoc EMA
(Karras et al. 2024, Sec. 3 and App. C; the math: :mod:`dip_lightning.core.phema`, the files:
:mod:`dip_lightning.checkpoint.posthoc`).

Each std is one flat fp32 copy of the weights on the training device, updated after every optimizer step with a
host-side decay (no device sync). Checkpoints carry the current profiles, so a resumed run continues them and its
snapshots bit for bit. Afterwards ``--weights phema:S`` or ``ema-reconstruct`` give any std at a snapshot step.
In YAML: ``trainer.callbacks: [{class_path: dip_lightning.training.callbacks.PowerFunctionEMA, init_args: {stds:
[0.05, 0.10], snapshot_every_n_steps: 5000}}]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dip_lightning.checkpoint.format import RAW_WEIGHTS, STATE_DICT
from dip_lightning.checkpoint.posthoc import (
    PROFILES_RECORD,
    profiles_record,
    recorded_profiles,
    snapshot,
    snapshot_path,
)
from dip_lightning.checkpoint.run_folder import snapshot_dir
from dip_lightning.core.atomic import atomic_write
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.phema import power_ema_decay, std_to_exponent
from dip_lightning.training.callbacks.ema import (
    average_in_groups,
    averageable_copy,
    guarded_ema_fn,
    live_tensors,
)
from dip_lightning.training.callbacks.nonfinite import step_skipped, update_keep


class PowerFunctionEMA(Callback):
    """Track power-function EMA profiles and store them every N steps for post-hoc reconstruction.

    Args:
        stds: relative widths of the tracked profiles (edm2: 0.05 and 0.10); each costs one copy of the weights.
        snapshot_every_n_steps: write a snapshot of all profiles every N optimizer steps (rank 0).
        dirpath: snapshot folder (default: the run folder's, where ``--weights phema:S`` looks).
    """

    def __init__(
        self,
        stds: Sequence[float] = (0.05, 0.10),
        snapshot_every_n_steps: int = 1000,
        dirpath: str | None = None,
    ) -> None:
        self.stds = tuple(float(s) for s in stds)
        if not self.stds or len(set(self.stds)) != len(self.stds):
            raise ConfigError(
                f"PowerFunctionEMA: stds must be distinct and at least one, got {list(self.stds)}"
            )
        for std in self.stds:
            std_to_exponent(std)  # raises for a std out of range
        if snapshot_every_n_steps < 1:
            raise ConfigError(f"snapshot_every_n_steps must be >= 1, got {snapshot_every_n_steps}")
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.dirpath = dirpath
        self.averages: dict[float, dict[str, Tensor]] = {}
        self.step = 0  # the optimizer step the averages are at

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        state = pl_module.state_dict()
        device = trainer.strategy.root_device
        self.averages = {s: averageable_copy(state, pl_module, device) for s in self.stds}
        self.step = 0
        if self.dirpath is None:
            self.dirpath = str(snapshot_dir(trainer.default_root_dir))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step  # a resumed run's averages are at the checkpoint's step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:  # no optimizer step in this batch (gradient accumulation)
            return
        self.step = trainer.global_step
        # A step NonFiniteGuard skipped leaves the profiles as they are.
        if not step_skipped(trainer):
            keep = update_keep(trainer)
            current = live_tensors(pl_module, next(iter(self.averages.values())))
            for std, average in self.averages.items():
                decay = power_ema_decay(std, self.step)  # a host-side number; 0 at step 1: the update copies
                update = get_ema_multi_avg_fn(decay) if keep is None else guarded_ema_fn(decay, lambda: keep)
                average_in_groups(update, average.values(), current, self.step - 1)
        if self.step % self.snapshot_every_n_steps == 0 and trainer.is_global_zero:
            self._write_snapshot(pl_module)

    def _write_snapshot(self, pl_module: pl.LightningModule) -> None:
        averages = {s: {k: v.detach().cpu() for k, v in avg.items()} for s, avg in self.averages.items()}
        with atomic_write(snapshot_path(self.dirpath, self.step)) as fh:
            torch.save(snapshot(self.step, averages, dict(pl_module.hparams)), fh)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.averages:
            return
        # Before the first update the slots hold the copy taken at setup: store the raw weights instead (the first
        # update copies the weights anyway). The EMA callback keeps the raw weights beside its averages.
        raw = checkpoint.get(RAW_WEIGHTS, checkpoint[STATE_DICT])
        checkpoint[PROFILES_RECORD] = profiles_record(
            {s: raw if self.step == 0 else dict(avg) for s, avg in self.averages.items()}
        )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.averages:
            return
        stored = recorded_profiles(checkpoint)
        raw = checkpoint.get(RAW_WEIGHTS, checkpoint.get(STATE_DICT))
        missing = [s for s in self.stds if s not in stored]
        if missing:
            rank_zero_warn(
                f"The checkpoint has no power-function EMA of std(s) {missing}: they start from its raw weights "
                "(their profile then misses the steps before this one)."
            )
        for std, average in self.averages.items():
            source = stored.get(std, raw)
            for name, tensor in average.items():
                tensor.copy_(source[name])
