"""``python -m dip_lightning sweep``: one checkpoint over weights x guidance settings, resumable."""

from __future__ import annotations

from dip_lightning.checkpoint.format import ACCEPTED_FORMS
from dip_lightning.commands import CommandParser, weight_request
from dip_lightning.evaluation.sweep import run_sweep


def build_parser() -> CommandParser:
    p = CommandParser("sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", required=True, help="checkpoint to evaluate")
    p.add_argument(
        "--config", action="append", default=None, help="experiment YAML(s), for configless checkpoints"
    )
    p.add_argument(
        "--reference", required=True, help="reference images npz, ADM reference batch or kit statistics"
    )
    p.add_argument("--num_samples", type=int, required=True, help="images per cell")
    p.add_argument("--out", required=True, help="sweep folder (a rerun continues it)")
    p.add_argument(
        "--weights",
        type=weight_request,
        nargs="+",
        default=None,
        metavar="WEIGHTS",
        help=f"weights of the checkpoint, one axis of the grid: {ACCEPTED_FORMS} (default: ema)",
    )
    p.add_argument("--cfg_scale", type=float, nargs="+", default=None, metavar="W")
    p.add_argument(
        "--cfg_interval",
        type=float,
        nargs=2,
        action="append",
        default=None,
        metavar=("T_MIN", "T_MAX"),
        help="guidance interval; repeat the flag for several",
    )
    p.add_argument("--num_steps", type=int, nargs="+", default=None, metavar="N")
    p.add_argument(
        "--metrics", nargs="+", default=None, help="metrics to compute (default: all this machine can)"
    )
    p.add_argument(
        "--patch_size", type=int, default=None, help="patch grid of the seam score (default: the model's)"
    )
    p.add_argument("--plot_metric", default=None, help="metric of the PNG (default: the first computed)")
    p.add_argument(
        "--no_plots", dest="plots", action="store_false", help="tables only (no matplotlib needed)"
    )
    p.add_argument("--keep_samples", action="store_true", help="keep each cell's samples.npz after scoring")
    p.add_argument("--batch_size", type=int, default=64, help="images per generate call")
    p.add_argument("--chunk_size", type=int, default=1000, help="images per resumable chunk")
    p.add_argument("--metrics_batch_size", type=int, default=64, help="images per feature-extraction batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--wait_timeout", type=float, default=3600.0, help="seconds rank 0 waits for others' chunks"
    )
    p.add_argument("--device", default=None, help="default: cuda:<local rank> when available, else cpu")
    p.add_argument("--trust_pickle", action="store_true", help="allow pickled objects in the checkpoint")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run_sweep(args)
    return 0
