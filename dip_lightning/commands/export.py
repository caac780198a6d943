"""``python -m dip_lightning export``: a checkpoint's weights as a pretrained folder (config.json,
model.safetensors, model card) in the Hugging Face Hub's layout; ``--push_to_hub`` uploads it."""

from __future__ import annotations

from dip_lightning.checkpoint.format import ACCEPTED_FORMS, DEFAULT_WEIGHTS, WeightRequest
from dip_lightning.commands import CommandParser


def build_parser() -> CommandParser:
    p = CommandParser("export", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("ckpt_path", type=str, help="kit checkpoint (fit, convert or ema-reconstruct output)")
    p.add_argument("--out", type=str, required=True, help="folder to write (created)")
    p.add_argument(
        "--weights",
        type=WeightRequest | None,
        default=None,
        help=f"which weights of the checkpoint: {ACCEPTED_FORMS} (default: ema)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing folder")
    p.add_argument(
        "--trust_pickle",
        action="store_true",
        help="allow a checkpoint with pickled Python objects besides tensors (trusted files only)",
    )
    p.add_argument(
        "--push_to_hub",
        type=str | None,
        default=None,
        metavar="REPO_ID",
        help="then upload the folder to this Hugging Face Hub model repository (needs huggingface_hub and a "
        "login; extra: pip install 'dip-lightning[hub]')",
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from dip_lightning.evaluation.pretrained import export_pretrained

    print(
        export_pretrained(
            args.ckpt_path,
            args.out,
            args.weights or DEFAULT_WEIGHTS,
            trust_pickle=args.trust_pickle,
            overwrite=args.overwrite,
        )
    )
    if args.push_to_hub:
        from dip_lightning.training.hub import push_to_hub

        print(push_to_hub(args.out, args.push_to_hub))
    return 0
