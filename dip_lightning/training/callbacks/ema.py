"""EMA of the weights: Lightning's ``EMAWeightAveraging`` with the gaps that matter for diffusion closed.

Validation and sampling use the raw weights until the first update (Lightning issue #21724); a checkpoint written
while the weights are swapped (a signal during validation) stores each set in its place; the update is one foreach
kernel that never reads the count back from the GPU (:class:`HostCountedAveragedModel`); several decays are tracked
in one run, the first one being Lightning's averaged model. The checkpoint entries are those of
:mod:`dip_lightning.checkpoint.format`: ``state_dict`` = the first decay, the raw weights and every further decay
beside it; ``--weights ema:D`` (:func:`~dip_lightning.checkpoint.format.select_weights`) reads them back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dip_lightning.checkpoint.format import EMA_RECORD, RAW_WEIGHTS, STATE_DICT, ema_record, ema_weights
from dip_lightning.checkpoint.io import CheckpointError
from dip_lightning.core.compat import average_model, swap_averaged_models
from dip_lightning.core.errors import ConfigError
from dip_lightning.training.callbacks.nonfinite import step_skipped, update_keep

MultiAvgFn = Callable[[list[Tensor], list[Tensor], Any], None]


def average_in_groups(
    multi_avg_fn: MultiAvgFn, averaged: Iterable[Tensor], current: Iterable[Tensor], n_averaged: Tensor | int
) -> None:
    """``multi_avg_fn`` over pairs of tensors, one call per (device, dtype) of the averages, as torch's
    ``AveragedModel`` groups them (foreach kernels take one device and dtype; integer buffers take another path)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for p_avg, p_model in zip(averaged, current, strict=True):
        group = groups.setdefault((p_avg.device, p_avg.dtype), ([], []))
        group[0].append(p_avg.detach())
        group[1].append(p_model.detach().to(p_avg.device))
    for (device, _), (avg_list, model_list) in groups.items():
        count = n_averaged.to(device) if isinstance(n_averaged, Tensor) else n_averaged
        multi_avg_fn(avg_list, model_list, count)


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
            average_in_groups(self.multi_avg_fn, averaged, current, self.n_averaged)
            if not self.use_buffers:
                for b_avg, b_model in zip(self.module.buffers(), model.buffers(), strict=True):
                    b_avg.detach().copy_(b_model.detach().to(b_avg.device))
            self.n_averaged += 1
        self.host_count += 1

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The count a checkpoint brings is a CPU tensor there: reading it costs no device sync. Else it is read
        # from the device at the next update.
        loaded = state_dict.get(prefix + "n_averaged")
        on_cpu = isinstance(loaded, Tensor) and loaded.device.type == "cpu"
        self.host_count = int(loaded) if on_cpu else None


