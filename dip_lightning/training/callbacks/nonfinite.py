"""Guard against non-finite training: skip the update of a step whose loss or gradient is NaN/inf, and stop after
``max_consecutive`` such steps in a row with an error that names the last good checkpoint.

Why: a diverged run would otherwise log ``nan``, exit 0 and write NaN checkpoints, and a resumed run that diverges
would overwrite its good ``last.ckpt``. A skipped step updates nothing (optimizer, LR schedule, every EMA) but
consumes its batch like any step, so resume stays exact; in DDP the ranks agree on each skip. Host mode
(``check_every_n_steps: 1``) reads the flag before every update and works with any optimizer; device mode (N > 1)
skips inside a fused optimizer without a per-step sync. The backstop is
:class:`~dip_lightning.checkpoint.io.AtomicCheckpointIO`, which refuses to write a non-finite checkpoint. Details:
docs/design.md.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from dip_lightning.core.compat import clear_device_skip, set_device_skip, supports_device_skip
from dip_lightning.core.errors import ConfigError, KitError

__all__ = [
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "StepJudge",
    "find_nonfinite_guard",
    "step_skipped",
    "update_keep",
]


class NonFiniteTrainingError(KitError, RuntimeError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""

    def __init__(
        self, step: int, consecutive: int, loss: float, grad_norm: float, last_good: str | None
    ) -> None:
        self.step = step
        self.consecutive = consecutive
        self.loss = loss
        self.grad_norm = grad_norm
        self.last_good = last_good
        where = (
            f"last good checkpoint: {last_good}"
            if last_good
            else "last good checkpoint: none (no checkpoint was written or resumed from in this run)"
        )
        super().__init__(
            f"non-finite training: {consecutive} optimizer steps in a row had a non-finite loss or gradient and "
            f"were skipped; stopped at step {step} (loss {loss}, gradient norm {grad_norm}); the weights are those "
            f"after step {step - consecutive}, the last update applied; {where}. Every checkpoint written is "
            "finite. Lower the learning rate, clip gradients (trainer.gradient_clip_val) or check the "
            "data, then resume from it (fit --ckpt_path)."
        )


def find_nonfinite_guard(trainer: pl.Trainer | None) -> NonFiniteGuard | None:
    """The trainer's :class:`NonFiniteGuard`, if any."""
    if trainer is None:
        return None
    return next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)


def step_skipped(trainer: pl.Trainer | None) -> bool:
    """Whether the guard (host mode) has skipped the update of the step that just ran."""
    guard = find_nonfinite_guard(trainer)
    return guard is not None and guard.skipped_this_step


def update_keep(trainer: pl.Trainer | None) -> Tensor | None:
    """Device mode: a 0-d float tensor, 1 when the step that just ran was applied, 0 when it was skipped (EMA
    updates multiply their weight by it); None in host mode or without a guard."""
    guard = find_nonfinite_guard(trainer)
    return guard.keep if guard is not None else None


class StepJudge(Callback):
    """A callback that makes :class:`NonFiniteGuard` skip finite steps too (the loss-spike guard): the guard asks
    it once per optimizer step, with the step's loss averaged over the ranks, and skips the step where it says so,
    by the same mechanism (and the same counts of updates) as a non-finite step."""

    def judge(self, step: int, loss: Tensor) -> Tensor:
        """A 0-d float tensor on the loss's device: 1 to skip optimizer step ``step`` (1-based), else 0. ``loss``
        is the same on every rank (NaN when some rank's loss is not finite); no host read is needed."""
        raise NotImplementedError


