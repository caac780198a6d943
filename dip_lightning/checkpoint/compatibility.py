"""Whether a checkpoint fits a model: tensors, architecture config and training objective compared, execution-only
options allowed to change."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH

from dip_lightning.checkpoint.io import CheckpointError


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another model (other tensors, shapes or ``net`` config)."""


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
    """The ``OBJECTIVE_FIELDS`` of the class a ``{"class_path", "init_args"}`` config names (LightningCLI stores
    every one), or None when the class declares none (or cannot be imported)."""
    config = _plain(config)
    if not isinstance(config, dict):
        return None
    fields = getattr(_class_of(config.get("class_path")), "OBJECTIVE_FIELDS", None)
    if not fields:
        return None
    init_args = config.get("init_args") or {}
    return {name: init_args.get(name) for name in fields}


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
