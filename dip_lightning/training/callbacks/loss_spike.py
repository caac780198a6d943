"""Guard against finite loss spikes: skip a step whose loss is far above the recent healthy losses, and after
``max_spikes`` spikes within ``within_steps`` steps roll the run back to its last complete checkpoint with a lower
learning rate (or with the offending batches skipped).

Why: :class:`~dip_lightning.training.callbacks.nonfinite.NonFiniteGuard` catches NaN/inf, but a finite spike
that wrecks the weights goes through. A spiked step is skipped by the non-finite guard's own mechanism (optimizer,
LR schedule and every EMA untouched; the batch consumed), so exact resume is unaffected. How a rollback is done
inside a running fit (:func:`fit_with_rollbacks`) and why: docs/design.md §9.1.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from dip_lightning.checkpoint.resume import resolve_resume
from dip_lightning.core import compat
from dip_lightning.core.errors import ConfigError, KitError
from dip_lightning.training.callbacks.nonfinite import StepJudge, find_nonfinite_guard

__all__ = [
    "LossSpikeError",
    "LossSpikeGuard",
    "LossSpikeRollback",
    "fit_with_rollbacks",
    "find_loss_spike_guard",
]

#: The MAD never counts as less than this fraction of the median: a window of identical losses (MAD 0) would
#: otherwise call any larger loss a spike.
MAD_FLOOR = 1e-3


class LossSpikeRollback(KitError, RuntimeError):
    """Raised by :class:`LossSpikeGuard` inside ``trainer.fit`` to roll back; :func:`fit_with_rollbacks` (which
    ``python -m dip_lightning fit`` uses) catches it and continues from :attr:`checkpoint`."""

    def __init__(self, checkpoint: str, step: int) -> None:
        self.checkpoint = checkpoint
        self.step = step
        super().__init__(
            f"loss spikes: rollback to {checkpoint} (step {step}) requested; a plain trainer.fit cannot roll "
            "back: train with `python -m dip_lightning fit` or dip_lightning.training.callbacks.loss_spike."
            "fit_with_rollbacks, or resume from that checkpoint yourself."
        )


class LossSpikeError(KitError, RuntimeError):
    """Training stopped: loss spikes kept coming after ``max_rollbacks`` rollbacks."""


def find_loss_spike_guard(trainer: pl.Trainer | None) -> LossSpikeGuard | None:
    """The trainer's :class:`LossSpikeGuard`, if any."""
    if trainer is None:
        return None
    return next((c for c in trainer.callbacks if isinstance(c, LossSpikeGuard)), None)


def fit_with_rollbacks(trainer: pl.Trainer, model: pl.LightningModule, **fit_kwargs: Any) -> None:
    """``trainer.fit``, continued from the checkpoint a :class:`LossSpikeRollback` names, as often as it asks.

    The continuation is Lightning's own restore of that checkpoint (weights, optimizer, EMA, data position, loops,
    callback states), the same path as an automatic resume; the guard keeps what the rollback changed.
    """
    while True:
        try:
            trainer.fit(model, **fit_kwargs)
            return
        except LossSpikeRollback as rollback:
            fit_kwargs["ckpt_path"] = rollback.checkpoint
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)
            # The run's own checkpoints are why the folder is not empty; Lightning's warning would only alarm.
            warnings.filterwarnings(
                "ignore", message=re.escape(f"Checkpoint directory {folder} exists and is not")
            )
            # Lightning keeps the training loader of the last fit and would skip restoring its position.
            compat.forget_training_loader(trainer)


def _check_options(
    window: int,
    num_mads: float,
    max_spikes: int,
    within_steps: int,
    on_rollback: str,
    lr_factor: float,
    max_rollbacks: int,
) -> None:
    problems = []
    if window < 2:
        problems.append(f"window must be >= 2 (a median and a MAD need losses), got {window}")
    if not num_mads > 0:
        problems.append(f"num_mads must be > 0, got {num_mads}")
    if max_spikes < 1:
        problems.append(f"max_spikes must be >= 1, got {max_spikes}")
    if within_steps < max_spikes:
        problems.append(f"within_steps must be >= max_spikes ({max_spikes}), got {within_steps}")
    if on_rollback not in ("lower_lr", "skip_batches"):
        problems.append(f"on_rollback must be 'lower_lr' or 'skip_batches', got {on_rollback!r}")
    if not 0 < lr_factor <= 1:
        problems.append(f"lr_factor must be in (0, 1], got {lr_factor}")
    if max_rollbacks < 0:
        problems.append(f"max_rollbacks must be >= 0, got {max_rollbacks}")
    if problems:
        raise ConfigError("LossSpikeGuard: " + "; ".join(problems) + ".")