def find_step_judge(trainer: pl.Trainer) -> StepJudge | None:
    return next((c for c in trainer.callbacks if isinstance(c, StepJudge)), None)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class NonFiniteGuard(Callback):
    """Skip the update of a step whose loss or gradient is not finite; stop after ``max_consecutive`` in a row.

    What is skipped and how the ranks agree: the module docstring and docs/design.md. A :class:`StepJudge` among
    the trainer's callbacks (the loss-spike guard) makes it skip finite steps too, by the same mechanism.

    Args:
        max_consecutive: stop with :class:`NonFiniteTrainingError` after this many skipped steps in a row.
        check_every_n_steps: 1: check on the host every step; N > 1: skip on the device (``fused: true``), sync every N.
    """

    def __init__(self, max_consecutive: int = 10, check_every_n_steps: int = 1) -> None:
        if max_consecutive < 1:
            raise ConfigError(f"NonFiniteGuard: max_consecutive must be >= 1, got {max_consecutive}")
        if check_every_n_steps < 1:
            raise ConfigError(f"NonFiniteGuard: check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.max_consecutive = max_consecutive
        self.check_every_n_steps = check_every_n_steps
        self.skipped_this_step = False
        self.keep: Tensor | None = None
        self.skipped_total = 0  # host mode; device mode keeps device tensors until the next check
        self.consecutive = 0
        self.skipped_steps: list[int] = []  # host mode: the 1-based steps skipped in this run (first 1000)
        self._device_total: Tensor | None = None
        self._device_consecutive: Tensor | None = None
        self._last_loss: Tensor | None = None
        self._last_norm: Tensor | None = None
        self._step_at_start: int | None = None

    @property
    def device_mode(self) -> bool:
        return self.check_every_n_steps > 1

    # ------------------------------------------------------------------ setup
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.device_mode:
            return
        not_fused = [type(opt).__name__ for opt in trainer.optimizers if not supports_device_skip(opt)]
        if not_fused:
            raise ConfigError(
                f"NonFiniteGuard(check_every_n_steps={self.check_every_n_steps}) skips updates on the device, "
                f"which needs a fused optimizer; got {not_fused} without fused=True. Set "
                "model.optimizer.init_args.fused: true (AdamW, Adam, SGD), or check_every_n_steps: 1."
            )
        if trainer.lr_scheduler_configs:
            rank_zero_warn(
                "NonFiniteGuard: with check_every_n_steps > 1 the LR scheduler still steps on a skipped step."
            )
        device = trainer.strategy.root_device
        self._device_total = torch.full((), float(self.skipped_total), device=device)
        self._device_consecutive = torch.zeros((), device=device)

    # ------------------------------------------------------------------ the check
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.skipped_this_step = False
        self.keep = None
        self._step_at_start = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        device = trainer.strategy.root_device
        grads = [p.grad for p in _optimizer_params(optimizer) if p.grad is not None]
        norm = (
            torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros((), device=device)
        )
        loss = getattr(pl_module, "last_loss", None)
        finite = torch.isfinite(norm)
        if isinstance(loss, Tensor):
            finite = finite & torch.isfinite(loss.detach()).all()
        bad = (~finite).float()
        judge = find_step_judge(trainer)
        mean_loss = loss.detach().float().mean() if isinstance(loss, Tensor) else torch.full((), float("nan"))
        if trainer.world_size > 1:
            # One tiny all-reduce: a rank with a non-finite loss makes every rank skip (the gradients are already
            # averaged, but the losses are per rank), so the weights stay identical across ranks. The judge gets
            # the loss averaged over the ranks in the same collective, so its decisions agree on every rank.
            summed = trainer.strategy.reduce(torch.stack([bad, mean_loss.to(bad.device)]), reduce_op="sum")
            bad, mean_loss = (summed[0] > 0).float(), summed[1] / trainer.world_size
        self._last_loss, self._last_norm = loss.detach() if isinstance(loss, Tensor) else None, norm
        step = trainer.global_step + 1  # 1-based number of the step being taken
        skip = bad if judge is None else torch.maximum(bad, judge.judge(step, mean_loss.to(bad.device)))
        if self.device_mode:
            # The fused kernel skips its update where found_inf is 1 and restores its step counts (GradScaler's path).
            set_device_skip(optimizer, skip)
            self.keep = 1.0 - skip
            self._device_total += bad
            self._device_consecutive = (self._device_consecutive + bad) * bad
            return
        nonfinite, skipped = torch.stack([bad, skip]).tolist()  # the host read of host mode
        if nonfinite == 0.0:
            self.consecutive = 0
        if skipped == 0.0:
            return
        for param in _optimizer_params(optimizer):
            param.grad = None  # every torch.optim optimizer leaves a tensor without gradient untouched
        self.skipped_this_step = True
        if nonfinite == 0.0:
            return  # the judge's skip: counted and told by the judge
        self.skipped_total += 1
        self.consecutive += 1
        if len(self.skipped_steps) < 1000:
            self.skipped_steps.append(step)
        rank_zero_info(
            f"NonFiniteGuard: step {step} skipped (loss {self._host(self._last_loss)}, gradient norm "
            f"{self._host(norm)}); {self.consecutive} in a row, {self.skipped_total} in this run."
        )

    @staticmethod
    def _host(value: Tensor | None) -> float:
        return float("nan") if value is None else float(value.float().mean())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._step_at_start:
            return  # accumulating gradients: no optimizer step in this batch
        checking = step % self.check_every_n_steps == 0 or 0 < trainer.max_steps <= step
        if self.device_mode and self._device_total is not None and checking:
            counts = torch.stack([self._device_total, self._device_consecutive]).tolist()  # the one sync
            self.skipped_total, self.consecutive = int(counts[0]), int(counts[1])
        if self._logs_at(trainer, step):
            total = (
                self._device_total.clone() if self._device_total is not None else float(self.skipped_total)
            )
            pl_module.log("train/nonfinite_skipped", total)
        if self.consecutive >= self.max_consecutive:
            error = NonFiniteTrainingError(
                step,
                self.consecutive,
                self._host(self._last_loss),
                self._host(self._last_norm),
                self._last_good_checkpoint(trainer),
            )
            rank_zero_warn(str(error))
            raise error

    @staticmethod
    def _logs_at(trainer: pl.Trainer, step: int) -> bool:
        every = trainer.log_every_n_steps
        return every > 0 and step % every == 0

    @staticmethod
    def _last_good_checkpoint(trainer: pl.Trainer) -> str | None:
        """The newest checkpoint file this run wrote (every written file is finite: the IO refuses others),
        else the one it resumed from."""
        io = getattr(trainer.strategy, "checkpoint_io", None)
        written = getattr(io, "last_written", None)
        if written:
            step = getattr(io, "last_written_step", None)
            return f"{written} (step {step})" if step is not None else str(written)
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        return last or (str(trainer.ckpt_path) if trainer.ckpt_path else None)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for optimizer in trainer.optimizers:
            clear_device_skip(optimizer)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        total = self.skipped_total
        if self.device_mode and self._device_total is not None:
            total = int(self._device_total.item())  # at a save only
        return {"skipped_total": total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        if self._device_total is not None:
            self._device_total.fill_(self.skipped_total)
