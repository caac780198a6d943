"""``python -m dip_lightning sweep``: one checkpoint over weights x guidance settings, resumable.

The grid can live in a YAML file (``--config grid.yaml``, the layout ``--print_config`` writes), e.g.::

    ckpt_path: runs/dip_xl16/checkpoints/last.ckpt
    reference: data/VIRTUAL_imagenet256_labeled.npz
    num_samples: 10000
    out: runs/dip_xl16/sweep
    weights: [ema:0.9999, ema:0.9996]
    cfg_scale: [1.0, 2.9]
    cfg_interval: [[0.11, 0.97], [0.0, 1.0]]
    guide: [none, runs/dip_xs16/checkpoints/last.ckpt]   # CFG, then autoguidance by that guide
    seeds: [0, 10000, 20000]   # optional: mean, std and range of each metric over these seeds
"""

from __future__ import annotations

from dip_lightning.checkpoint.format import ACCEPTED_FORMS, WeightRequest
from dip_lightning.commands import CommandParser
from dip_lightning.core.recipes import resolve_config
from dip_lightning.evaluation.sweep import run_sweep


def build_parser() -> CommandParser:
    p = CommandParser("sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", type=str, required=True, help="checkpoint to evaluate")
    p.add_argument(
        "--experiment",
        type=str,
        nargs="+",
        default=None,
        help="experiment YAML(s) or shipped recipe names the network is built from, for configless checkpoints",
    )
    p.add_argument(
        "--reference",
        type=str,
        required=True,
        help="reference images npz, ADM reference batch or kit statistics",
    )
    p.add_argument("--num_samples", type=int, required=True, help="images per cell")
    p.add_argument("--out", type=str, required=True, help="sweep folder (a rerun continues it)")
    p.add_argument(
        "--weights",
        type=WeightRequest | None,
        nargs="+",
        default=None,
        help=f"weights of the checkpoint, one axis of the grid: {ACCEPTED_FORMS} (default: ema)",
    )
    p.add_argument(
        "--cfg_scale",
        type=float,
        nargs="+",
        default=None,
        help="guidance scales, one axis (with a guide: the autoguidance weight w)",
    )
    p.add_argument(
        "--guide",
        type=str,
        nargs="+",
        default=None,
        help="autoguidance guides, one axis: checkpoints or pretrained folders of a smaller or earlier DiP with "
        "the model's image size, patch size and classes; 'none' is classifier-free guidance (the default)",
    )
    p.add_argument(
        "--guide_weights",
        type=WeightRequest | None,
        default=None,
        help=f"which weights of each guide checkpoint: {ACCEPTED_FORMS} (default: ema)",
    )
    p.add_argument(
        "--cfg_interval",
        type=tuple[float, float],
        nargs="+",
        default=None,
        help="guidance intervals, one axis: --cfg_interval [0.11,0.97] [0,1] (YAML: [[0.11, 0.97], [0, 1]])",
    )
    p.add_argument("--num_steps", type=int, nargs="+", default=None, help="sampling steps, one axis")
    p.add_argument(
        "--metrics",
        type=str,
        nargs="+",
        default=None,
        help="metrics to compute (default: all this machine can)",
    )
    p.add_argument(
        "--patch_size",
        type=int | None,
        default=None,
        help="patch grid of the seam score (default: the model's)",
    )
    p.add_argument(
        "--plot_metric", type=str | None, default=None, help="metric of the PNG (default: the first computed)"
    )
    p.add_argument(
        "--plots", type=bool, default=True, help="PNG plots (--no_plots: tables only, no matplotlib)"
    )
    p.add_argument("--keep_samples", action="store_true", help="keep each cell's samples.npz after scoring")
    p.add_argument("--batch_size", type=int, default=64, help="images per generate call")
    p.add_argument("--chunk_size", type=int, default=1000, help="images per resumable chunk")
    p.add_argument("--metrics_batch_size", type=int, default=64, help="images per feature-extraction batch")
    p.add_argument("--seed", type=int, default=0, help="image i has noise seed seed + i")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="several seeds, at least num_samples apart (instead of --seed): each cell's metrics are the mean over "
        "them, with their standard deviation and range",
    )
    p.add_argument(
        "--wait_timeout", type=float, default=3600.0, help="seconds rank 0 waits for others' chunks"
    )
    p.add_argument(
        "--device", type=str | None, default=None, help="default: cuda:<local rank> when available, else cpu"
    )
    p.add_argument("--trust_pickle", action="store_true", help="allow pickled objects in the checkpoint")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for experiment in args.experiment or []:
        resolve_config(experiment, option="--experiment")  # a misspelled name is refused as the user wrote it
    run_sweep(args)
    return 0
