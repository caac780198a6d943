"""Checkpoint files for exact resume: atomic saves, clear load errors, resume resolution, config checks.

Lightning provides the pieces (``TorchCheckpointIO``, ``hpc_ckpt_N.ckpt`` preemption checkpoints,
``last.ckpt``); this module closes the gaps that matter when jobs are killed and requeued all the time:

* :class:`AtomicCheckpointIO`: a save writes a temporary file next to the target, fsyncs it and renames it
  over the target. A process killed during a save leaves the previous checkpoint intact and loadable.
* :func:`resolve_resume`: which checkpoint a (re)started ``fit`` continues from: explicit ``--ckpt_path`` >
  newest preemption checkpoint > ``last.ckpt`` > fresh start, with preemption checkpoints from an older job
  (behind ``last.ckpt``) recognised as stale and ignored.
* :func:`check_compatible`: a checkpoint written for another model (other shapes or another ``net`` config) is
  an error that names the mismatch, raised before anything is written; execution-only options (activation
  checkpointing, memory layout, compilation: each class's ``EXECUTION_OPTIONS``) may change on resume.
* :func:`optimizer_setting_changes` / :func:`apply_optimizer_setting_changes`: a resume trains with the
  configured optimizer settings (a new learning rate for a later phase), not the ones the checkpoint saved.
* preemption checkpoint naming and pruning (:func:`next_preemption_path`,
  :func:`prune_preemption_checkpoints`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dip_lightning.atomic import atomic_write

__all__ = [
    "AtomicCheckpointIO",
    "OptimizerSettingChange",
    "apply_optimizer_setting_changes",
    "optimizer_setting_changes",
    "CheckpointError",
    "CheckpointMismatchError",
    "NonFiniteCheckpointError",
    "nonfinite_tensors",
    "ResumeDecision",
    "check_compatible",
    "execution_option_keys",
    "clean_partial_files",
    "next_preemption_path",
    "peek_checkpoint",
    "preemption_checkpoints",
    "prune_preemption_checkpoints",
    "resolve_resume",
]

# Lightning's name for preemption ("hpc") checkpoints in trainer.default_root_dir; kept so that plain
# Lightning (`fit(ckpt_path="hpc")`) still finds them.
_HPC_RE = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")
_LAST_RE = re.compile(r"^last(-v\d+)?\.ckpt$")
# Temporary files of unfinished saves live in this hidden sub-folder of the target's folder (same filesystem,
# so the final rename is atomic). Not `<name>.tmp-<pid>` next to the target: Lightning numbers preemption
# checkpoints by the digits of *every* file name containing "ckpt_" in the run folder (`hpc_save_path`,
# `_hpc_resume_path`), so a leftover `hpc_ckpt_3.ckpt.tmp-4711` would make it look for `hpc_ckpt_34711.ckpt`.
PARTIAL_DIR = ".partial"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable (truncated, corrupt) or written for another model."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint about to be written holds NaN or infinite values; it was not written."""