class LossSpikeGuard(StepJudge):
    """Skip a step whose loss exceeds ``median + num_mads * MAD`` of the last ``window`` healthy losses; after
    ``max_spikes`` spikes within ``within_steps`` steps roll back to the run's last complete checkpoint.

    Nothing is judged until the window is full (the warm-up). The loss judged is the step's loss averaged over the
    ranks, so every rank holds the same window and takes the same decisions. Needs a
    :class:`~dip_lightning.training.callbacks.nonfinite.NonFiniteGuard`, which performs the skips and whose
    ``check_every_n_steps`` it follows (device mode: the rollback is decided at those steps only).

    Args:
        window: how many recent healthy losses the median and MAD are taken over (>= 2).
        num_mads: a loss above ``median + num_mads * MAD`` is a spike.
        max_spikes: this many spikes within ``within_steps`` steps roll the run back.
        within_steps: the span of steps the spikes are counted over.
        on_rollback: ``lower_lr``: multiply the learning rate by ``lr_factor`` on each rollback; ``skip_batches``:
            keep it, and skip the steps of the ``within_steps`` before the rollback when they come again.
        lr_factor: the factor of ``lower_lr`` (0 < factor <= 1).
        max_rollbacks: after this many rollbacks the next burst stops the run with :class:`LossSpikeError`.
    """

    def __init__(
        self,
        window: int = 200,
        num_mads: float = 20.0,
        max_spikes: int = 3,
        within_steps: int = 100,
        on_rollback: Literal["lower_lr", "skip_batches"] = "lower_lr",
        lr_factor: float = 0.5,
        max_rollbacks: int = 3,
    ) -> None:
        _check_options(window, num_mads, max_spikes, within_steps, on_rollback, lr_factor, max_rollbacks)
        self.window, self.num_mads = window, num_mads
        self.max_spikes, self.within_steps = max_spikes, within_steps
        self.on_rollback, self.lr_factor, self.max_rollbacks = on_rollback, lr_factor, max_rollbacks
        # Kept across a rollback (the run's history): see on_load_checkpoint.
        self.rollbacks = 0
        self.lr_scale = 1.0
        # 1-based first and last steps (inclusive) skipped when they come again after a rollback.
        self.skip_ranges: list[tuple[int, int]] = []
        self.spike_steps: list[int] = []  # host mode: the spikes of this process (first 1000)
        self._rolling_back = False
        self._carried: dict[str, Tensor] = {}
        self._unscaled: dict[str, Any] | None = None  # the optimizer's lrs before lr_scale was applied
        self._every = 1
        self._state: dict[str, Tensor] = self._fresh_state(torch.device("cpu"))
        self._last_skip: Tensor | None = None
        self._last_loss: Tensor | None = None

    # ------------------------------------------------------------------ state on the device
    def _fresh_state(self, device: torch.device) -> dict[str, Tensor]:
        zero = torch.zeros((), device=device)
        return {
            "losses": torch.zeros(self.window, device=device),  # a ring of healthy losses
            "filled": torch.zeros((), dtype=torch.long, device=device),
            "pos": torch.zeros((), dtype=torch.long, device=device),
            "recent": torch.zeros(self.within_steps, device=device),  # 1 at step % within_steps for a spike
            "spikes": zero.clone(),  # spikes seen (rolled-back ones included once restored: see rollbacks)
            "skipped": zero.clone(),  # steps skipped by this guard (spikes and skipped batches)
            # Finite values only (the checkpoint IO refuses NaN/inf): 0 before anything was judged.
            "max_ratio": zero.clone(),  # the largest (loss - median) / MAD of a step judged healthy
            "threshold": zero.clone(),  # the last step's threshold
        }

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        guard = find_nonfinite_guard(trainer)
        if guard is None:
            raise ConfigError(
                "LossSpikeGuard skips steps through NonFiniteGuard: add "
                "dip_lightning.training.callbacks.NonFiniteGuard to trainer.callbacks."
            )
        self._every = guard.check_every_n_steps
        # Before the checkpoint is restored (which fills it): a rollback starts from the checkpoint's window.
        self._state = self._fresh_state(trainer.strategy.root_device)

    # ------------------------------------------------------------------ the judgement (every optimizer step)
    def _forced(self, step: int) -> bool:
        return any(first <= step <= last for first, last in self.skip_ranges)

    def judge(self, step: int, loss: Tensor) -> Tensor:
        s = self._state
        loss = loss.float()
        finite = torch.isfinite(loss)
        median = s["losses"].median()
        mad = torch.maximum((s["losses"] - median).abs().median(), median.abs() * MAD_FLOOR)
        ready = s["filled"] >= self.window
        threshold = median + self.num_mads * mad
        spike = (ready & finite & (loss > threshold)).float()
        skip = torch.ones_like(spike) if self._forced(step) else spike
        if self._forced(step):
            spike = torch.zeros_like(spike)  # a skipped batch is not judged
        ratio = torch.where(
            ready & finite & (skip == 0), (loss - median) / mad, torch.full_like(loss, -torch.inf)
        )
        s["max_ratio"] = torch.maximum(s["max_ratio"], ratio)
        s["threshold"] = torch.where(ready, threshold, torch.zeros_like(threshold))
        # Only healthy losses enter the window; every update stays on the device (no host read per step).
        add = finite & (skip == 0)
        current = s["losses"].gather(0, s["pos"].view(1))
        s["losses"].scatter_(0, s["pos"].view(1), torch.where(add, loss, current[0]).view(1))
        s["pos"] = (s["pos"] + add.long()) % self.window
        s["filled"] = torch.clamp(s["filled"] + add.long(), max=self.window)
        s["recent"][step % self.within_steps] = spike
        s["spikes"] += spike
        s["skipped"] += skip
        self._last_skip, self._last_loss = skip, loss
        return skip

    # ------------------------------------------------------------------ counts, logs and the rollback
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._last_skip is None:
            return  # no optimizer step in this batch (accumulation), or no guard judged it
        skip, self._last_skip = self._last_skip, None
        every = trainer.log_every_n_steps
        if every > 0 and step % every == 0:
            pl_module.log("train/loss_spikes", self._state["spikes"].clone())
            pl_module.log("train/loss_spike_skipped", self._state["skipped"].clone())
        if self._every == 1 and skip.item() > 0:
            self._tell_skip(step)
        checking = step % self._every == 0 or 0 < trainer.max_steps <= step
        if not checking:
            return
        recent = int(self._state["recent"].sum().item())  # device mode: the one read every N steps
        if recent >= self.max_spikes:
            self._roll_back(trainer, step)

    def _tell_skip(self, step: int) -> None:
        s = self._state
        if self._forced(step):
            rank_zero_info(f"LossSpikeGuard: step {step} skipped (a batch skipped after a rollback).")
            return
        if len(self.spike_steps) < 1000:
            self.spike_steps.append(step)
        rank_zero_info(
            f"LossSpikeGuard: step {step} skipped (loss {float(self._last_loss):.4g} > {float(s['threshold']):.4g}"
            f" = median + {self.num_mads:g} MAD of the last {self.window} healthy losses); "
            f"{int(s['recent'].sum().item())} spike(s) in the last {self.within_steps} steps."
        )

    def _spikes_in_window(self, step: int) -> list[int]:
        marked = self._state["recent"].nonzero().flatten().tolist()
        return sorted(step - ((step - i) % self.within_steps) for i in marked)

    def _roll_back(self, trainer: pl.Trainer, step: int) -> None:
        spikes = self._spikes_in_window(step)
        if self.rollbacks >= self.max_rollbacks:
            raise LossSpikeError(
                f"loss spikes: {len(spikes)} spikes within {self.within_steps} steps (steps {spikes}) after "
                f"{self.rollbacks} rollback(s) (max_rollbacks {self.max_rollbacks}); stopped at step {step}. "
                "Every spike was skipped, so no checkpoint holds a spiked update. Lower the learning rate, "
                "clip gradients (trainer.gradient_clip_val) or check the data, then resume (fit)."
            )
        target, target_step = self._rollback_target(trainer)
        self.rollbacks += 1
        self._state["recent"].zero_()  # a rollback starts the count afresh
        what = self._apply_rollback_choice(step, target_step if target else None)
        where = f"to {target} (step {target_step})" if target else "in place (no complete checkpoint yet)"
        rank_zero_info(
            f"LossSpikeGuard: {len(spikes)} spikes within {self.within_steps} steps (steps {spikes}); rollback "
            f"{self.rollbacks} of at most {self.max_rollbacks} at step {step}: {where}, {what}."
        )
        if target is None:
            self._scale_live_optimizers(trainer)
            return
        self._rolling_back = True
        # The run's counts outlive the restore of the older checkpoint (on_train_start puts them back).
        self._carried = {k: self._state[k].clone() for k in ("spikes", "skipped")}
        raise LossSpikeRollback(target, target_step)

    def _apply_rollback_choice(self, step: int, target_step: int | None) -> str:
        if self.on_rollback == "lower_lr":
            self.lr_scale *= self.lr_factor
            return f"learning rate x{self.lr_factor:g} (x{self.lr_scale:g} of the configured one)"
        if target_step is None:
            return "no batch to skip (nothing is replayed)"
        first = max(target_step, step - self.within_steps) + 1
        self.skip_ranges.append((first, step))
        return f"steps {first}..{step} will be skipped"

    @staticmethod
    def _rollback_target(trainer: pl.Trainer) -> tuple[str | None, int]:
        """The run's newest complete checkpoint (the automatic resume's choice), rank 0's on every rank."""
        decision = None
        if trainer.is_global_zero:
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)
            decision = resolve_resume(trainer.default_root_dir, folder, move_damaged=True)
        chosen = (str(decision.path), int(decision.step or 0)) if decision and decision.path else (None, 0)
        return trainer.strategy.broadcast(chosen, src=0)

    def _scale_live_optimizers(self, trainer: pl.Trainer) -> None:
        """No checkpoint to return to: the lower learning rate applies from the next step."""
        optimizers = [o.state_dict() for o in trainer.optimizers]
        schedulers = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
        if self._unscaled is None:
            self._unscaled = _lrs(optimizers, schedulers)  # what checkpoints keep as the configured values
        scaled = _scaled(
            _lrs(optimizers, schedulers), self.lr_factor if self.on_rollback == "lower_lr" else 1.0
        )
        groups = [g for o in trainer.optimizers for g in o.param_groups]
        for group, values in zip(groups, scaled["groups"], strict=False):
            group.update(values)
        for config, bases in zip(trainer.lr_scheduler_configs, scaled["base_lrs"], strict=False):
            if bases is not None:
                config.scheduler.base_lrs = bases

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "state": {k: v.detach().cpu().clone() for k, v in self._state.items()},
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "skip_ranges": [list(r) for r in self.skip_ranges],
            "unscaled": self._unscaled,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("state", {})
        for key, value in saved.items():
            if key in self._state and self._state[key].shape == value.shape:
                self._state[key] = value.to(self._state[key].device).clone()
        if self._rolling_back:
            # The checkpoint predates the rollback: its window and counts apply, the run's history stays.
            self._state["recent"].zero_()
            return
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self.skip_ranges = [(int(a), int(b)) for a, b in state_dict.get("skip_ranges", [])]

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The checkpoint's optimizer holds the configured learning rates; the scale lives in this guard's state.
        # A resume then sees the run's own settings (docs/design.md §2.2: configured settings win) and the exact
        # lowered values come back from here.
        if self.lr_scale == 1.0 or self._unscaled is None or "optimizer_states" not in checkpoint:
            return
        live = _lrs(checkpoint["optimizer_states"], checkpoint.get("lr_schedulers") or [])
        checkpoint["callbacks"][self.state_key]["live"] = live
        _write_lrs(checkpoint, self._unscaled)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # After DiPModule.on_load_checkpoint wrote the configured settings into the checkpoint, before Lightning
        # loads its optimizer and schedulers: apply this run's scale to the configured values.
        if "optimizer_states" not in checkpoint:
            return
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        scale = self.lr_scale if self._rolling_back else float(state.get("lr_scale", 1.0))
        configured = _lrs(checkpoint["optimizer_states"], checkpoint.get("lr_schedulers") or [])
        self._unscaled = configured if scale != 1.0 else None
        if scale == 1.0:
            return
        live = state.get("live")
        same = not self._rolling_back and live is not None and configured == state.get("unscaled")
        # Unchanged settings: the exact values the run had; else (a rollback, a new configured lr) scaled now.
        _write_lrs(checkpoint, live if same else _scaled(configured, scale))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rolling_back:
            for key, value in self._carried.items():
                self._state[key] = value.to(self._state[key].device)
        self._rolling_back = False
        self._carried = {}


