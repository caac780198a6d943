"""The paper's Table 2 head ablation at toy scale: DiT-only vs four detailer heads, same backbone, steps and seeds.

Each variant is ``experiments/tiny_cpu.yaml`` (a 4-block DiT of width 192 on 8x8 patches of the 32 px demo photos)
with the head of one paper row, trained with ``python -m dip_lightning fit`` for the same steps from the same
seed, then evaluated post hoc: samples of the final checkpoint's EMA weights (decay 0.99) scored by
:func:`dip_lightning.core.metrics.compute_metrics` against the demo's validation crops (FID, sFID, precision, recall,
patch seam; IS and FD-DINOv2 where this machine can), one row appended to the run's ``eval_metrics.csv`` in the
metrics callback's layout, and all runs put through ``python -m dip_lightning report``.

Head sizes: the overlays (``experiments/ablations/head_*.yaml``, ``dit_only.yaml``) pick the head class; their
XL-scale defaults would dwarf a width-192 backbone (the coordinate MLP's weight generators alone are 12.7M
parameters here, 4x the rest of the model), so each head is shrunk to the tiny conv head's order of size
(:data:`HEAD_SIZES`, parameter counts in the results). That is this benchmark's choice, not the paper's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/head_ablation.py --work /tmp/head_ablation        # 2 seeds x 5 heads
    OMP_NUM_THREADS=1 .venv/bin/python bench/head_ablation.py --work /tmp/ha --steps 4 --num_samples 8 --smoke

Resumable: finished runs (last checkpoint at ``--steps``) and evaluated steps are kept; a rerun continues.
Writes ``bench/results/head_ablation.md``, ``head_ablation.png`` and the report folder
``bench/results/head_ablation/`` (``--results`` elsewhere; ``--smoke`` writes under ``--work`` only).
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

from dip_lightning.checkpoint.resume import resolve_resume  # noqa: E402
from dip_lightning.checkpoint.run_folder import EVAL_METRICS_CSV, log_dir  # noqa: E402
from dip_lightning.core.atomic import atomic_write  # noqa: E402
from dip_lightning.evaluation.report import write_report  # noqa: E402
from dip_lightning.evaluation.tables import format_number, markdown_table, require_matplotlib  # noqa: E402

RESULTS = REPO / "bench" / "results"
TINY = REPO / "experiments" / "tiny_cpu.yaml"
ABLATIONS = REPO / "experiments" / "ablations"
HEAD = "--model.net.init_args.head.init_args."

#: variant -> (overlay YAML or None for the tiny config's own conv head, head-size overrides, paper Table 2 FID)
VARIANTS: dict[str, tuple[str | None, list[str], float]] = {
    "conv_unet": (None, [], 2.16),
    "dit_only": ("dit_only.yaml", [], 5.28),
    "mlp": ("head_mlp.yaml", [f"{HEAD}num_layers=3"], 6.92),
    "coord_mlp": ("head_coord_mlp.yaml", [f"{HEAD}width=16", f"{HEAD}depth=2", f"{HEAD}mlp_ratio=2"], 2.20),
    "attention": (
        "head_attention.yaml",
        [f"{HEAD}width=16", f"{HEAD}depth=2", f"{HEAD}num_heads=2", f"{HEAD}context_tokens=4"],
        2.98,
    ),
}
HEAD_SIZES = {name: overrides for name, (_, overrides, _) in VARIANTS.items()}
PAPER_ROWS = {
    "dit_only": "DiT-only 26L, 1152",
    "mlp": "+ Standard MLP head",
    "coord_mlp": "+ Coordinate MLP (PixNerd repro)",
    "attention": "+ Intra-patch attention",
    "conv_unet": "+ Conv U-Net (DiP)",
}
EVAL_COLUMNS = ["step", "images_seen", "fid", "sfid", "inception_score", "precision", "recall", "patch_seam"]
EVAL_COLUMNS += ["fd_dinov2", "num_samples", "seconds", "unix_time"]


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def prepare_data(work: Path) -> tuple[dict, Path]:
    """The demo dataset and an image npz of all its validation crops (the metrics' reference)."""
    from dip_lightning.core.data.demo_dataset import build_demo_dataset
    from dip_lightning.core.metrics.sources import iter_shard_images
    from dip_lightning.evaluation.export import _save_npz

    data = build_demo_dataset(work / "data", size=32)
    reference = work / "data" / "val_images.npz"
    if not reference.exists():
        batches = [
            b.permute(0, 2, 3, 1).numpy() for b in iter_shard_images(data["val_shards"], 64, image_size=32)
        ]
        _save_npz(reference, arr_0=np.concatenate(batches))
    return data, reference


def run_steps(run_dir: Path) -> int:
    step = resolve_resume(run_dir).step
    return int(step or 0)


def claim(run_dir: Path) -> bool:
    """Take ``run_dir`` for this process (a lock file with its pid), so that invocations running side by side
    (e.g. one per variant) never train the same run twice; False while a live process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".bench.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # left by a process that died
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def train(name: str, seed: int, run_dir: Path, data: dict, args: argparse.Namespace) -> float | None:
    """``fit`` one variant (continues an interrupted run); returns the seconds it took, None when another
    invocation is training it or ``--no_train``."""
    overlay, sizes, _ = VARIANTS[name]
    if run_steps(run_dir) >= args.steps:
        return 0.0
    if args.no_train or not claim(run_dir):
        return None
    callbacks = [{"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decays": [0.99, 0.9]}}]
    cmd = [sys.executable, "-m", "dip_lightning", "fit", "--config", str(TINY)]
    if overlay is not None:
        cmd += ["--config", str(ABLATIONS / overlay)]
    cmd += [
        f"--trainer.default_root_dir={run_dir}",
        f"--seed_everything={seed}",
        f"--trainer.max_steps={args.steps}",
        f"--trainer.val_check_interval={args.val_every}",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--checkpoint.every_n_train_steps={args.steps}",
        f"--data.init_args.train_shards={data['train_shards']}",
        f"--data.init_args.val_shards={data['val_shards']}",
        *sizes,
    ]
    if args.smoke:
        cmd += ["--model.net.init_args.hidden_size=64", "--model.net.init_args.depth=2"]
        cmd += ["--model.net.init_args.num_heads=2", "--data.init_args.batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "fit.log", "a") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(
            f"fit of {name} seed {seed} failed (exit {proc.returncode}); see {run_dir / 'fit.log'}"
        )
    return time.perf_counter() - start


def evaluated_steps(csv_path: Path) -> set[int]:
    if not csv_path.exists():
        return set()
    with open(csv_path, newline="") as f:
        return {int(row["step"]) for row in csv.DictReader(f) if row.get("step")}


def evaluate(run_dir: Path, reference: Path, work: Path, args: argparse.Namespace) -> dict | None:
    """Score the run's final checkpoint and append it to ``eval_metrics.csv``; returns the row (None: done before)."""
    from dip_lightning.core.metrics import compute_metrics
    from dip_lightning.evaluation.export import export_samples
    from dip_lightning.training.loading import load_module

    decision = resolve_resume(run_dir)
    step = int(decision.step or 0)
    csv_path = log_dir(run_dir) / EVAL_METRICS_CSV
    if step in evaluated_steps(csv_path):
        return None
    start = time.perf_counter()
    module = load_module(decision.path)  # the first EMA decay (0.99), as sample/sweep by default
    samples = work / "samples" / f"{run_dir.name}_step{step}.npz"
    if not samples.exists():
        export_samples(module, samples, args.num_samples, batch_size=64, chunk_size=args.num_samples)
    with np.load(samples) as npz:
        images = npz["arr_0"]
    metrics = compute_metrics(
        images, reference, patch_size=int(module.net.patch_size), cache_dir=work / "metrics_cache"
    )
    images_seen = step * 32 * (8 / 32 if args.smoke else 1)
    row = {"step": step, "images_seen": int(images_seen), **metrics}
    row |= {"num_samples": args.num_samples, "seconds": round(time.perf_counter() - start, 1)}
    row["unix_time"] = int(time.time())
    new = not csv_path.exists()
    with open(
        csv_path, "a", newline=""
    ) as f:  # the metrics callback's layout (step, images_seen, metrics...)
        writer = csv.writer(f)
        if new:
            writer.writerow(EVAL_COLUMNS)
        writer.writerow(["" if row.get(c) is None else row[c] for c in EVAL_COLUMNS])
    return row


def parameter_counts() -> dict[str, tuple[int, int]]:
    """(head, whole model) parameters of each variant, built as ``fit`` builds them."""
    from dip_lightning.training.cli import DiPCLI

    counts = {}
    for name, (overlay, sizes, _) in VARIANTS.items():
        cli_args = ["--config", str(TINY)] + (["--config", str(ABLATIONS / overlay)] if overlay else [])
        cli_args += [*sizes, "--trainer.logger=false", "--trainer.callbacks=null"]
        model = DiPCLI(args=cli_args, run=False).model
        counts[name] = (
            sum(p.numel() for p in model.net.head.parameters()),
            sum(p.numel() for p in model.net.parameters()),
        )
    return counts


def final_metrics(run_dir: Path) -> dict[str, float]:
    with open(log_dir(run_dir) / EVAL_METRICS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    return {k: float(v) for k, v in last.items() if k in EVAL_COLUMNS[2:9] and v not in ("", None)}


def spread_table(
    runs: dict[str, dict[int, Path]], metrics: list[str]
) -> tuple[str, dict[str, dict[str, list[float]]]]:
    values: dict[str, dict[str, list[float]]] = {}
    for name, by_seed in runs.items():
        finals = [final_metrics(p) for p in by_seed.values()]
        values[name] = {m: [f[m] for f in finals if m in f] for m in metrics}
    header = [
        "variant",
        "paper row (Table 2)",
        "paper FID",
        "seeds",
        *(f"{m} mean (min-max)" for m in metrics),
    ]
    rows = []
    for name, by_metric in values.items():
        cells = []
        for m in metrics:
            v = by_metric[m]
            cells.append(
                "—"
                if not v
                else f"{format_number(float(np.mean(v)))} ({format_number(min(v))}-{format_number(max(v))})"
            )
        rows.append([name, PAPER_ROWS[name], f"{VARIANTS[name][2]:.2f}", str(len(runs[name])), *cells])
    return markdown_table(header, rows), values


def plot_finals(values: dict[str, dict[str, list[float]]], metrics: list[str], path: Path) -> None:
    """One panel per metric: each variant's seeds as points, their mean as a short line."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), dpi=100)
    names = list(values)
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        for i, name in enumerate(names):
            v = values[name][metric]
            if v:  # seeds as points, their mean as a bar across them (the y axis is not cut at 0)
                ax.plot([i] * len(v), v, "o", color="#08519c", markersize=4, alpha=0.8)
                ax.plot([i - 0.25, i + 0.25], [float(np.mean(v))] * 2, color="#e6550d", linewidth=2)
        if metric == "patch_seam":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric + (" (1.0 = like the data)" if metric == "patch_seam" else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def ordering_text(values: dict[str, dict[str, list[float]]]) -> str:
    by_fid = sorted((float(np.mean(v["fid"])), name) for name, v in values.items() if v.get("fid"))
    paper = sorted((fid, name) for name, (_, _, fid) in VARIANTS.items())
    here = " < ".join(f"{name} {format_number(fid)}" for fid, name in by_fid)
    there = " < ".join(f"{name} {fid:.2f}" for fid, name in paper)
    lines = [
        f"- FID here (mean over seeds, best first): {here}",
        f"- FID in the paper (Table 2, 160 epochs): {there}",
    ]
    if len(by_fid) >= 2:
        (best_fid, best), (second_fid, second) = by_fid[0], by_fid[1]
        spread = max(max(v["fid"]) - min(v["fid"]) for v in values.values() if v.get("fid"))
        lines.append(
            f"- best here: {best}, {format_number(second_fid - best_fid)} FID ahead of {second}; the largest "
            f"seed-to-seed range of any variant is {format_number(spread)} FID"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work", type=Path, required=True, help="folder for data, run folders and samples (not the repo)"
    )
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--num_samples", type=int, default=128)
    p.add_argument(
        "--val_every", type=int, default=25, help="validation-loss interval (the report's loss curves)"
    )
    p.add_argument(
        "--results", type=Path, default=None, help=f"default {RESULTS} ({{work}}/results with --smoke)"
    )
    p.add_argument("--smoke", action="store_true", help="smaller network and batch, results under --work")
    p.add_argument(
        "--no_train",
        action="store_true",
        help="evaluate and report the runs that are finished, train nothing",
    )
    args = p.parse_args()
    work = args.work.resolve()
    if REPO in work.parents or work == REPO:
        p.error("--work must be outside the repository (run folders, samples and data are never committed)")
    results = args.results or (work / "results" if args.smoke else RESULTS)
    started = time.perf_counter()
    data, reference = prepare_data(work)
    runs: dict[str, dict[int, Path]] = {name: {} for name in args.variants}
    timings: dict[str, list[float]] = {name: [] for name in args.variants}
    for seed in args.seeds:  # every variant of one seed before the next seed: partial results are comparable
        for name in args.variants:
            run_dir = work / "runs" / f"{name}_seed{seed}"
            seconds = train(name, seed, run_dir, data, args)
            if seconds is None:
                log(
                    f"{run_dir.name}: not trained here (--no_train, or another invocation trains it); left out"
                )
                continue
            if seconds:
                timings[name].append(seconds)
                log(f"trained {run_dir.name}: {args.steps} steps in {seconds:.0f} s")
            row = evaluate(run_dir, reference, work, args)
            if row is not None:
                shown = ", ".join(
                    f"{k} {format_number(row[k])}"
                    for k in ("fid", "sfid", "precision", "recall", "patch_seam")
                )
                log(f"evaluated {run_dir.name} at step {row['step']}: {shown} ({row['seconds']} s)")
            runs[name][seed] = run_dir
    runs = {name: by_seed for name, by_seed in runs.items() if by_seed}
    results.mkdir(parents=True, exist_ok=True)
    all_runs = [p for by_seed in runs.values() for p in by_seed.values()]
    report, _ = write_report(all_runs, results / "head_ablation", title="Head ablation runs (toy scale)")
    metrics = ["fid", "sfid", "precision", "recall", "patch_seam"]
    table, values = spread_table(runs, metrics)
    plot_finals(values, metrics, results / "head_ablation.png")
    counts = parameter_counts() if not args.smoke else {}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu_minutes = (usage.ru_utime + usage.ru_stime + own.ru_utime + own.ru_stime) / 60
    if args.no_train:
        provenance = "tables of the finished runs in --work, trained and evaluated by earlier invocations."
    else:
        wall_minutes = (time.perf_counter() - started) / 60
        provenance = f"{wall_minutes:.0f} min wall, {cpu_minutes:.0f} min CPU in this invocation."
    lines = [
        "# Head ablation at toy scale (paper Table 2)",
        "",
        f"Generated by `bench/head_ablation.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))} "
        f"--num_samples {args.num_samples}` on {datetime.date.today().isoformat()}, {platform.machine()} "
        f"{os.cpu_count()}-core CPU shared with other jobs, OMP_NUM_THREADS=1; {provenance}",
        "",
        "Setup: `experiments/tiny_cpu.yaml` (DiT 4 blocks x 192 on 8x8 patches of 32 px demo photos, batch 32, "
        "lr 2e-3, adaLN-zero) with each head; same steps and seed per variant; final checkpoint, EMA 0.99, "
        f"{args.num_samples} samples (25 Euler steps, no guidance) against the "
        f"{data.get('num_val', '?')} validation crops.",
        "",
        table,
        "",
        "Each cell: mean over seeds of the final evaluation (min-max over seeds).",
        "",
        ordering_text(values),
        "",
    ]
    if counts:
        sizes = ", ".join(f"{n} {h / 1e3:.0f}k head / {t / 1e6:.2f}M total" for n, (h, t) in counts.items())
        lines += [f"Parameters: {sizes}.", ""]
    if timings and any(timings.values()):
        lines += [
            "Training wall time per run (this invocation, shared machine): "
            + ", ".join(f"{n} {np.mean(t):.0f} s" for n, t in timings.items() if t),
            "",
        ]
    lines += [
        "![final metrics per variant](head_ablation.png)",
        "",
        f"Per-run table and curves: [head_ablation/report.md](head_ablation/{report.name}).",
    ]
    with atomic_write(results / "head_ablation.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    log(f"wrote {results / 'head_ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
