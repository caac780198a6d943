"""``python -m dip_lightning ema-reconstruct RUN --std S --out CKPT``: any power-function EMA from a run's snapshots."""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse.typing import restricted_number_type

from dip_lightning.checkpoint.format import reconstruction_checkpoint
from dip_lightning.checkpoint.posthoc import reconstruct
from dip_lightning.checkpoint.run_folder import SNAPSHOT_FOLDER, snapshot_dir
from dip_lightning.commands import CommandParser
from dip_lightning.core.atomic import atomic_write
from dip_lightning.core.phema import MAX_STD

#: A ``--std`` value: a power-function EMA's relative width lies in (0, MAX_STD).
EMA_STD = restricted_number_type("EmaStd", float, [(">", 0.0), ("<", MAX_STD)])


def build_parser() -> CommandParser:
    p = CommandParser(
        "ema-reconstruct", description="Reconstruct a power-function EMA of any std from the run's snapshots."
    )
    p.add_argument(
        "run_dir",
        type=str,
        help=f"the run folder (snapshots in <run_dir>/{SNAPSHOT_FOLDER}) or the snapshot folder itself",
    )
    p.add_argument(
        "--std", type=EMA_STD, required=True, help=f"relative width of the EMA, in (0, {MAX_STD:.3f})"
    )
    p.add_argument(
        "--out",
        type=str,
        required=True,
        help="output checkpoint (.ckpt): sample, validate ... load it as itself",
    )
    p.add_argument(
        "--step", type=int | None, default=None, help="snapshot step to reconstruct at (default: latest)"
    )
    p.add_argument(
        "--from_std",
        type=float,
        nargs="+",
        default=None,
        help="use only these stored stds",
    )
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.run_dir)
    if snapshot_dir(folder).is_dir():
        folder = snapshot_dir(folder)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (nothing was changed).")
    rebuilt = reconstruct(folder, args.std, args.step, args.from_std)
    with atomic_write(out) as fh:
        torch.save(reconstruction_checkpoint(rebuilt), fh)
    print(
        f"wrote {out}: std {rebuilt.std} at step {rebuilt.step} from {len(rebuilt.inputs)} stored profiles "
        f"(coefficients {min(rebuilt.coefficients):.3g} .. {max(rebuilt.coefficients):.3g})"
    )
    return 0
