"""``python -m dip_lightning sample``: export N samples of a checkpoint in the ADM evaluator's npz format."""

from __future__ import annotations

import dataclasses
import time

import torch

from dip_lightning.checkpoint.format import ACCEPTED_FORMS, DEFAULT_WEIGHTS, WeightRequest
from dip_lightning.commands import CommandParser
from dip_lightning.core.diffusion import SAMPLER_OVERRIDES, sampler_overrides
from dip_lightning.core.distributed import launch_place
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.recipes import resolve_config
from dip_lightning.evaluation.export import export_samples
from dip_lightning.evaluation.seeds import resolve_seeds, seed_path
from dip_lightning.training.autoguidance import load_guide
from dip_lightning.training.loading import load_module
from dip_lightning.training.module import COMPILE_MODES


def build_parser() -> CommandParser:
    p = CommandParser("sample", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ckpt_path",
        type=str,
        required=True,
        help="checkpoint (Lightning .ckpt) or pretrained folder (export) to sample from",
    )
    p.add_argument(
        "--experiment",
        type=str,
        nargs="+",
        default=None,
        help="experiment YAML(s) or shipped recipe names the network is built from instead of the checkpoint's "
        "stored config (configless checkpoints): the experiment, then its overlays",
    )
    p.add_argument("--out", type=str, required=True, help="output .npz (ADM evaluator format)")
    p.add_argument("--num_samples", type=int, default=50_000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--chunk_size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="image i has noise seed seed + i")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="several seeds, at least num_samples apart: one file each, OUT_seed<s>.npz (instead of --seed)",
    )
    p.add_argument(
        "--balanced", type=bool, default=True, help="labels i mod C (--no_balanced: random labels)"
    )
    from dip_lightning.core import diffusion

    # The YAML class path names the package, which re-exports every sampler.
    listed = "; ".join(
        f"{name} = {diffusion.__name__}.{cls.__name__}" for name, cls in diffusion.SAMPLERS.items()
    )
    p.add_argument(
        "--sampler",
        choices=list(diffusion.SAMPLERS),
        default=None,
        help=f"integrator (default: the checkpoint's model.sampler), keeping its grid and guidance: {listed}. "
        "Their own options (SDE w_schedule, Heun guidance_rule ...) come from YAML: --experiment with "
        "model.sampler.class_path / init_args",
    )
    p.add_argument("--num_steps", type=int | None, default=None)
    p.add_argument("--cfg_scale", type=float | None, default=None)
    p.add_argument("--cfg_interval", type=float, nargs=2, default=None, metavar=("T_MIN", "T_MAX"))
    p.add_argument(
        "--weights",
        type=WeightRequest | None,
        default=None,
        help=f"which weights of the checkpoint: {ACCEPTED_FORMS} (default: ema)",
    )
    p.add_argument(
        "--guide",
        type=str | None,
        default=None,
        help="autoguidance: a guide checkpoint or pretrained folder (a smaller or earlier DiP of the same image "
        "size, patch size and classes) in place of the unconditional branch; --cfg_scale is its weight",
    )
    p.add_argument(
        "--guide_weights",
        type=WeightRequest | None,
        default=None,
        help=f"which weights of the guide checkpoint: {ACCEPTED_FORMS} (default: ema)",
    )
    p.add_argument(
        "--trust_pickle",
        action="store_true",
        help="allow a checkpoint with pickled Python objects besides tensors (trusted files only)",
    )
    p.add_argument(
        "--device", type=str | None, default=None, help="default: cuda:<local rank> when available, else cpu"
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        help="torch.compile the network (static shapes; 'reduce-overhead' adds CUDA graphs); a GPU option",
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    seeds = resolve_seeds(args.seed, args.seeds, args.num_samples)  # checked before the checkpoint loads
    existing = [str(p) for p in (seed_path(args.out, s, seeds) for s in seeds) if p.exists()]
    # Before any seed's images: a later seed's file is never found too late.
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} exist(s); pass --overwrite to replace (nothing was changed)."
        )
    for experiment in args.experiment or []:
        resolve_config(experiment, option="--experiment")  # a misspelled name is refused as the user wrote it
    place = launch_place()
    rank, world_size = place.rank, place.world_size
    device = args.device or (f"cuda:{place.local_rank}" if torch.cuda.is_available() else "cpu")
    module = load_module(
        args.ckpt_path,
        args.experiment,
        weights=args.weights or DEFAULT_WEIGHTS,
        trust_pickle=args.trust_pickle,
    )
    guide = None
    if args.guide is not None:
        guide = load_guide(
            args.guide, module, weights=args.guide_weights or DEFAULT_WEIGHTS, trust_pickle=args.trust_pickle
        )
    elif args.guide_weights is not None:
        raise ConfigError("--guide_weights chooses the weights of --guide: pass --guide too, or drop it")
    if args.compile:
        module.compile_network(args.compile, dynamic=False)
    overrides = sampler_overrides(**{name: getattr(args, name) for name in SAMPLER_OVERRIDES})
    sampler = None
    if args.sampler is not None:
        from dip_lightning.core.diffusion import SAMPLERS, ODESampler

        cls = SAMPLERS[args.sampler]
        base = module.make_sampler(**overrides)
        # The fields every sampler shares (time grid, shift, last step, guidance); only the integrator changes.
        sampler = cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ODESampler)})
        module.sampler = sampler
    for seed in seeds:
        out = seed_path(args.out, seed, seeds)
        t0 = time.time()
        result = export_samples(
            module,
            out,
            args.num_samples,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            seed=seed,
            balanced=args.balanced,
            rank=rank,
            world_size=world_size,
            device=device,
            overwrite=args.overwrite,
            guide=guide,
            **({} if sampler is not None else overrides),
        )
        if result is not None:
            print(f"wrote {result} ({args.num_samples} samples, {time.time() - t0:.1f} s on rank {rank})")
        else:
            print(f"rank {rank}: my chunks are done; another process assembles {out}")
    return 0
