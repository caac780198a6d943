"""EMA of the weights: Lightning's own ``EMAWeightAveraging``, with the gaps that matter for diffusion closed.

Why a subclass and not the stock callback:

* Guard (Lightning issue #21724): before the first EMA update the averaged copy is an un-averaged deepcopy of the
  initial weights. The stock callback swaps it in for validation anyway; here validation (and sampling through
  :func:`sampling_module`) uses the raw weights until the first update has happened.
* Swap-safe checkpoints: if a checkpoint is written while the weights are swapped (a SLURM signal arriving during
  validation), the stock callback would store the raw weights as EMA and vice versa. We un-swap the pair in the
  checkpoint dictionary.
* Speed: the update uses ``get_ema_multi_avg_fn`` (foreach over all tensors) instead of one kernel per tensor,
  and never reads the update count back from the GPU (:class:`HostCountedAveragedModel`): torch's
  ``AveragedModel.update_parameters`` turns ``n_averaged`` into Python bools twice per update, two host-device
  synchronisations in every training step.

Checkpoint semantics are Lightning's: ``checkpoint["state_dict"]`` holds the EMA weights (so ``validate``,
``predict`` and ``load_from_checkpoint`` use EMA by default) and ``checkpoint["current_model_state"]`` the raw ones.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dip_lightning.compat import average_model, swap_averaged_models


class HostCountedAveragedModel(AveragedModel):
    """torch's :class:`AveragedModel` with a host-side mirror of ``n_averaged``, so that updates do not sync.

    ``AveragedModel.update_parameters`` decides between "copy" and "average" with ``bool(n_averaged == 0)`` and
    ``if n_averaged > 0``; with the average on the GPU each is a device-to-host read that waits for the whole
    training step. Here the count is read from the device once (after construction or a checkpoint load) and then
    kept on the host; the first update is torch's own, later ones do exactly what torch does after its checks
    (``multi_avg_fn`` per device and dtype, then ``n_averaged += 1`` on the device).
    """

    host_count: int | None = None  # None: not read from the device yet

    def update_parameters(self, model: nn.Module) -> None:
        if self.host_count is None:
            self.host_count = int(self.n_averaged.item())
        if self.host_count == 0 or self.multi_avg_fn is None:
            super().update_parameters(model)
        else:
            if self.use_buffers:
                averaged = itertools.chain(self.module.parameters(), self.module.buffers())
                current = itertools.chain(model.parameters(), model.buffers())
            else:
                averaged, current = self.parameters(), model.parameters()
            groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
            for p_avg, p_model in zip(averaged, current, strict=True):
                group = groups.setdefault((p_avg.device, p_avg.dtype), ([], []))
                group[0].append(p_avg.detach())
                group[1].append(p_model.detach().to(p_avg.device))
            for (device, _), (avg_list, model_list) in groups.items():
                self.multi_avg_fn(avg_list, model_list, self.n_averaged.to(device))
            if not self.use_buffers:
                for b_avg, b_model in zip(self.module.buffers(), model.buffers(), strict=True):
                    b_avg.detach().copy_(b_model.detach().to(b_avg.device))
            self.n_averaged += 1
        self.host_count += 1

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.host_count = None  # n_averaged came from a checkpoint: read it again at the next update


class EMA(EMAWeightAveraging):
    """Exponential moving average of the LightningModule's weights (decay 0.9999 in the paper recipe).

    Args:
        decay: EMA decay per update.
        update_every_n_steps: update the average every N optimizer steps.
        update_starting_at_step: first optimizer step (0-based) that updates the average.
        device: where the averaged copy lives (default: the module's device).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__(
            device=device,
            use_buffers=True,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        self.decay = decay
        # One foreach update over all tensors instead of a Python loop of per-tensor kernels.
        self._kwargs = {"multi_avg_fn": get_ema_multi_avg_fn(decay)}
        self._swapped = False
        self._raw_state_at_end: dict[str, torch.Tensor] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._raw_state_at_end = None
        averaged = average_model(self)
        if type(averaged) is AveragedModel:
            # Lightning builds a plain AveragedModel; only update_parameters differs (see the class above), so
            # the instance changes class in place (a subclass adding no state).
            averaged.__class__ = HostCountedAveragedModel

    @property
    def num_updates(self) -> int:
        """How many times the average has been updated (0 before the first update or outside fit)."""
        if average_model(self) is None:
            return 0
        host_count = getattr(average_model(self), "host_count", None)
        if host_count is not None:
            return host_count
        return int(average_model(self).n_averaged.item())

    @property
    def averaged_module(self) -> pl.LightningModule | None:
        """The EMA copy of the LightningModule, or None when there is no usable average yet."""
        if average_model(self) is None or self.num_updates == 0:
            return None
        return average_model(self).module

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaged_module is None:
            if average_model(self) is not None:
                rank_zero_warn("EMA has not been updated yet: validating with the raw weights.")
            return
        swap_averaged_models(self, pl_module)
        self._swapped = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            swap_averaged_models(self, pl_module)
            self._swapped = False

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if average_model(self) is None:
            return
        if self._swapped:
            # Saved mid-validation: the live module holds the EMA weights and the average holds the raw ones.
            checkpoint["state_dict"], checkpoint["current_model_state"] = (
                checkpoint["current_model_state"],
                checkpoint["state_dict"],
            )
        if self._raw_state_at_end is not None:
            # Written after on_train_end (ModelCheckpoint's final last.ckpt): the live module already holds the
            # EMA weights, so the raw ones come from the copy taken before they were overwritten.
            checkpoint["current_model_state"] = self._raw_state_at_end
        if self.num_updates == 0:
            # No average yet: the EMA slot gets the raw weights, not the stale initial copy (the first update of an
            # AveragedModel copies the weights anyway, so resuming from here is unchanged).
            checkpoint["state_dict"] = checkpoint["current_model_state"]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The stock callback copies the average into the live model here; without a single update that would
        # replace trained weights by the initial ones. ModelCheckpoint.on_train_end (always last) may still write
        # last.ckpt afterwards: keep the raw weights for it.
        if self.averaged_module is not None:
            self._raw_state_at_end = {
                k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()
            }
            super().on_train_end(trainer, pl_module)


def find_ema(trainer: pl.Trainer | None) -> EMA | None:
    """The trainer's EMA callback, if any."""
    if trainer is None:
        return None
    for callback in trainer.callbacks:
        if isinstance(callback, EMA):
            return callback
    return None


def sampling_module(trainer: pl.Trainer | None, pl_module: pl.LightningModule, use_ema: bool = True) -> Any:
    """The module that should generate images: the EMA copy when there is one and ``use_ema``, else the live one.

    Outside ``fit`` (predict/validate from a checkpoint) the live module already holds the EMA weights, because the
    checkpoint's ``state_dict`` is the EMA copy.
    """
    if use_ema:
        ema = find_ema(trainer)
        if ema is not None and ema.averaged_module is not None:
            return ema.averaged_module
    return pl_module