def nonfinite_tensors(checkpoint: Any, prefix: str = "") -> list[str]:
    """Where ``checkpoint`` (nested dicts, lists, tuples) holds floating-point tensors with a NaN or inf entry.

    One reduction per tensor and one device-to-host read per device at the end (a save is a sync point anyway).
    Scalars in ``ModelCheckpoint``'s state are left out: it stores ``inf`` as the initial best score by design.
    """
    found: list[tuple[str, torch.Tensor]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            bookkeeping = value.ndim == 0 and where.startswith("callbacks.ModelCheckpoint")
            if (value.is_floating_point() or value.is_complex()) and value.numel() and not bookkeeping:
                found.append((where, torch.isfinite(value.detach()).all()))
        elif isinstance(value, Mapping):
            for key, sub in value.items():
                walk(sub, f"{where}.{key}" if where else str(key))
        elif isinstance(value, (list, tuple)):
            for i, sub in enumerate(value):
                walk(sub, f"{where}[{i}]")

    walk(checkpoint, prefix)
    if not found:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, flag) in enumerate(found):
        by_device.setdefault(flag.device, []).append(i)
    bad: list[str] = []
    for indices in by_device.values():
        flags = torch.stack([found[i][1] for i in indices]).tolist()
        bad += [found[i][0] for i, ok in zip(indices, flags) if not ok]
    return sorted(bad)


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another model (other tensors, shapes or ``net`` config)."""


def _is_local(path: _PATH) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def _local_path(path: _PATH) -> Path:
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def _describe_load_error(path: _PATH, err: BaseException) -> str:
    """One line for every command that reads checkpoints (fit, sample, convert): the file, the problem, the fix."""
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err).lower():
        return (
            f"cannot load checkpoint {path}: it holds objects that torch.load(weights_only=True) refuses "
            f"({str(err).splitlines()[0]}). Only if you trust its origin, load it without that restriction "
            "(fit: --weights_only=false; sample, convert: --trust_pickle)."
        )
    first = str(err).splitlines()[0] if str(err) else ""
    return (
        f"cannot load checkpoint {path}: the file is truncated or corrupt, or not a PyTorch checkpoint "
        f"({type(err).__name__}: {first}). A save interrupted by this kit never leaves such a file under its "
        "final name, so it was damaged or copied incompletely: copy it again, or delete it and use another "
        "checkpoint (a resume then falls back to the next one)."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and durable, and whose load errors say what is wrong.

    Why not the stock plugin: Lightning 2.6 serialises the whole checkpoint into memory, then writes it
    through an fsspec transaction whose temporary file lives in the system temp folder
    (``tempfile.mkstemp()``). When that is another filesystem than the run folder (local ``/tmp`` vs. a shared
    cluster filesystem, the usual case) the final move is a copy: a job killed during it leaves a truncated
    checkpoint under the final name, and nothing is fsynced. Here a local save streams ``torch.save`` through
    :func:`dip_lightning.atomic.atomic_write` with its temporary file in ``<folder>/.partial/``: killed at any
    point, the target is either the complete old file or the complete new one. Remote URLs (``s3://`` ...)
    keep the stock behaviour.

    Loading wraps unreadable files in a :class:`CheckpointError` naming the file and the likely cause, instead
    of ``PytorchStreamReader failed reading zip archive``.

    A checkpoint holding a NaN or infinite floating-point tensor (weights, EMA, optimizer state: anything in
    the dictionary) is not written: :class:`NonFiniteCheckpointError`, and the previous file under that name
    stays as it was (``check_finite=False`` turns the check off). :attr:`last_written` is the last file this
    plugin wrote.
    """

    def __init__(self, check_finite: bool = True) -> None:
        super().__init__()
        self.check_finite = check_finite
        self.last_written: Path | str | None = None
        self.last_written_step: int | None = None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if self.check_finite:
            bad = nonfinite_tensors(checkpoint)
            if bad:
                shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                raise NonFiniteCheckpointError(
                    f"refusing to write checkpoint {path}: {len(bad)} tensor(s) hold NaN or inf ({shown}); the "
                    "previous file under that name (if any) is kept. Training diverged: add the "
                    "dip_lightning.callbacks.NonFiniteGuard callback, which skips such steps, and resume from the "
                    "last good checkpoint."
                )
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            self.last_written, self.last_written_step = str(path), checkpoint.get("global_step")
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not support `storage_options`; got {storage_options!r}"
            )
        target = _local_path(path)
        partial_dir = target.parent / PARTIAL_DIR
        with atomic_write(target, temp_dir=partial_dir) as fh:
            self._write(checkpoint, fh)
        self.last_written, self.last_written_step = target, checkpoint.get("global_step")
        with contextlib.suppress(OSError):  # only succeeds when no other save is in flight
            partial_dir.rmdir()

    def _write(self, checkpoint: dict[str, Any], fh: Any) -> None:
        """Serialise into the open temporary file (a separate method so tests can slow a save down)."""
        torch.save(checkpoint, fh)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise CheckpointError(_describe_load_error(path, err)) from err


