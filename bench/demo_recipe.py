"""The measurements that chose the demo recipe (``experiments/demo.yaml``), and the in-patch noise finding.

Each variant is ``python -m dip_lightning demo`` with the recipe and a few CLI overrides (:data:`VARIANTS`), run as
a user runs it (same data builder, metrics reference, Trainer, EMA, grid and metrics suite), one thread per run.
Per variant the table gets the demo's own printed metrics (FID, precision, recall, patch seam of 64 samples
against the 128 validation crops), the run's wall and CPU seconds, and the **in-patch high-frequency ratio**:
mean |x - 3x3 box blur(x)| over the pixels inside each 16x16 patch (seams excluded) of 64 EMA samples, divided by
the same quantity on the real validation crops. 1 means as much fine detail as the photos; well above 1 is
the "noisy inside patches" look (residual noise the network could not remove); below 1 is blur.

    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_recipe.py --work /tmp/demo_recipe --workers 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_recipe.py --work /tmp/demo_recipe --variants recipe x_pred_no_pos
    .venv/bin/python bench/demo_recipe.py --denoise runs/demo/<run>/checkpoints/last.ckpt --data data/demo

Resumable: a variant whose result file exists in ``--work`` is not run again. Writes
``bench/results/demo_recipe.md`` (``--results`` elsewhere).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a checkout without `pip install -e .`

RECIPE = REPO / "experiments" / "demo.yaml"
NET = "--model.net.init_args."
HEAD = NET + "head.init_args."
FLOW = "--model.flow."
RELEASED_TIMES = [f"{FLOW}t_mean=0.0", f"{FLOW}t_std=1.0"]

#: variant -> (what it tests, CLI overrides of experiments/demo.yaml)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "recipe": ("experiments/demo.yaml as committed", []),
    "v_pred": (
        "v-prediction, released times (the release's objective)",
        [f"{FLOW}prediction=v", *RELEASED_TIMES],
    ),
    "x_pred_released_times": ("x-prediction, released logit-normal(0, 1) times", RELEASED_TIMES),
    "no_pos_embed": ("RoPE only (released backbone)", [f"{NET}pos_embed=none"]),
    "head_base32": ("head base_channels 32 (2x wider head)", [f"{HEAD}base_channels=32"]),
    "dit_only": (
        "DiT-only (LinearHead), same backbone",
        ["--model.net.init_args.head=dip_lightning.core.models.heads.LinearHead"],
    ),
}


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def run_variant(name: str, work: Path, extra: list[str]) -> dict:
    """One demo run of ``name``; its result dict (also written to ``work/results/name.json``)."""
    out = work / "results" / f"{name}.json"
    if out.exists():
        return json.loads(out.read_text())
    run_root = work / "runs" / name
    cmd = [
        sys.executable,
        "-m",
        "dip_lightning",
        "demo",
        "--config",
        str(RECIPE),
        "--data_dir",
        str(work / "data"),
    ]
    cmd += [
        "--run_root",
        str(run_root),
        "--threads",
        "1",
        "--trainer.enable_progress_bar=false",
        *VARIANTS[name][1],
    ]
    cmd += extra
    log(f"{name}: {' '.join(cmd[3:])}")
    t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(work / f"{name}.log", "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.time() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_dir = max((run_root).iterdir())
    with open(next(run_dir.rglob("eval_metrics.csv"))) as fh:
        metrics = list(csv.DictReader(fh))[-1]
    result = {
        "variant": name,
        "step": int(metrics["step"]),
        "wall_s": round(wall, 1),
        # Shared runs (one process per worker): CPU seconds are the fairer cost; wall is inflated by the load.
        "cpu_s": round((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 1),
        **{k: float(metrics[k]) for k in ("fid", "precision", "recall", "patch_seam") if metrics.get(k)},
        "hf_ratio": in_patch_hf_ratio(run_dir / "checkpoints" / "last.ckpt", work / "data"),
        "run_dir": str(run_dir),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log(f"{name}: {result}")
    return result


def in_patch_hf(images, patch: int):  # (N, C, H, W) in [-1, 1] -> float
    """Mean |x - 3x3 box blur(x)| over pixels at least one pixel away from every patch border."""
    import torch
    import torch.nn.functional as F

    x = images.float()
    residual = (x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)).abs()
    inside = torch.zeros(x.shape[-2:], dtype=torch.bool)
    pos_y = torch.arange(x.shape[-2]) % patch
    pos_x = torch.arange(x.shape[-1]) % patch
    inside[(pos_y >= 1) & (pos_y <= patch - 2)] = True
    inside[:, ~((pos_x >= 1) & (pos_x <= patch - 2))] = False
    return residual[..., inside].mean().item()


def validation_crops(data: Path, size: int):  # -> (images (N, 3, S, S) in [-1, 1], int64 labels (N,))
    """The demo data folder's validation crops, in shard order, with their labels."""
    import glob

    import torch

    from dip_lightning.core.metrics.sources import iter_shard_images

    shards = sorted(glob.glob(str(data / "val-*.tar")))
    pairs = list(iter_shard_images(shards, 64, size, labelled=True))
    images = torch.cat([images for images, _ in pairs]).float() / 127.5 - 1.0
    return images, torch.cat([torch.as_tensor(labels) for _, labels in pairs])