def _lrs(optimizer_states: Iterable[dict], scheduler_states: Iterable[dict]) -> dict[str, Any]:
    """The learning-rate entries of optimizer and scheduler state dicts (plain floats)."""
    groups = [
        {k: g[k] for k in ("lr", "initial_lr") if k in g}
        for state in optimizer_states
        for g in state["param_groups"]
    ]
    bases = [list(s["base_lrs"]) if "base_lrs" in s else None for s in scheduler_states]
    return {"groups": groups, "base_lrs": bases}


def _scaled(lrs: dict[str, Any], scale: float) -> dict[str, Any]:
    groups = [{k: float(v) * scale for k, v in g.items()} for g in lrs["groups"]]
    bases = [None if b is None else [float(v) * scale for v in b] for b in lrs["base_lrs"]]
    return {"groups": groups, "base_lrs": bases}


def _write_lrs(checkpoint: dict[str, Any], lrs: dict[str, Any]) -> None:
    groups = [g for state in checkpoint["optimizer_states"] for g in state["param_groups"]]
    for group, values in zip(groups, lrs["groups"], strict=False):
        group.update(values)
    for scheduler, bases in zip(checkpoint.get("lr_schedulers") or [], lrs["base_lrs"], strict=False):
        if bases is not None:
            scheduler["base_lrs"] = list(bases)
