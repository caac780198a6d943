"""Evaluations during training (sample grids, the metrics suite) that never cost a step's checkpoint.

Lightning runs every checkpoint callback's hooks after all other callbacks, so an evaluation in
``on_train_batch_end`` or ``on_train_end`` ran before its step was saved: a job stopped during the evaluation lost
the step, and a signal waited for the whole evaluation. A :class:`StepEvaluation`

* runs after every other callback but the checkpoint callbacks (moved there at setup), so the step's state updates
  (EMA, power-function EMA, guards) are done when it evaluates and when the step is saved;
* before evaluating, lets each checkpoint callback of the trainer run the same hook (``on_train_batch_end``,
  ``on_train_end``) for this step, so the step's checkpoint is complete first; Lightning's own call afterwards
  finds the step saved (``ModelCheckpoint`` saves a step once). A checkpoint ranked by a value this evaluation
  logs (``monitor: val/fid``) is left to its usual place, after the evaluation;
* calls the preemption guard's :meth:`~dip_lightning.training.callbacks.preemption.PreemptionGuard.stop_if_signalled`
  before, between the batches of and after the evaluation: a signal stops it, a preemption checkpoint is written
  only when the step is not saved yet, and the run exits with the signal's code (or requeues).

Why not defer the evaluation to a later hook instead: the next hook after the checkpoint is the next batch's start,
after its data was fetched, where a preemption save would hold a half-started step. Details: docs/design.md.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities import rank_zero_info

from dip_lightning.training.callbacks.preemption import PreemptionGuard

__all__ = ["StepEvaluation", "stop_if_signalled"]


def stop_if_signalled(trainer: pl.Trainer) -> None:
    """Stop the run now if a handled signal is pending on any rank (every rank must call it at the same points).

    Nothing happens without a :class:`PreemptionGuard` (a Trainer built outside the CLI may have none).
    """
    for guard in trainer.callbacks:
        if isinstance(guard, PreemptionGuard):
            guard.stop_if_signalled(trainer)


def _evaluations_before_checkpoints(callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` with every :class:`StepEvaluation` moved just before the first checkpoint callback (or to the
    end); every other callback keeps its place."""
    evaluations = [c for c in callbacks if isinstance(c, StepEvaluation)]
    others = [c for c in callbacks if not isinstance(c, StepEvaluation)]
    first = next((i for i, c in enumerate(others) if isinstance(c, Checkpoint)), len(others))
    return others[:first] + evaluations + others[first:]


class StepEvaluation(Callback):
    """Base of callbacks that evaluate the model at some step boundaries and at the end of training.

    Subclasses say when (:meth:`due_at_step`, :meth:`due_at_end`) and what (:meth:`evaluate_now`, which may call
    :func:`stop_if_signalled` between its batches on every rank); this class saves the step first and stops on
    signals (see the module docstring). The hooks run on every rank.
    """

    def due_at_step(self, trainer: pl.Trainer) -> bool:
        """Whether to evaluate at the end of this batch (called once per batch, on every rank)."""
        raise NotImplementedError

    def due_at_end(self, trainer: pl.Trainer) -> bool:
        """Whether to evaluate when training ends."""
        raise NotImplementedError

    def evaluate_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    def logged_keys(self) -> set[str]:
        """The ``callback_metrics`` keys an evaluation sets (a checkpoint monitoring one waits for it)."""
        return set()

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # A new list: Lightning is iterating over the old one to call this very hook.
            trainer.callbacks = _evaluations_before_checkpoints(trainer.callbacks)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.due_at_step(trainer):
            self._save_then_evaluate(
                trainer, pl_module, "on_train_batch_end", outputs=outputs, batch=batch, batch_idx=batch_idx
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.due_at_end(trainer):
            self._save_then_evaluate(trainer, pl_module, "on_train_end")

    def _save_then_evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, hook: str, **hook_args: Any
    ) -> None:
        keys = self.logged_keys()
        for checkpoint in trainer.checkpoint_callbacks:
            if getattr(checkpoint, "monitor", None) in keys:
                continue  # ranked by this evaluation's value: it must come after it
            getattr(checkpoint, hook)(trainer, pl_module, **hook_args)
        stop_if_signalled(trainer)
        rank_zero_info(f"{type(self).__name__}: evaluating step {trainer.global_step}.")
        self.evaluate_now(trainer, pl_module)
        stop_if_signalled(trainer)
