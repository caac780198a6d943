"""Power-function EMA profiles tracked during training and stored every N steps, for post-hoc EMA
(:mod:`dip_lightning.core.phema`; edm2's ``PowerFunctionEMA``).

``trainer.callbacks: [{class_path: dip_lightning.training.callbacks.PowerFunctionEMA, init_args: {stds: [0.05, 0.10],
snapshot_every_n_steps: 5000}}]``; after training, ``python -m dip_lightning ema-reconstruct RUN --std 0.08 --out
ema.ckpt`` gives any other std at a snapshot step.

* One flat fp32 copy of the state_dict tensors per std (as the EMA callback's further decays), on the training
  device, updated after every optimizer step with the step's decay (:func:`~dip_lightning.core.phema.power_ema_decay`,
  a host-side number: no device sync) through the same foreach update as the EMA callback.
* Snapshot ``<dirpath>/phema-<step>.pt`` (default ``dirpath``: ``<run>/phema``) every ``snapshot_every_n_steps``:
  ``{"step", "stds", "weights": {std_key: state_dict}, "hyper_parameters"}``, written by rank 0, atomically. Disk:
  one copy of the weights per std per snapshot (DiP-XL/16: 2.37 GiB each).
* Checkpoints carry the current profiles as ``checkpoint["phema"] = {"stds": [...], "weights": {std_key: ...}}``,
  so a resumed run continues them (and its snapshots) bit for bit; before the first update the slots hold the raw
  weights. Every rank computes the same averages (DDP); only rank 0 writes snapshots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dip_lightning.checkpoint.format import PHEMA_RECORD
from dip_lightning.checkpoint.posthoc import snapshot_path, std_key
from dip_lightning.core.atomic import atomic_write
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
        snapshot_every_n_steps: write a snapshot of all profiles every N optimizer steps.
        dirpath: snapshot folder (default: ``<trainer.default_root_dir>/phema``).
    """

    def __init__(
        self,
        stds: Sequence[float] = (0.05, 0.10),
        snapshot_every_n_steps: int = 1000,
        dirpath: str | None = None,
    ) -> None:
        self.stds = tuple(float(s) for s in stds)
        if not self.stds or len(set(self.stds)) != len(self.stds):
            raise ValueError(
                f"PowerFunctionEMA: stds must be distinct and at least one, got {list(self.stds)}"
            )
        for std in self.stds:
            std_to_exponent(std)  # raises for a std out of range
        if snapshot_every_n_steps < 1:
            raise ValueError(f"snapshot_every_n_steps must be >= 1, got {snapshot_every_n_steps}")
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
            self.dirpath = str(Path(trainer.default_root_dir) / "phema")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step  # a resumed run's averages are at the checkpoint's step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:  # no optimizer step in this batch (gradient accumulation)
            return
        self.step = trainer.global_step
        if not step_skipped(
            trainer
        ):  # NonFiniteGuard skipped this step's update: the profiles stay as they are
            keep = update_keep(trainer)
            current = live_tensors(pl_module, next(iter(self.averages.values())))
            for std, average in self.averages.items():
                decay = power_ema_decay(std, self.step)  # a host-side number; 0 at step 1: the update copies
                update = get_ema_multi_avg_fn(decay) if keep is None else guarded_ema_fn(decay, lambda: keep)
                average_in_groups(update, average.values(), current, self.step - 1)
        if self.step % self.snapshot_every_n_steps == 0 and trainer.is_global_zero:
            self._write_snapshot(pl_module)

    def _write_snapshot(self, pl_module: pl.LightningModule) -> None:
        snapshot = {
            "step": self.step,
            "stds": list(self.stds),
            "weights": {
                std_key(s): {k: v.detach().cpu() for k, v in avg.items()} for s, avg in self.averages.items()
            },
            "hyper_parameters": dict(pl_module.hparams),
        }
        with atomic_write(snapshot_path(self.dirpath, self.step)) as fh:
            torch.save(snapshot, fh)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.averages:
            return
        # Before the first update the slots hold the copy taken at setup: store the raw weights instead (the first
        # update copies the weights anyway). The EMA callback keeps the raw weights in current_model_state.
        raw = checkpoint.get("current_model_state", checkpoint["state_dict"])
        checkpoint[PHEMA_RECORD] = {
            "stds": list(self.stds),
            "weights": {std_key(s): raw if self.step == 0 else dict(avg) for s, avg in self.averages.items()},
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.averages:
            return
        stored = (checkpoint.get(PHEMA_RECORD) or {}).get("weights", {})
        raw = checkpoint.get("current_model_state", checkpoint.get("state_dict"))
        missing = [s for s in self.stds if std_key(s) not in stored]
        if missing:
            rank_zero_warn(
                f"The checkpoint has no power-function EMA of std(s) {missing}: they start from its raw weights "
                "(their profile then misses the steps before this one)."
            )
        for std, average in self.averages.items():
            source = stored.get(std_key(std), raw)
            for name, tensor in average.items():
                tensor.copy_(source[name])
