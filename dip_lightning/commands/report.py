"""``python -m dip_lightning report RUN [RUN ...]``: runs side by side."""

from __future__ import annotations

from dip_lightning.commands import CommandParser
from dip_lightning.evaluation.report import write_report


def build_parser() -> CommandParser:
    p = CommandParser("report", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "run_dirs",
        type=str,
        nargs="+",
        metavar="RUN_DIR",
        help="run folders (trainer.default_root_dir of a fit)",
    )
    p.add_argument("--out", type=str, required=True, help="folder for report.md and the PNG plots")
    p.add_argument("--title", type=str, default="Run report", help="heading of report.md")
    p.add_argument(
        "--plots", type=bool, default=True, help="PNG plots (--no_plots: the table only, no matplotlib)"
    )
    p.add_argument(
        "--tensorboard",
        type=bool,
        default=True,
        help="read TensorBoard logs (--no_tensorboard: the metric CSVs only)",
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    report, runs = write_report(
        args.run_dirs, args.out, plots=args.plots, tensorboard=args.tensorboard, title=args.title
    )
    print(f"wrote {report} ({len(runs)} runs)")
    return 0
