"""`python -m dip_lightning models NAME [--input_size N]`: parameters and forward GMACs of a named model.

The model is built on the meta device, so even XL sizes print in about a second without allocating weights.
"""

from __future__ import annotations

import sys

import torch

from dip_lightning.commands import CommandParser
from dip_lightning.core.models.registry import create_model, list_models, model_summary


def build_parser() -> CommandParser:
    parser = CommandParser("models", description="Parameters and forward GMACs of a named model.")
    parser.add_argument("name", type=str, help=f"one of: {', '.join(list_models())}")
    parser.add_argument(
        "--input_size", type=int | None, default=None, help="resolution (default: the model's)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with torch.device("meta"):
            model = create_model(args.name)
    except ValueError as err:
        parser.error(str(err))
    s = model_summary(model, input_size=args.input_size)
    print(f"{args.name} at {s['input_size']}x{s['input_size']} ({s['tokens']} tokens)")
    print(f"  {'':10s} {'params':>14s} {'GMACs':>9s}")
    for part in ("backbone", "head", "total"):
        print(f"  {part:10s} {s['params_' + part]:>14,d} {s['gmacs_' + part]:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
