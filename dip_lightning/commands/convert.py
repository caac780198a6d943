"""``python -m dip_lightning convert``: released DiP weights <-> kit checkpoints."""

from __future__ import annotations

from typing import Any

from dip_lightning.commands import CommandParser
from dip_lightning.training.released import Direction, convert_checkpoint, released_to_kit


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def build_parser() -> CommandParser:
    p = CommandParser(
        "convert",
        description="Convert released DiP weights (NJU-PCALab/DiP) to this kit's checkpoint, or back.",
    )
    p.add_argument("input", type=str, help="checkpoint to read")
    p.add_argument(
        "--from",
        choices=["official", "kit"],
        required=True,
        help="layout of the input: 'official' (released code) -> kit checkpoint; 'kit' -> released layout",
    )
    p.add_argument("--out", type=str, required=True, help="file to write")
    weights_help = "official input: which copy goes to state_dict (auto = EMA when present)"
    p.add_argument("--weights", choices=["auto", "ema", "live"], default="auto", help=weights_help)
    p.add_argument(
        "--input_size", type=int | None, default=None, help="image size recorded in the kit config"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="official input: write --out as a pretrained folder (config.json, model.safetensors, model card; "
        "what export writes) instead of a kit checkpoint",
    )
    trust_help = "allow a file with pickled Python objects (trusted files only)"
    p.add_argument("--trust_pickle", action="store_true", help=trust_help)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    direction: Direction = "official_to_kit" if args["from"] == "official" else "kit_to_official"
    if args.pretrained:
        return _to_pretrained(args)
    options = {k: getattr(args, k) for k in ("weights", "input_size", "overwrite", "trust_pickle")}
    summary = convert_checkpoint(args.input, args.out, direction=direction, **options)
    print(summary)
    return 0


def _to_pretrained(args: Any) -> int:
    from dip_lightning.core.errors import ConfigError
    from dip_lightning.evaluation.pretrained import export_released

    if args["from"] != "official":
        raise ConfigError(
            "--pretrained converts released weights (--from official); for a kit checkpoint: export"
        )
    checkpoint, lines = released_to_kit(args.input, args.weights, args.input_size, args.trust_pickle)
    print("\n".join([*lines, export_released(checkpoint, args.input, args.out, overwrite=args.overwrite)]))
    return 0