class EMA(EMAWeightAveraging):
    """Exponential moving averages of the LightningModule's weights (decay 0.9999 in the paper recipe).

    Args:
        decay: EMA decay per update: the one-decay shorthand of ``decays``.
        decays: several decays in one run: the first for validation, samples and ``state_dict``, the others beside it.
        update_every_n_steps: update the averages every N optimizer steps.
        update_starting_at_step: first optimizer step (0-based) that updates the averages.
        device: where the averaged copies live (default: the training device).
    """

    def __init__(
        self,
        decay: float | None = None,
        decays: Sequence[float] | None = None,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        device: str | None = None,
    ) -> None:
        self.decays = _tracked_decays(decay, decays)
        super().__init__(
            device=device,
            use_buffers=True,
            decay=self.decays[0],
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        self.decay = self.decays[0]
        self.device_option = device
        # One foreach update over all tensors instead of a Python loop of per-tensor kernels.
        self._kwargs = {"multi_avg_fn": self._guarded_fn(self.decay)}
        self._extra_fns: dict[float, MultiAvgFn] = {d: self._guarded_fn(d) for d in self.decays[1:]}
        # NonFiniteGuard in device mode: 1.0 / 0.0 on the device, the weight of this step's update.
        self._keep: Tensor | None = None
        # Decay -> {state_dict key: average}, for every decay after the first (built at setup of a fit).
        self._extra_averages: dict[float, dict[str, Tensor]] = {}
        self._swapped = False
        self._raw_state_at_end: dict[str, torch.Tensor] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._raw_state_at_end = None
        averaged = average_model(self)
        if stage != "fit" or averaged is None:
            return
        if type(averaged) is AveragedModel:
            # Lightning builds a plain AveragedModel; only update_parameters differs (see the class above), so
            # the instance changes class in place (a subclass adding no state but the host count).
            averaged.__class__ = HostCountedAveragedModel
            averaged.host_count = int(averaged.n_averaged)  # 0: once here, not per step
        if self.device_option is None:
            # Lightning copies the module at callback setup, before the strategy moves it to its device; the
            # average belongs on the training device (where Lightning's docs put it), not on the CPU.
            averaged.to(trainer.strategy.root_device)
        copy = averaged.module.state_dict()
        self._extra_averages = {d: averageable_copy(copy, pl_module) for d in self.decays[1:]}

    @property
    def num_updates(self) -> int:
        """How many times the averages have been updated (0 before the first update or outside fit); read from the
        device at most once after a setup or load, then kept on the host."""
        averaged = average_model(self)
        if averaged is None:
            return 0
        if isinstance(averaged, HostCountedAveragedModel):
            if averaged.host_count is None:
                averaged.host_count = int(averaged.n_averaged.item())
            return averaged.host_count
        return int(averaged.n_averaged.item())

    @property
    def averaged_module(self) -> pl.LightningModule | None:
        """The EMA copy of the LightningModule, or None when there is no usable average yet."""
        if average_model(self) is None or self.num_updates == 0:
            return None
        return average_model(self).module

    def averages(self) -> dict[float, dict[str, Tensor]]:
        """Every tracked decay's current averaged weights (the live tensors, state_dict keys), first decay first;
        empty outside fit. Outside validation (where the first decay's copy holds the raw weights)."""
        if average_model(self) is None:
            return {}
        return {self.decays[0]: average_model(self).module.state_dict(), **self._extra_averages}

    def _guarded_fn(self, decay: float) -> MultiAvgFn:
        return guarded_ema_fn(decay, lambda: self._keep)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if step_skipped(trainer):
            return  # NonFiniteGuard skipped this step's update: the averages stay as they are
        self._keep = update_keep(trainer)
        updates = self.num_updates
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self._follow_first_average(pl_module, updates)
        finally:
            self._keep = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        updates = self.num_updates
        super().on_train_epoch_end(trainer, pl_module)
        self._follow_first_average(pl_module, updates)

    def _follow_first_average(self, pl_module: pl.LightningModule, updates_before: int) -> None:
        """Update the further decays whenever Lightning's schedule has just updated the first one, as the first
        one is updated: a copy at the first update, ``multi_avg_fn`` after it (the count is the host's)."""
        updates = self.num_updates
        if updates == updates_before or not self._extra_averages:
            return
        current = live_tensors(pl_module, next(iter(self._extra_averages.values())))
        for decay, average in self._extra_averages.items():
            if updates == 1:
                for avg, now in zip(average.values(), current, strict=True):
                    avg.copy_(now)
            else:
                average_in_groups(self._extra_fns[decay], average.values(), current, updates - 1)

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
            checkpoint[STATE_DICT], checkpoint[RAW_WEIGHTS] = checkpoint[RAW_WEIGHTS], checkpoint[STATE_DICT]
        if self._raw_state_at_end is not None:
            # Written after on_train_end (ModelCheckpoint's final last.ckpt): the live module already holds the
            # EMA weights, so the raw ones come from the copy taken before they were overwritten.
            checkpoint[RAW_WEIGHTS] = self._raw_state_at_end
        raw = checkpoint[RAW_WEIGHTS]
        if self.num_updates == 0:
            # No average yet: the EMA slot gets the raw weights, not the stale initial copy (the first update of an
            # AveragedModel copies the weights anyway, so resuming from here is unchanged).
            checkpoint[STATE_DICT] = raw
        others = {d: raw if self.num_updates == 0 else dict(a) for d, a in self._extra_averages.items()}
        checkpoint[EMA_RECORD] = ema_record(list(self.decays), others)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if average_model(self) is None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
            return
        fallback = checkpoint.get(STATE_DICT)
        recorded = ema_weights(checkpoint)
        missing = [d for d in self.decays if d not in recorded]
        if missing and RAW_WEIGHTS in checkpoint:
            rank_zero_warn(
                f"The checkpoint has no EMA of decay(s) {missing} (it tracks {list(recorded)}): they start from "
                "its state_dict."
            )
        dropped = [d for d in recorded if d not in self.decays]
        if dropped:
            rank_zero_info(f"EMA decay(s) {dropped} of the checkpoint are not tracked any more.")
        # Lightning restores the first average from "state_dict": hand it this run's first decay.
        first = recorded.get(self.decays[0], fallback)
        super().on_load_checkpoint(trainer, pl_module, {**checkpoint, STATE_DICT: first})
        for decay, average in self._extra_averages.items():
            source = recorded.get(decay, fallback)
            if source is None:
                continue
            if source.keys() != average.keys():
                raise CheckpointError(
                    f"the checkpoint's EMA of decay {decay} has other tensors than the module: "
                    f"{sorted(set(source) ^ set(average))[:5]}"
                )
            for name, tensor in average.items():
                tensor.copy_(source[name])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The stock callback copies the average into the live model here; without a single update that would
        # replace trained weights by the initial ones. ModelCheckpoint.on_train_end (always last) may still write
        # last.ckpt afterwards: keep the raw weights for it.
        if self.averaged_module is not None:
            self._raw_state_at_end = {
                k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()
            }
            super().on_train_end(trainer, pl_module)


def guarded_ema_fn(decay: float, keep: Callable[[], Tensor | None]) -> MultiAvgFn:
    """``get_ema_multi_avg_fn(decay)``; while ``keep()`` is a device tensor (NonFiniteGuard's device mode, 0 for a
    skipped step) the update's weight ``1 - decay`` is multiplied by it on the device, so a skipped step leaves
    the floating-point averages unchanged without a host read."""
    plain = get_ema_multi_avg_fn(decay)

    def update(averaged: list[Tensor], current: list[Tensor], n_averaged: Any) -> None:
        factor = keep()
        if factor is None or not torch.is_floating_point(averaged[0]):
            plain(averaged, current, n_averaged)
            return
        torch._foreach_lerp_(
            averaged, current, (1.0 - decay) * factor.to(averaged[0].device, averaged[0].dtype)
        )

    return update


def _tracked_decays(decay: float | None, decays: Sequence[float] | None) -> tuple[float, ...]:
    if decay is not None and decays is not None:
        raise ConfigError(f"EMA: give decay ({decay}) or decays ({list(decays)}), not both")
    tracked = (
        tuple(float(d) for d in decays)
        if decays is not None
        else (0.9999 if decay is None else float(decay),)
    )
    if not tracked:
        raise ConfigError("EMA: decays must list at least one decay")
    if len(set(tracked)) != len(tracked):
        raise ConfigError(f"EMA: decays must differ, got {list(tracked)}")
    bad = [d for d in tracked if not 0.0 <= d <= 1.0]
    if bad:
        raise ConfigError(f"EMA: decays must lie in [0, 1], got {bad}")
    return tracked


def named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by state_dict key (tied ones under every name), without building a state_dict."""
    return dict(
        itertools.chain(
            module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
        )
    )


def averageable_copy(
    state: dict[str, Tensor], module: nn.Module, device: torch.device | None = None
) -> dict[str, Tensor]:
    """A flat copy of ``state`` (``module``'s state_dict, or a copy of it) to average into, on ``device`` (default:
    where each tensor is); every key must be a parameter or buffer of ``module`` (:func:`live_tensors`)."""
    untracked = [k for k in state if k not in named_tensors(module)]
    if untracked:
        raise RuntimeError(
            f"state_dict entries that are no parameter or buffer cannot be averaged: {untracked[:5]}"
        )
    return {k: v.detach().to(device if device is not None else v.device, copy=True) for k, v in state.items()}


def live_tensors(module: nn.Module, average: dict[str, Tensor]) -> list[Tensor]:
    """The module's current tensors in the order of the keys of ``average`` (a copy made by
    :func:`averageable_copy`), looked up by name each time (``module.to`` replaces buffer objects)."""
    live = named_tensors(module)
    return [live[k].detach() for k in average]


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
