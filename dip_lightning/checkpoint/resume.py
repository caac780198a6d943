"""Which checkpoint a (re)started ``fit`` continues from, and the optimizer settings a resume changes."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH

from dip_lightning.checkpoint import run_folder
from dip_lightning.checkpoint.io import CheckpointError, DamagedCheckpointError, peek_checkpoint

_LAST_RE = re.compile(r"^last(-v\d+)?\.ckpt$")


# ------------------------------------------------------------------------------------ preemption files
def preemption_checkpoints(run_dir: _PATH) -> list[Path]:
    """``hpc_ckpt_N.ckpt`` files in the run folder, oldest (lowest N) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in run_dir.iterdir()
        if (m := run_folder.PREEMPTION_NAME.match(p.name)) and p.is_file()
    ]
    return [p for _, p in sorted(found)]


def next_preemption_path(run_dir: _PATH) -> Path:
    """``hpc_ckpt_{N+1}.ckpt`` after the highest existing N (Lightning's naming, strict file-name match)."""
    existing = preemption_checkpoints(run_dir)
    newest = run_folder.PREEMPTION_NAME.match(existing[-1].name) if existing else None
    return run_folder.preemption_path(run_dir, int(newest.group(1)) + 1 if newest else 1)


def prune_preemption_checkpoints(run_dir: _PATH, keep: _PATH) -> list[Path]:
    """Delete every preemption checkpoint in ``run_dir`` but ``keep``; call once ``keep`` is fully written."""
    keep = Path(keep).resolve()
    removed = []
    for path in preemption_checkpoints(run_dir):
        if path.resolve() != keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def last_checkpoints(checkpoint_dir: _PATH) -> list[Path]:
    """``last.ckpt`` (and ``last-vN.ckpt``) in the checkpoint folder."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.iterdir() if _LAST_RE.match(p.name) and p.exists())


def step_checkpoints(checkpoint_dir: _PATH) -> list[tuple[int, Path]]:
    """``(step, path)`` of the periodic ``step########.ckpt`` files in the checkpoint folder, newest first (the
    step as the name gives it)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := run_folder.STEP_NAME.match(p.name))
    ]
    return sorted(found, reverse=True)


def _step(path: Path, weights_only: bool = True) -> int:
    return int(peek_checkpoint(path, weights_only).get("global_step", 0))


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint into ``damaged/`` beside it (a rename: never deleted); returns its new path."""
    target = run_folder.damaged_path(path)
    target.parent.mkdir(exist_ok=True)
    os.rename(path, target)
    return target


def _damage(path: Path) -> str:
    with contextlib.suppress(OSError):
        size = path.stat().st_size
        return "empty file" if size == 0 else f"truncated or corrupt, {size} bytes"
    return "truncated or corrupt"


#: Which kind of checkpoint wins at equal ``global_step``: the preemption save is the later save of the same state.
_TIE_ORDER = {"step": 0, "last": 1, "preemption": 2}
_KIND = {"preemption": "preemption checkpoint", "last": "last checkpoint", "step": "step checkpoint"}


@dataclass
class ResumeDecision:
    """Where ``fit`` continues from and why (:func:`resolve_resume`)."""

    path: Path | None
    source: str  # "explicit", "preemption", "last", "step" or "fresh"
    step: int | None = None
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    #: Damaged candidates moved into ``damaged/``: ``(old path, new path, what is wrong)``.
    set_aside: list[tuple[Path, Path, str]] = field(default_factory=list)
    #: Settings this run changes against the checkpoint (execution options, optimizer settings).
    changed: list[str] = field(default_factory=list)

    def message(self) -> str:
        """One log line."""
        if self.path is None:
            text = "Resume: no checkpoint found; starting fresh."
        elif self.source == "explicit":
            text = f"Resume: from --ckpt_path {self.path} (step {self.step})."
        else:
            text = f"Resume: from {_KIND[self.source]} {self.path} (step {self.step})."
        if self.set_aside:
            moved = "; ".join(f"{old.name} -> {new} ({why})" for old, new, why in self.set_aside)
            text += f" Set aside as damaged: {moved}."
        if self.ignored:
            text += " Ignored: " + "; ".join(f"{p.name} ({why})" for p, why in self.ignored) + "."
        if self.changed:
            text += " Changed by this run: " + "; ".join(self.changed) + "."
        return text


@dataclass(frozen=True)
class _Candidate:
    step: int
    source: str
    path: Path

    @property
    def rank(self) -> tuple[int, int]:
        return self.step, _TIE_ORDER[self.source]


class _Candidates:
    """The complete checkpoints found so far; damaged ones are set aside (or, on other ranks, skipped)."""

    def __init__(self, decision: ResumeDecision, weights_only: bool, move_damaged: bool) -> None:
        self.decision, self.weights_only, self.move_damaged = decision, weights_only, move_damaged
        self.found: list[_Candidate] = []

    def add(self, path: Path, source: str) -> _Candidate | None:
        """Read ``path``'s step; None (and the file set aside or noted) when it is damaged or gone."""
        try:
            candidate = _Candidate(_step(path, self.weights_only), source, path)
        except FileNotFoundError:
            return None  # set aside by rank 0 meanwhile
        except DamagedCheckpointError:
            why = _damage(path)
            if not self.move_damaged:
                self.decision.ignored.append((path, f"damaged: {why}"))
                return None
            try:
                self.decision.set_aside.append((path, set_aside(path), why))
            except FileNotFoundError:
                pass
            except OSError as err:
                self.decision.ignored.append((path, f"damaged: {why}; could not be set aside: {err}"))
            return None
        self.found.append(candidate)
        return candidate

    def best(self) -> _Candidate | None:
        return max(self.found, key=lambda c: c.rank, default=None)