def clean_partial_files(folders: Iterable[_PATH]) -> list[Path]:
    """Delete leftovers of interrupted saves (``<folder>/.partial/*``); returns what was removed.

    Call only when no save can be in flight (before training starts, on one process).
    """
    removed = []
    for folder in folders:
        partial_dir = Path(folder) / PARTIAL_DIR
        if not partial_dir.is_dir():
            continue
        for leftover in partial_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
                removed.append(leftover)
        with contextlib.suppress(OSError):
            partial_dir.rmdir()
    return removed


# ------------------------------------------------------------------------------------ preemption files
def preemption_checkpoints(run_dir: _PATH) -> list[Path]:
    """``hpc_ckpt_N.ckpt`` files in the run folder, oldest (lowest N) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _HPC_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def next_preemption_path(run_dir: _PATH) -> Path:
    """``hpc_ckpt_{N+1}.ckpt`` after the highest existing N (Lightning's naming, strict file-name match)."""
    existing = preemption_checkpoints(run_dir)
    n = int(_HPC_RE.match(existing[-1].name).group(1)) if existing else 0  # type: ignore[union-attr]
    return Path(run_dir) / f"hpc_ckpt_{n + 1}.ckpt"


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


# --------------------------------------------------------------------------------------------- reading
def peek_checkpoint(path: _PATH, weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint lazily (memory-mapped, tensors on CPU) to read its step, config and tensor shapes.

    Costs little even for multi-GB files: tensor data is only read when touched. ``weights_only`` as in
    ``torch.load`` (and ``fit(weights_only=...)``). Raises :class:`CheckpointError` for unreadable files.
    """
    try:
        # Only zip-format files can be memory-mapped; the legacy format (and a file that is no checkpoint at
        # all) then reaches torch's own reader, whose error names the problem.
        mmap = zipfile.is_zipfile(path)
        return torch.load(str(path), map_location="cpu", mmap=mmap, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CheckpointError(_describe_load_error(path, err)) from err


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
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(run_dir) / "checkpoints"
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


# --------------------------------------------------------------------------------------- compatibility
def _plain(value: Any) -> Any:
    """Config values (dicts, jsonargparse Namespaces, lists) as plain nested dicts/lists."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(sub, f"{prefix}.{key}" if prefix else key, out)
    else:
        out[prefix] = value
    return out


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every leaf that differs between two nested configs."""
    a = _flatten(_plain(saved), prefix, {})
    b = _flatten(_plain(current), prefix, {})
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            diffs.append((key, None if va is missing else va, None if vb is missing else vb))
    return diffs


RESUME_ADVICE = (
    "To start a new experiment, use another trainer.default_root_dir; to continue this one, run it with the "
    "configuration it started with."
)


def _class_of(class_path: Any) -> type | None:
    """The class a config's ``class_path`` names, or None when it cannot be imported."""
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return None


def execution_option_keys(config: Any, prefix: str = "") -> set[str]:
    """Flattened keys (as :func:`config_differences` names them) of the execution-only options in a config.

    An execution option changes how a component computes, not what (activation checkpointing, memory layout,
    dense small convolutions, compilation). Each class declares its own in a class attribute
    ``EXECUTION_OPTIONS``; here every ``{"class_path": ..., "init_args": {...}}`` of the config is looked up.
    """
    keys: set[str] = set()
    config = _plain(config)
    if isinstance(config, dict):
        for name in getattr(_class_of(config.get("class_path")), "EXECUTION_OPTIONS", ()):
            keys.add(f"{prefix}.init_args.{name}" if prefix else f"init_args.{name}")
        for key, sub in config.items():
            keys |= execution_option_keys(sub, f"{prefix}.{key}" if prefix else str(key))
    return keys


def objective_settings(config: Any) -> dict[str, Any] | None:
    """The ``OBJECTIVE_FIELDS`` of the class a ``{"class_path", "init_args"}`` config names, with the
    constructor's defaults for fields the config lacks (a checkpoint of an older kit), or None when the class
    declares none (or cannot be imported)."""
    config = _plain(config)
    if not isinstance(config, dict):
        return None
    cls = _class_of(config.get("class_path"))
    fields = getattr(cls, "OBJECTIVE_FIELDS", None)
    if cls is None or not fields:
        return None
    defaults = {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    init_args = config.get("init_args") or {}
    return {name: init_args.get(name, defaults.get(name)) for name in fields}


def check_compatible(
    checkpoint: Mapping[str, Any],
    model: torch.nn.Module,
    path: _PATH,
    config_keys: Iterable[str] = ("net",),
    max_listed: int = 5,
    advice: str = RESUME_ADVICE,
    objective_keys: Iterable[str] = ("flow",),
) -> list[str]:
    """Raise :class:`CheckpointMismatchError` if ``checkpoint`` was written for another model.

    Compares the tensors (names and shapes of ``state_dict``) with ``model``'s, and the hyper-parameters named
    in ``config_keys`` (the network architecture; changes of e.g. the learning rate are legitimate on resume).
    The message names the differing config values and the first mismatching tensors, then ``advice`` (what the
    command that loads it should be given instead).

    The hyper-parameters named in ``objective_keys`` (the training objective, ``model.flow``) are compared on the
    fields their class lists in ``OBJECTIVE_FIELDS`` (:func:`objective_settings`): another prediction target,
    loss space, loss weight, time distribution or noise scale is a different experiment, like another
    architecture. Its other settings (time shift, label dropout) may change on resume, as before.

    Execution-only options (:func:`execution_option_keys`, and the model class's own ``EXECUTION_OPTIONS``
    such as ``compile``) may differ: they are returned as ``"key: old -> new"`` lines for the resume log.
    """
    problems, changed = [], []
    hparams = getattr(model, "hparams", {}) or {}
    saved_hparams = checkpoint.get("hyper_parameters") or {}
    for key in config_keys:
        if key in saved_hparams and key in hparams:
            execution = execution_option_keys(hparams[key], key) | execution_option_keys(
                saved_hparams[key], key
            )
            for name, old, new in config_differences(saved_hparams[key], hparams[key], prefix=key):
                if name in execution:
                    changed.append(f"{name}: {old!r} -> {new!r}")
                else:
                    problems.append(f"config {name}: checkpoint {old!r}, this run {new!r}")
    for key in objective_keys:
        if key in saved_hparams and key in hparams:
            saved_fields = objective_settings(saved_hparams[key])
            fields = objective_settings(hparams[key])
            if saved_fields is not None and fields is not None:
                for name in fields:
                    if saved_fields.get(name) != fields[name]:
                        problems.append(
                            f"config {key}.init_args.{name}: checkpoint {saved_fields.get(name)!r}, "
                            f"this run {fields[name]!r}"
                        )
    for name in getattr(type(model), "EXECUTION_OPTIONS", ()):
        if name in saved_hparams and name in hparams and saved_hparams[name] != hparams[name]:
            changed.append(f"{name}: {saved_hparams[name]!r} -> {hparams[name]!r}")
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, Mapping):
        problems.append("no state_dict in the checkpoint")
    else:
        current = model.state_dict()
        missing = sorted(set(current) - set(saved))
        unexpected = sorted(set(saved) - set(current))
        shapes = [
            (k, tuple(saved[k].shape), tuple(current[k].shape))
            for k in current
            if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(current[k].shape)
        ]
        for label, keys in (
            ("tensors missing from the checkpoint", missing),
            ("unexpected tensors", unexpected),
        ):
            if keys:
                more = f" (+{len(keys) - max_listed} more)" if len(keys) > max_listed else ""
                problems.append(f"{label}: {', '.join(keys[:max_listed])}{more}")
        if shapes:
            listed = ", ".join(f"{k} {list(a)} vs {list(b)}" for k, a, b in shapes[:max_listed])
            more = f" (+{len(shapes) - max_listed} more)" if len(shapes) > max_listed else ""
            problems.append(f"{len(shapes)} tensors differ in shape (checkpoint vs this run): {listed}{more}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for another model configuration:\n  - "
            + "\n  - ".join(problems)
            + f"\nNothing was loaded or written. {advice}"
        )
    return changed


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
