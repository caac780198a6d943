"""Post-hoc EMA with power-function profiles (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models", Sec. 3 and App. C; NVlabs/edm2 ``training/phema.py`` and ``reconstruct_phema.py``).

Implemented here from the paper's definitions:

* A power-function EMA with exponent gamma averages the weights of steps ``tau <= t`` with the profile
  ``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)``; its width relative to the training length is
  ``std = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (:func:`exponent_to_std`; the inverse is the largest real
  root of ``gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + 12 - std^-2``, :func:`std_to_exponent`). Unlike a fixed
  decay, its memory grows with training.
* Tracked during training by ``ema <- lerp(ema, weights, 1 - decay_t)`` with ``decay_t = (1 - 1/t)^(gamma + 1)`` at
  optimizer step t (1-based; :func:`power_ema_decay`: the first update copies). Time is counted in optimizer
  steps, where edm2 counts images: the same with a constant batch size.
* :class:`dip_lightning.callbacks.PowerFunctionEMA` tracks a few such profiles and writes all of them every N
  steps as a snapshot ``<run>/phema/phema-<step>.pt``. Any other profile (std) at a snapshot step T is then
  reconstructed as the combination of the stored snapshots whose profiles are closest to the wanted one in
  least squares over continuous profiles: solve ``A x = b`` with ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>``
  (:func:`profile_inner_product`, in closed form), then ``x /= sum(x)`` as edm2 does.

Assumptions and deviations: the reconstruction is exact for the continuous profiles; the tracked discrete EMA
follows its continuous profile only approximately in the first steps (the first update copies the weights of
step 1), so a reconstruction equals a directly tracked EMA of the same std only approximately (the tests bound the
difference: well below the distance to the nearest stored profile). The weights are summed in float64 and stored
in their own dtype. Buffers are averaged like parameters (the kit's EMA averages buffers too; edm2 copies them).

``python -m dip_lightning ema-reconstruct RUN_DIR --std 0.05 --out CKPT`` writes a checkpoint that ``sample``,
``load_module`` and ``DiPModule.load_from_checkpoint`` read (``state_dict`` + ``hyper_parameters``, plus a
``phema_reconstruction`` record of the std, step, inputs and coefficients).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dip_lightning.atomic import atomic_write
from dip_lightning.checkpointing import CheckpointError
from dip_lightning.commands import CommandParser

__all__ = [
    "MAX_STD",
    "RECONSTRUCTION_RECORD",
    "Snapshot",
    "exponent_to_std",
    "find_snapshots",
    "power_ema_decay",
    "profile_inner_product",
    "reconstruct",
    "reconstruction_coefficients",
    "snapshot_path",
    "std_key",
    "std_to_exponent",
]

MAX_STD = float(np.sqrt(1 / 12))
"""The std of the uniform average of all steps (gamma = 0): power-function profiles are narrower (0.2887)."""

RECONSTRUCTION_RECORD = "phema_reconstruction"
"""The entry of a reconstructed checkpoint saying what it was made of (std, step, inputs, coefficients)."""

SNAPSHOT_NAME = re.compile(r"phema-(\d+)\.pt")


# ---------------------------------------------------------------------------------------------- profiles
def std_to_exponent(std: float) -> float:
    """The exponent gamma of the power-function profile of relative width ``std`` (0 < std < :data:`MAX_STD`)."""
    std = float(std)
    if not 0.0 < std < MAX_STD:
        raise ValueError(f"a power-function EMA's std lies in (0, {MAX_STD:.4f}), got {std}")
    inv = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def exponent_to_std(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma``."""
    gamma = float(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_ema_decay(std: float, step: int) -> float:
    """The decay of the update at optimizer step ``step`` (1-based) that tracks the profile of ``std``."""
    return float((1.0 - 1.0 / step) ** (std_to_exponent(std) + 1.0))


def profile_inner_product(step_a: float, std_a: float, step_b: float, std_b: float) -> float:
    """``<p_a, p_b> = integral of p_a(tau) p_b(tau) dtau`` of two power-function profiles ending at ``step_a`` and
    ``step_b``: ``(ga + 1)(gb + 1) m^(ga + gb + 1) / ((ga + gb + 1) t_a^(ga + 1) t_b^(gb + 1))``, m = min(t_a, t_b)."""
    ga, gb = std_to_exponent(std_a), std_to_exponent(std_b)
    ta, tb = float(step_a), float(step_b)
    # In ratios, so that large steps do not overflow: m^(ga+gb+1) / (ta^(ga+1) tb^(gb+1)).
    scale = (min(ta, tb) / ta) ** (ga + 1) * (min(ta, tb) / tb) ** (gb + 1) / min(ta, tb)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * scale


def reconstruction_coefficients(inputs: Sequence[tuple[int, float]], step: int, std: float) -> np.ndarray:
    """Coefficients of the stored profiles ``inputs`` (``(step, std)`` pairs) whose sum comes closest, in least
    squares, to the profile of ``std`` ending at ``step``; normalised to sum to 1."""
    gram = np.array([[profile_inner_product(*a, *b) for b in inputs] for a in inputs], dtype=np.float64)
    target = np.array([profile_inner_product(*a, step, std) for a in inputs], dtype=np.float64)
    coefficients = np.linalg.solve(gram, target)
    return coefficients / coefficients.sum()


# ---------------------------------------------------------------------------------------------- snapshots
def std_key(std: float) -> str:
    """The key of a std in a snapshot's ``weights``: its shortest round-tripping text (``"0.05"``)."""
    return repr(float(std))


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


# ---------------------------------------------------------------------------------------------- command
def build_parser() -> CommandParser:
    p = CommandParser(
        "ema-reconstruct", description="Reconstruct a power-function EMA of any std from the run's snapshots."
    )
    p.add_argument(
        "run_dir", help="the run folder (snapshots in <run_dir>/phema) or the snapshot folder itself"
    )
    p.add_argument(
        "--std", type=float, required=True, help=f"relative width of the EMA, in (0, {MAX_STD:.3f})"
    )
    p.add_argument("--out", required=True, help="output checkpoint (.ckpt), for sample / load_module")
    p.add_argument("--step", type=int, default=None, help="snapshot step to reconstruct at (default: latest)")
    p.add_argument(
        "--from_std",
        type=float,
        action="append",
        default=None,
        help="use only these stored stds (repeatable)",
    )
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.run_dir)
    if (folder / "phema").is_dir():
        folder = folder / "phema"
    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it (nothing was changed).")
        checkpoint = reconstruct(folder, args.std, args.step, args.from_std)
    except (CheckpointError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with atomic_write(out) as fh:
        torch.save(checkpoint, fh)
    record = checkpoint[RECONSTRUCTION_RECORD]
    print(
        f"wrote {out}: std {record['std']} at step {record['step']} from {len(record['inputs'])} stored profiles "
        f"(coefficients {min(record['coefficients']):.3g} .. {max(record['coefficients']):.3g})"
    )
    return 0