def resolve_resume(
    run_dir: _PATH,
    checkpoint_dir: _PATH | None = None,
    explicit: _PATH | None = None,
    weights_only: bool = True,
    move_damaged: bool = False,
) -> ResumeDecision:
    """Pick the checkpoint a (re)started ``fit`` continues from: ``explicit``, else the newest complete one.

    Candidates: the newest complete preemption checkpoint (``<run_dir>/hpc_ckpt_N.ckpt``, highest N; older N are
    older saves), every ``last*.ckpt`` and the newest complete ``step########.ckpt`` in ``checkpoint_dir``
    (default ``<run_dir>/checkpoints``). The one with the highest ``global_step`` wins; at equal steps a preemption
    checkpoint before ``last.ckpt`` before a step file (later saves of the same state). A preemption checkpoint
    behind the winner (an older job's: the next preemption save prunes it) and a ``last.ckpt`` behind a step file
    are reported in :attr:`ResumeDecision.ignored`.

    A damaged candidate (truncated, empty, corrupt) is skipped and the next newest complete one used; with
    ``move_damaged`` (``fit``'s rank 0) it is also moved into ``damaged/`` beside it and listed in
    :attr:`ResumeDecision.set_aside`, else listed in :attr:`ResumeDecision.ignored`. A damaged ``explicit`` file
    raises :class:`CheckpointError` (it was asked for). Steps are read lazily (:func:`peek_checkpoint`,
    ``weights_only`` as there), so a truncated file is found without reading it whole; a file ``weights_only``
    refuses raises, it is not damaged.
    """
    if explicit:
        path = Path(explicit)
        step = _step(path, weights_only) if path.exists() else None
        return ResumeDecision(path, "explicit", step)
    checkpoint_dir = (
        Path(checkpoint_dir) if checkpoint_dir is not None else run_folder.checkpoint_dir(run_dir)
    )
    decision = ResumeDecision(None, "fresh")
    candidates = _Candidates(decision, weights_only, move_damaged)
    preemption = preemption_checkpoints(run_dir)
    while preemption and candidates.add(preemption.pop(), "preemption") is None:
        pass  # the newest complete preemption checkpoint counts; older ones are normally pruned already
    decision.ignored += [(p, "older preemption checkpoint") for p in preemption]
    for path in last_checkpoints(checkpoint_dir):
        candidates.add(path, "last")
    for name_step, path in step_checkpoints(checkpoint_dir):
        best = candidates.best()
        if best is not None and name_step < best.step:
            break
        if candidates.add(path, "step") is not None:
            break  # the newest complete step file
    best = candidates.best()
    if best is None:
        return decision
    decision.path, decision.source, decision.step = best.path, best.source, best.step
    for other in candidates.found:
        # Worth a word: an old job's preemption checkpoint, and a last.ckpt that a step file is ahead of (a save
        # of last.ckpt failed). A last.ckpt behind a preemption checkpoint is the normal case.
        surprising = other.source == "preemption" or (other.source == "last" and best.source == "step")
        if other.step < best.step and surprising:
            decision.ignored.append(
                (other.path, f"stale: step {other.step} is behind {best.path.name} at step {best.step}")
            )
    return decision


