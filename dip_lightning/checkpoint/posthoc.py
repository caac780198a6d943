"""Post-hoc EMA snapshot files and the reconstruction of any profile from them."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dip_lightning.checkpoint.format import RECONSTRUCTION_RECORD, std_key
from dip_lightning.checkpoint.io import CheckpointError
from dip_lightning.core.phema import reconstruction_coefficients

SNAPSHOT_NAME = re.compile(r"phema-(\d+)\.pt")


def snapshot_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"phema-{step:08d}.pt"


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: the tracked profiles' weights at optimizer step ``step``."""

    path: Path
    step: int
    stds: tuple[float, ...]


def find_snapshots(folder: str | os.PathLike) -> list[Snapshot]:
    """The snapshots in ``folder`` (``phema-<step>.pt``), oldest first; read lazily (memory-mapped)."""
    found = []
    for path in sorted(Path(folder).glob("phema-*.pt")):
        if not SNAPSHOT_NAME.fullmatch(path.name):
            continue
        head = _read(path)
        found.append(Snapshot(path, int(head["step"]), tuple(float(s) for s in head["stds"])))
    return sorted(found, key=lambda s: s.step)


def _read(path: Path) -> Mapping[str, Any]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{path}: not a readable snapshot ({type(err).__name__}: {err})") from err


def reconstruct(
    folder: str | os.PathLike,
    std: float,
    step: int | None = None,
    from_stds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The checkpoint of the power-function EMA of ``std`` at snapshot step ``step`` (default: the latest),
    reconstructed from the snapshots in ``folder`` up to that step (only the profiles in ``from_stds`` if given).

    Returns ``{"state_dict", "hyper_parameters", "phema_reconstruction"}``. Raises :class:`CheckpointError` when
    there is no snapshot at ``step`` or too few inputs.
    """
    snapshots = find_snapshots(folder)
    if not snapshots:
        raise CheckpointError(f"{folder} holds no snapshots (phema-<step>.pt): train with PowerFunctionEMA")
    steps = [s.step for s in snapshots]
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise CheckpointError(f"{folder} has no snapshot at step {step}; snapshot steps: {steps}")
    wanted = None if from_stds is None else {float(s) for s in from_stds}
    inputs = [
        (snap, s)
        for snap in snapshots
        if 0 < snap.step <= step
        for s in snap.stds
        if wanted is None or s in wanted
    ]
    if len(inputs) < 2:
        raise CheckpointError(
            f"{folder}: {len(inputs)} stored profile(s) up to step {step}; at least 2 are needed"
        )
    coefficients = reconstruction_coefficients([(snap.step, s) for snap, s in inputs], step, std)
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    hyper_parameters = None
    for (snap, s), coefficient in zip(inputs, coefficients):
        data = _read(snap.path)
        hyper_parameters = data.get("hyper_parameters", hyper_parameters)
        for name, tensor in data["weights"][std_key(s)].items():
            dtypes.setdefault(name, tensor.dtype)
            term = tensor.to(torch.float64) * float(coefficient)
            total[name] = total[name] + term if name in total else term
    return {
        "state_dict": {name: tensor.to(dtypes[name]) for name, tensor in total.items()},
        "hyper_parameters": hyper_parameters,
        RECONSTRUCTION_RECORD: {
            "std": float(std),
            "step": step,
            "inputs": [[snap.step, s] for snap, s in inputs],
            "coefficients": [float(c) for c in coefficients],
        },
    }
