"""Post-hoc EMA records: the profiles a checkpoint carries, the snapshot files, and the reconstruction of any
profile from them (the math: :mod:`dip_lightning.core.phema`).

:class:`~dip_lightning.training.callbacks.PowerFunctionEMA` writes the first two, ``ema-reconstruct`` and
``--weights phema:S`` (:func:`dip_lightning.checkpoint.format.select_weights`) read them; their names live here
only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dip_lightning.checkpoint.io import CheckpointError
from dip_lightning.checkpoint.run_folder import snapshot_dir
from dip_lightning.core.phema import reconstruction_coefficients

PROFILES_RECORD = "phema"
"""The checkpoint entry holding the tracked profiles at the checkpoint's step, so that a resumed run continues
them: ``{"stds": [...], "weights": {std_key: state_dict}}`` (:func:`profiles_record`)."""

RECONSTRUCTION_RECORD = "phema_reconstruction"
"""The entry of a reconstructed checkpoint saying what it was made of (std, step, inputs, coefficients)."""

SNAPSHOT_NAME = re.compile(r"phema-(\d+)\.pt")


def std_key(std: float) -> str:
    """The key of a std in a record's or snapshot's ``weights``: its shortest round-tripping text (``"0.05"``)."""
    return repr(float(std))


# ---------------------------------------------------------------------------------------------- in a checkpoint
def profiles_record(averages: Mapping[float, Mapping[str, Tensor]]) -> dict[str, Any]:
    """The :data:`PROFILES_RECORD` entry of the tracked profiles ``{std: weights}``."""
    return {"stds": [float(s) for s in averages], "weights": {std_key(s): w for s, w in averages.items()}}


def recorded_profiles(checkpoint: Mapping[str, Any]) -> dict[float, Mapping[str, Tensor]]:
    """The profiles a checkpoint carries, by std (empty without the record)."""
    record = checkpoint.get(PROFILES_RECORD) or {}
    weights = record.get("weights") or {}
    return {float(s): weights[std_key(s)] for s in record.get("stds") or () if std_key(s) in weights}


# ---------------------------------------------------------------------------------------------- snapshots
def snapshot_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"phema-{step:08d}.pt"


def snapshot(
    step: int, averages: Mapping[float, Mapping[str, Tensor]], hyper_parameters: Any
) -> dict[str, Any]:
    """The content of a snapshot file: every tracked profile at optimizer step ``step``."""
    return {"step": int(step), **profiles_record(averages), "hyper_parameters": hyper_parameters}


def run_snapshot_folder(checkpoint_path: str | os.PathLike) -> Path:
    """The snapshot folder of the run a checkpoint belongs to: ``<run>/phema`` for ``<run>/checkpoints/*.ckpt``, and
    for a preemption checkpoint ``<run>/hpc_ckpt_N.ckpt``, which lies in the run folder itself."""
    folder = Path(checkpoint_path).absolute().parent
    for candidate in (snapshot_dir(folder), snapshot_dir(folder.parent)):
        if candidate.is_dir():
            return candidate
    return snapshot_dir(folder.parent)


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


# ---------------------------------------------------------------------------------------------- reconstruction
@dataclass(frozen=True)
class Reconstruction:
    """The power-function EMA of ``std`` at snapshot step ``step``: ``weights`` (state_dict keys), the
    ``hyper_parameters`` the snapshots carry, and what it was made of (``(step, std)`` inputs, coefficients)."""

    std: float
    step: int
    weights: dict[str, Tensor]
    hyper_parameters: Any
    inputs: list[tuple[int, float]]
    coefficients: list[float]

    def record(self) -> dict[str, Any]:
        """The :data:`RECONSTRUCTION_RECORD` entry of a checkpoint holding it."""
        return {
            "std": self.std,
            "step": self.step,
            "inputs": [list(i) for i in self.inputs],
            "coefficients": self.coefficients,
        }


def reconstruction_of(checkpoint: Any) -> tuple[float, int] | None:
    """``(std, step)`` of a checkpoint written by ``ema-reconstruct``, None for any other."""
    record = checkpoint.get(RECONSTRUCTION_RECORD) if isinstance(checkpoint, Mapping) else None
    return (float(record["std"]), int(record["step"])) if isinstance(record, Mapping) else None


def reconstruct(
    folder: str | os.PathLike,
    std: float,
    step: int | None = None,
    from_stds: Sequence[float] | None = None,
) -> Reconstruction:
    """The power-function EMA of ``std`` at snapshot step ``step`` (default: the latest), reconstructed from the
    snapshots in ``folder`` up to that step (only the profiles in ``from_stds`` if given).

    Raises :class:`CheckpointError` when there is no snapshot at ``step`` or too few inputs.
    """
    snapshots = find_snapshots(folder)
    if not snapshots:
        raise CheckpointError(
            f"{folder} holds no snapshots (phema-<step>.pt): train with "
            "dip_lightning.training.callbacks.PowerFunctionEMA in trainer.callbacks"
        )
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
    return Reconstruction(
        std=float(std),
        step=step,
        weights={name: tensor.to(dtypes[name]) for name, tensor in total.items()},
        hyper_parameters=hyper_parameters,
        inputs=[(snap.step, s) for snap, s in inputs],
        coefficients=[float(c) for c in coefficients],
    )