def supersede_newer(
    run_dir: _PATH, checkpoint_dir: _PATH, step: int, weights_only: bool = True
) -> list[tuple[Path, Path]]:
    """Move the run folder's checkpoints saved after ``step`` into ``superseded/`` beside them (never deleted).

    Call when ``fit --ckpt_path`` continues from an earlier ``step`` of the run: those files belong to the
    abandoned continuation, and a later resume (newest complete checkpoint first) would return to them.
    Returns ``(old path, new path)`` pairs. Unreadable files are left where they are.
    """
    files = (
        preemption_checkpoints(run_dir)
        + last_checkpoints(checkpoint_dir)
        + [p for s, p in step_checkpoints(checkpoint_dir) if s > step]
    )
    moved = []
    for path in files:
        try:
            newer = _step(path, weights_only) > step
        except (CheckpointError, OSError):
            continue
        if newer:
            target = run_folder.superseded_path(path)
            target.parent.mkdir(exist_ok=True)
            os.rename(path, target)
            moved.append((path, target))
    return moved


# ------------------------------------------------------------------------------------------ optimizer settings
@dataclass
class OptimizerSettingChange:
    """A hyperparameter of a restored param group that the run's configured optimizer sets differently."""

    group: int
    key: str
    saved: Any
    configured: Any

    def __str__(self) -> str:
        where = f"optimizer group {self.group} " if self.group else "optimizer "
        return f"{where}{self.key}: {self.saved!r} -> {self.configured!r}"


def _base_lr(group: Mapping[str, Any]) -> Any:
    # A scheduler keeps the configured lr as `initial_lr` and moves `lr`; without one `lr` is the setting.
    return group.get("initial_lr", group.get("lr"))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu())
    return a == b


def optimizer_setting_changes(
    checkpoint: Mapping[str, Any], optimizer: torch.optim.Optimizer
) -> list[OptimizerSettingChange]:
    """Where the checkpoint's optimizer settings (lr, betas, weight decay, ...) differ from ``optimizer``'s.

    ``optimizer`` is the one the run's configuration builds (before any state is loaded). The learning rate is
    compared as the configured base value (``initial_lr`` under a scheduler).
    """
    states = checkpoint.get("optimizer_states") or []
    if not states:
        return []
    saved_groups = states[0].get("param_groups", [])
    changes = []
    for i, (saved, configured) in enumerate(zip(saved_groups, optimizer.param_groups)):
        for key in sorted(set(configured) - {"params", "initial_lr"}):
            if key not in saved:
                continue
            old, new = (
                (_base_lr(saved), _base_lr(configured)) if key == "lr" else (saved[key], configured[key])
            )
            if not _same(old, new):
                changes.append(OptimizerSettingChange(i, key, old, new))
    return changes


def apply_optimizer_setting_changes(
    checkpoint: MutableMapping[str, Any], changes: Iterable[OptimizerSettingChange]
) -> None:
    """Write configured settings into the checkpoint's optimizer (and scheduler) state before Lightning loads it.

    A new base learning rate under a scheduler rescales the scheduled lr by new/old and replaces the
    scheduler's ``base_lrs`` entry, so the schedule continues from the same point with the new peak.
    """
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    schedulers = checkpoint.get("lr_schedulers") or []
    for change in changes:
        group = groups[change.group]
        if change.key != "lr":
            group[change.key] = change.configured
            continue
        if "initial_lr" in group:
            group["lr"] = group["lr"] * (change.configured / change.saved)
            group["initial_lr"] = change.configured
            for scheduler in schedulers:
                base_lrs = scheduler.get("base_lrs")
                if base_lrs is not None and change.group < len(base_lrs):
                    base_lrs[change.group] = change.configured
        else:
            group["lr"] = change.configured