def in_patch_hf_ratio(ckpt: Path, data: Path, num: int = 64) -> float:
    """:func:`in_patch_hf` of ``num`` EMA samples (label i % classes, seed i) over that of the validation crops."""
    import torch

    from dip_lightning.training.loading import load_module

    torch.set_num_threads(1)
    module = load_module(ckpt, weights="ema")
    patch = module.net.patch_size
    labels = torch.arange(num) % module.net.num_classes
    with torch.no_grad():
        samples = module.generate(labels, torch.arange(num))
    real, _ = validation_crops(data, module.net.input_size)
    return round(in_patch_hf(samples, patch) / in_patch_hf(real, patch), 3)


#: Times (t = 1 clean) at which ``--denoise`` measures the network's clean estimate.
DENOISE_TIMES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)


def denoising_ratios(ckpt: Path, data: Path, times=DENOISE_TIMES) -> dict[float, float]:
    """Per time t: mean squared error of the EMA network's clean estimate on the validation crops (their own
    labels, fixed noise), over that of doing nothing (``x_t / t``). 1 = the network removes no noise at that t,
    0 = all of it."""
    import torch

    from dip_lightning.core.diffusion.flow_matching import convert_prediction
    from dip_lightning.training.loading import load_module

    torch.set_num_threads(1)
    module = load_module(ckpt, weights="ema")
    flow, net = module.flow, module.net.eval()
    real, labels = validation_crops(data, net.input_size)
    eps = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    ratios = {}
    for t in times:
        x_t = t * real + (1 - t) * eps
        t_batch = torch.full((len(real),), t)
        with torch.no_grad():
            clean = convert_prediction(
                net(x_t, t_batch, labels), x_t, t_batch, flow.prediction, "x", flow.t_eps
            )
        ratios[t] = round(((clean - real) ** 2).mean().item() / ((x_t / t - real) ** 2).mean().item(), 3)
    return ratios


def write_markdown(results: list[dict], path: Path, command: str) -> None:
    rows = [
        "| variant | what it tests | steps | wall s | CPU s | FID | precision | recall | patch seam "
        "| in-patch HF ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = [r["variant"], VARIANTS[r["variant"]][0], r["step"], r["wall_s"], r["cpu_s"]]
        cells += [
            f"{r.get(k, float('nan')):.3g}" for k in ("fid", "precision", "recall", "patch_seam", "hf_ratio")
        ]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = [
        "# The demo recipe: the measurements behind `experiments/demo.yaml` (`bench/demo_recipe.py`)",
        "",
        f"Generated by `{command}` on {datetime.date.today()}, {platform.machine()} 2-core CPU VM shared with other "
        "jobs (one thread per run; wall seconds are inflated by the load, CPU seconds are the cost).",
        "",
        *rows,
        "",
    ]
    path.write_text("\n".join(text))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--hf", nargs="+", type=Path, metavar="CKPT", help="only print the in-patch HF ratio of these"
    )
    p.add_argument(
        "--denoise",
        nargs="+",
        type=Path,
        metavar="CKPT",
        help="only print, per time t, the network's denoising error over that of doing nothing",
    )
    p.add_argument("--data", type=Path, help="with --hf/--denoise: the demo data the checkpoints trained on")
    p.add_argument("--work", type=Path)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "demo_recipe_table.md")
    p.add_argument("extra", nargs="*", help="more CLI overrides for every run, after --")
    args = p.parse_args()
    if (args.hf or args.denoise) and (args.data is None or not any(args.data.glob("val-*.tar"))):
        p.error(
            f"--hf and --denoise need --data, a demo data folder with val-*.tar shards (got {args.data}); "
            "build one with: python -m dip_lightning demo-data --out DIR --size 64"
        )
    if args.hf:
        for ckpt in args.hf:
            print(f"{ckpt}: in-patch HF ratio {in_patch_hf_ratio(ckpt, args.data)}", flush=True)
        return 0
    if args.denoise:
        print("checkpoint | " + " | ".join(f"t={t}" for t in DENOISE_TIMES))
        for ckpt in args.denoise:
            print(
                f"{ckpt} | " + " | ".join(str(r) for r in denoising_ratios(ckpt, args.data).values()),
                flush=True,
            )
        return 0
    if args.work is None:
        p.error("--work is required")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    first, *rest = args.variants  # the first run builds the data folder and its metrics reference
    results = [run_variant(first, args.work, args.extra)]
    with ThreadPoolExecutor(args.workers) as pool:
        results += list(pool.map(lambda n: run_variant(n, args.work, args.extra), rest))
    write_markdown(results, args.results, "python bench/demo_recipe.py " + " ".join(sys.argv[1:]))
    log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
