"""Autoguidance against classifier-free guidance at toy scale: FID, precision and recall against the guidance weight.

One ``experiments/tiny_cpu.yaml`` run (the demo model: 4 blocks x 192 on 8x8 patches of the 32 px demo photos) is
trained with checkpoints every ``--guide_step`` steps; its last checkpoint is the main model, its checkpoint at
``--guide_step`` (an earlier, worse version of itself, Karras et al. 2024) the guide. For each sample seed, two
``python -m dip_lightning sweep`` runs score the main model's EMA weights against the demo's validation crops:
classifier-free guidance over ``--cfg`` and autoguidance over ``--ag`` (w = 1 is the same unguided cell for both).
Both cost the same network evaluations: 2 per guided step (cond + uncond, or main + guide).

    OMP_NUM_THREADS=1 .venv/bin/python bench/autoguidance.py --work /tmp/autoguidance
    OMP_NUM_THREADS=1 .venv/bin/python bench/autoguidance.py --work /tmp/ag_smoke --smoke

Resumable: the run, the reference and the sweep cells already done are kept. Writes
``bench/results/autoguidance.md`` and ``autoguidance.png`` (``--results`` elsewhere; ``--smoke`` under ``--work``).
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a checkout without `pip install -e .`

METRICS = ("fid", "precision", "recall")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="data, run and sweeps (resumable)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--steps", type=int, default=400, help="training steps of the main model")
    p.add_argument("--guide_step", type=int, default=100, help="the guide: the same run at this step")
    p.add_argument("--num_samples", type=int, default=128)
    p.add_argument("--num_steps", type=int, default=25, help="Euler steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 100_000], help="sample seed of image 0")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="CFG weights")
    p.add_argument(
        "--ag", type=float, nargs="+", default=[1.5, 2.0, 3.0], help="autoguidance weights (w > 1)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="4 steps, 8 samples: the script runs, nothing measured"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.guide_step, args.num_samples, args.num_steps = 4, 2, 8, 2
        args.results = args.work / "results"
    return args


def run(cmd: list[str], log: Path) -> None:
    """Run a kit command, its output in ``log``; a failure stops the bench with the log's tail."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}:\n" + log.read_text()[-3000:])


def kit(*args: str) -> list[str]:
    return [sys.executable, "-m", "dip_lightning", *args]


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The demo data, the reference (validation crops) and the run; returns (main, guide, reference)."""
    data, run_dir, log = args.work / "data", args.work / "run", args.work / "bench.log"
    if not (data / "info.json").exists() and not list(data.glob("val-*.tar")):
        # The data its results were measured on (32 px crops of 35-90% of each photo), not demo-data's default.
        run(kit("demo-data", "--out", str(data), "--size", "32", "--crop_scale", "[0.35, 0.9]"), log)
    reference = args.work / "reference.npz"
    if not reference.exists():
        from dip_lightning.core.metrics.sources import iter_shard_images
        from dip_lightning.evaluation.export import _save_npz

        batches = iter_shard_images(str(data / "val-*.tar"), 64, 32)
        _save_npz(reference, arr_0=np.concatenate([b.permute(0, 2, 3, 1).numpy() for b in batches]))
    main = run_dir / "checkpoints" / f"step{args.steps:08d}.ckpt"
    guide = run_dir / "checkpoints" / f"step{args.guide_step:08d}.ckpt"
    if not main.exists():
        callbacks = [
            {"class_path": "dip_lightning.training.callbacks.NonFiniteGuard"},
            {"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decay": 0.99}},
        ]
        run(
            kit(
                "fit",
                "--config",
                str(REPO / "experiments" / "tiny_cpu.yaml"),
                f"--trainer.default_root_dir={run_dir}",
                f"--trainer.max_steps={args.steps}",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                f"--trainer.callbacks={json.dumps(callbacks)}",
                f"--checkpoint.every_n_train_steps={args.guide_step}",
                f"--data.init_args.train_shards={data}/train-*.tar",
                f"--data.init_args.val_shards={data}/val-*.tar",
            ),
            log,
        )
    return main, guide, reference


def sweep(args: argparse.Namespace, main: Path, reference: Path, out: Path, seed: int, guide: str) -> None:
    weights = args.cfg if guide == "none" else args.ag
    run(
        kit(
            "sweep",
            "--ckpt_path",
            str(main),
            "--reference",
            str(reference),
            "--num_samples",
            str(args.num_samples),
            "--num_steps",
            str(args.num_steps),
            "--cfg_scale",
            *map(str, weights),
            "--guide",
            guide,
            "--metrics",
            *METRICS,
            "--seed",
            str(seed),
            "--no_plots",
            "--out",
            str(out),
        ),
        args.work / "bench.log",
    )


def collect(folders: dict[tuple[str, int], Path]) -> dict[tuple[str, float], dict[str, list[float]]]:
    """metric values over seeds for each (method, weight); w = 1 of CFG is also autoguidance's w = 1."""
    values: dict[tuple[str, float], dict[str, list[float]]] = {}
    for (method, _seed), folder in folders.items():
        with open(folder / "sweep.csv", newline="") as f:
            for row in csv.DictReader(f):
                w = float(row["cfg_scale"])
                methods = ["cfg", "autoguidance"] if w == 1.0 and method == "cfg" else [method]
                for m in methods:
                    cell = values.setdefault((m, w), {k: [] for k in METRICS})
                    for k in METRICS:
                        cell[k].append(float(row[k]))
    return values


