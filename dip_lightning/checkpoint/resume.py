"""Which checkpoint a (re)started ``fit`` continues from, and the optimizer settings a resume changes."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH

from dip_lightning.checkpoint import run_folder
from dip_lightning.checkpoint.io import peek_checkpoint

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


def _step(path: Path, weights_only: bool = True) -> int:
    return int(peek_checkpoint(path, weights_only).get("global_step", 0))


@dataclass
class ResumeDecision:
    """Where ``fit`` continues from and why (:func:`resolve_resume`)."""

    path: Path | None
    source: str  # "explicit", "preemption", "last" or "fresh"
    step: int | None = None
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    #: Settings this run changes against the checkpoint (execution options, optimizer settings).
    changed: list[str] = field(default_factory=list)

    def message(self) -> str:
        """One log line."""
        if self.path is None:
            text = "Resume: no checkpoint found; starting fresh."
        elif self.source == "explicit":
            text = f"Resume: from --ckpt_path {self.path} (step {self.step})."
        else:
            kind = "preemption checkpoint" if self.source == "preemption" else "last checkpoint"
            text = f"Resume: from {kind} {self.path} (step {self.step})."
        if self.ignored:
            text += " Ignored: " + "; ".join(f"{p.name} ({why})" for p, why in self.ignored) + "."
        if self.changed:
            text += " Changed by this run: " + "; ".join(self.changed) + "."
        return text


def resolve_resume(
    run_dir: _PATH,
    checkpoint_dir: _PATH | None = None,
    explicit: _PATH | None = None,
    weights_only: bool = True,
) -> ResumeDecision:
    """Pick the checkpoint a (re)started ``fit`` continues from.

    Order: ``explicit`` > the newest preemption checkpoint (``<run_dir>/hpc_ckpt_N.ckpt``, highest N) > the
    newest ``last.ckpt`` in ``checkpoint_dir`` (default ``<run_dir>/checkpoints``) > fresh start.

    Stale rule: a preemption checkpoint whose ``global_step`` is *below* that of ``last.ckpt`` comes from an
    older job of this run (the run was resumed and trained past it since), so it is ignored and reported in
    :attr:`ResumeDecision.ignored`; the next preemption save prunes it. At equal steps the preemption
    checkpoint wins (it is the later save of the same state). Older preemption checkpoints than the newest are
    ignored as well (they are normally pruned already). Unreadable candidates raise :class:`CheckpointError`.
    Steps are read lazily (:func:`peek_checkpoint`, ``weights_only`` as there).
    """
    if explicit:
        path = Path(explicit)
        step = _step(path, weights_only) if path.exists() else None
        return ResumeDecision(path, "explicit", step)
    checkpoint_dir = (
        Path(checkpoint_dir) if checkpoint_dir is not None else run_folder.checkpoint_dir(run_dir)
    )
    hpc = preemption_checkpoints(run_dir)
    ignored = [(p, "older preemption checkpoint") for p in hpc[:-1]]
    lasts = last_checkpoints(checkpoint_dir)
    last_step, last = None, None
    for path in lasts:  # normally just last.ckpt
        step = _step(path, weights_only)
        if last_step is None or step > last_step:
            last_step, last = step, path
    if hpc:
        newest = hpc[-1]
        hpc_step = _step(newest, weights_only)
        if last_step is None or hpc_step >= last_step:
            return ResumeDecision(newest, "preemption", hpc_step, ignored)
        ignored.append((newest, f"stale: step {hpc_step} is behind {last.name} at step {last_step}"))  # type: ignore[union-attr]
    if last is not None:
        return ResumeDecision(last, "last", last_step, ignored)
    return ResumeDecision(None, "fresh", None, ignored)


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
