"""Whether a checkpoint fits a model: its tensors, architecture config and training objective are compared, so
that a resume or a load into another experiment fails with a message that names the differences; execution-only
options (how a component computes, not what) may change."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH

from dip_lightning.checkpoint.io import CheckpointError
from dip_lightning.checkpoint.stored_config import plain_config


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another model (other tensors, shapes or ``net`` config)."""


# --------------------------------------------------------------------------------------- compatibility


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(sub, f"{prefix}.{key}" if prefix else key, out)
    else:
        out[prefix] = value
    return out


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every leaf that differs between two nested configs."""
    a = _flatten(plain_config(saved), prefix, {})
    b = _flatten(plain_config(current), prefix, {})
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
    config = plain_config(config)
    if isinstance(config, dict):
        for name in getattr(_class_of(config.get("class_path")), "EXECUTION_OPTIONS", ()):
            keys.add(f"{prefix}.init_args.{name}" if prefix else f"init_args.{name}")
        for key, sub in config.items():
            keys |= execution_option_keys(sub, f"{prefix}.{key}" if prefix else str(key))
    return keys


def objective_settings(config: Any) -> dict[str, Any] | None:
    """The ``OBJECTIVE_FIELDS`` of the class a ``{"class_path", "init_args"}`` config names (LightningCLI stores
    every one), or None when the class declares none (or cannot be imported)."""
    config = plain_config(config)
    if not isinstance(config, dict):
        return None
    fields = getattr(_class_of(config.get("class_path")), "OBJECTIVE_FIELDS", None)
    if not fields:
        return None
    init_args = config.get("init_args") or {}
    return {name: init_args.get(name) for name in fields}


def _listed(names: list[str], max_listed: int) -> str:
    """The first ``max_listed`` names, then how many more there are."""
    more = f" (+{len(names) - max_listed} more)" if len(names) > max_listed else ""
    return f"{', '.join(names[:max_listed])}{more}"


def _config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str]
) -> tuple[list[str], list[str]]:
    """Problems (architecture settings that differ) and changes (execution options that differ) of ``keys``."""
    problems, changed = [], []
    for key in keys:
        if key not in saved or key not in current:
            continue
        execution = execution_option_keys(current[key], key) | execution_option_keys(saved[key], key)
        for name, old, new in config_differences(saved[key], current[key], prefix=key):
            if name in execution:
                changed.append(f"{name}: {old!r} -> {new!r}")
            else:
                problems.append(f"config {name}: checkpoint {old!r}, this run {new!r}")
    return problems, changed


def _objective_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str]
) -> list[str]:
    """The ``OBJECTIVE_FIELDS`` (:func:`objective_settings`) of ``keys`` that differ."""
    problems = []
    for key in keys:
        if key not in saved or key not in current:
            continue
        saved_fields, fields = objective_settings(saved[key]), objective_settings(current[key])
        if saved_fields is None or fields is None:
            continue
        for name in fields:
            if saved_fields.get(name) != fields[name]:
                problems.append(
                    f"config {key}.init_args.{name}: checkpoint {saved_fields.get(name)!r}, this run {fields[name]!r}"
                )
    return problems


def _tensor_differences(saved: Any, model: torch.nn.Module, max_listed: int) -> list[str]:
    """Tensors of ``model`` missing from the checkpoint's ``state_dict`` ``saved``, unexpected there, or of
    another shape."""
    if not isinstance(saved, Mapping):
        return ["no state_dict in the checkpoint"]
    current = model.state_dict()
    problems = []
    for label, keys in (
        ("tensors missing from the checkpoint", sorted(set(current) - set(saved))),
        ("unexpected tensors", sorted(set(saved) - set(current))),
    ):
        if keys:
            problems.append(f"{label}: {_listed(keys, max_listed)}")
    shapes = [
        f"{k} {list(saved[k].shape)} vs {list(current[k].shape)}"
        for k in current
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(current[k].shape)
    ]
    if shapes:
        problems.append(
            f"{len(shapes)} tensors differ in shape (checkpoint vs this run): {_listed(shapes, max_listed)}"
        )
    return problems


def check_compatible(
    checkpoint: Mapping[str, Any],  # the loaded checkpoint
    model: torch.nn.Module,  # the model it should load into, with its ``hparams``
    path: _PATH,  # where the checkpoint is, for the message
    config_keys: Iterable[str] = ("net",),  # hyper-parameters that must match: the architecture
    max_listed: int = 5,  # mismatching tensors named in the message, of each kind
    advice: str = RESUME_ADVICE,  # the message's last sentence: what the loading command should be given instead
    objective_keys: Iterable[str] = (
        "flow",
    ),  # hyper-parameters compared on their class's ``OBJECTIVE_FIELDS``
) -> list[str]:
    """Raise :class:`CheckpointMismatchError` if ``checkpoint`` was written for another model.

    Compares the tensors (names and shapes of ``state_dict``) with ``model``'s, and the hyper-parameters named
    in ``config_keys`` (changes of e.g. the learning rate are legitimate on resume). The objective
    (``objective_keys``) is compared on its ``OBJECTIVE_FIELDS`` only: another prediction target, loss space,
    loss weight, time distribution or noise scale is a different experiment, like another architecture, while
    its other settings (time shift, label dropout) may change on resume.

    Execution-only options (:func:`execution_option_keys`, and the model class's own ``EXECUTION_OPTIONS``
    such as ``compile``) may differ: they are returned as ``"key: old -> new"`` lines for the resume log.
    """
    hparams = getattr(model, "hparams", {}) or {}
    saved_hparams = checkpoint.get("hyper_parameters") or {}
    problems, changed = _config_differences(saved_hparams, hparams, config_keys)
    problems += _objective_differences(saved_hparams, hparams, objective_keys)
    for name in getattr(type(model), "EXECUTION_OPTIONS", ()):
        if name in saved_hparams and name in hparams and saved_hparams[name] != hparams[name]:
            changed.append(f"{name}: {saved_hparams[name]!r} -> {hparams[name]!r}")
    problems += _tensor_differences(checkpoint.get("state_dict"), model, max_listed)
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for another model configuration:\n  - "
            + "\n  - ".join(problems)
            + f"\nNothing was loaded or written. {advice}"
        )
    return changed