def write_results(args: argparse.Namespace, values: dict, header: list[str], seconds: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.results.mkdir(parents=True, exist_ok=True)
    rows = []
    for (method, w), cell in sorted(values.items()):
        spread = [f"{np.mean(cell[k]):.4g} ± {np.std(cell[k]):.2g}" for k in METRICS]
        fids = ", ".join(f"{v:.1f}" for v in cell["fid"])
        rows.append(f"| {method} | {w:g} | {' | '.join(spread)} | {fids} |")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for method in ("cfg", "autoguidance"):
        ws = sorted(w for m, w in values if m == method)
        fid = [values[(method, w)]["fid"] for w in ws]
        ax.errorbar(
            ws, [np.mean(f) for f in fid], yerr=[np.std(f) for f in fid], marker="o", capsize=3, label=method
        )
    ax.set_xlabel("guidance weight w")
    ax.set_ylabel(f"FID ({args.num_samples} samples)")
    ax.set_title("Toy-scale guidance: mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    png = args.results / "autoguidance.png"
    fig.savefig(png, dpi=90)
    table = [
        "| method | w | FID | precision | recall | FID per seed |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    md = args.results / "autoguidance.md"
    md.write_text(
        "\n".join([*header, "", *table, "", f"![FID against guidance weight]({png.name})", ""])
        + f"\nBench wall time {seconds / 60:.1f} min.\n"
    )
    return md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    load_before = os.getloadavg()
    main_ckpt, guide, reference = prepare(args)
    folders = {}
    for seed in args.seeds:
        for method, guide_arg in (("cfg", "none"), ("autoguidance", str(guide))):
            folders[(method, seed)] = args.work / "sweeps" / f"{method}_seed{seed}"
            sweep(args, main_ckpt, reference, folders[(method, seed)], seed, guide_arg)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    header = [
        "# Autoguidance vs classifier-free guidance at toy scale",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} "
        f"{os.cpu_count()}-core CPU VM shared with other jobs (load {load_before[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}; CPU "
        f"time of this invocation's commands {(usage.ru_utime + usage.ru_stime) / 60:.1f} min"
        + (" (smoke run: nothing measured)" if args.smoke else "")
        + ".",
        "",
        f"Main model: `experiments/tiny_cpu.yaml`, {args.steps} steps, EMA 0.99; guide: the same run's EMA at step "
        f"{args.guide_step}. {args.num_samples} samples per cell (labels i mod 8), Euler {args.num_steps} steps, "
        f"guidance interval the recipe's (0, 1): every step but t = 0 guided, 2 network evaluations per guided "
        f"step for both methods; seeds {args.seeds}; reference: the demo's {len(np.load(reference)['arr_0'])} "
        "validation crops.",
        "",
        "```bash",
        f"OMP_NUM_THREADS=1 python bench/autoguidance.py --work <work> --steps {args.steps} "
        f"--guide_step {args.guide_step} --num_samples {args.num_samples} --seeds {' '.join(map(str, args.seeds))}",
        "```",
    ]
    md = write_results(args, collect(folders), header, time.time() - start)
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
