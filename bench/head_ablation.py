"""The paper's Table 2 head ablation at toy scale: DiT-only vs four detailer heads, same backbone, steps and seeds,
with learning curves (Fig 3/4: where the heads' curves cross) and the seeds' spread.

Each variant is the demo recipe (``--config``, default :data:`RECIPE`) with the head of one paper row, trained with
``python -m dip_lightning fit`` for the same steps from the same seed, keeping a checkpoint every ``--eval_every``
steps. Each kept checkpoint is then scored post hoc on its EMA weights (the recipe's first decay) by the kit's
metrics engine against the demo's validation images: ``--curve_samples`` samples at every point (the learning
curves), ``--num_samples`` at the last step (the table; its first ``--curve_samples`` give the curve's last point,
so every curve point has the same sample count). Rows go to ``<run>/tensorboard/eval_metrics.csv`` (curve, read by
``python -m dip_lightning report``) and ``<run>/tensorboard/final_metrics.csv`` (final).

Head sizes: the overlays (``experiments/ablations/head_*.yaml``, ``dit_only.yaml``) pick the head class; their
XL-scale defaults would dwarf a toy backbone (the coordinate MLP's weight generators alone would be 4x the rest of the
model), so each head is shrunk to the toy conv head's order of size (:data:`VARIANTS`, parameter counts in the
results). That is this benchmark's choice, not the paper's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/head_ablation.py --work /tmp/head_ablation --workers 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/head_ablation.py --work /tmp/ha --smoke      # plumbing, seconds

Order: conv U-Net and DiT-only for every seed first, then the other heads seed by seed (:data:`PRIORITY`), so a
study cut short still answers the main question. Resumable: a rerun continues interrupted trainings and exports and
skips what is done (a checkpoint at ``--steps``, a CSV row of a step and sample count); ``--workers N`` runs N runs
side by side (one lock per run folder); ``--stop_after M`` starts no new run after M minutes. Writes
``bench/results/head_ablation.md`` (a hand-written reading below its ``<!-- reading -->`` line is kept),
``head_ablation_curves.png``, ``head_ablation.png``, ``head_ablation_grids.png`` and the report folder
``bench/results/head_ablation/`` (``--results`` elsewhere; ``--smoke`` writes under ``--work`` only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a checkout without `pip install -e .`
sys.path.insert(0, str(REPO / "bench"))

import head_ablation_report as rep  # noqa: E402
from demo_metric_bar import read_split  # noqa: E402

from dip_lightning.checkpoint.resume import resolve_resume  # noqa: E402
from dip_lightning.checkpoint.run_folder import EVAL_METRICS_CSV, STEP_FILENAME, checkpoint_dir, log_dir  # noqa: E402
from dip_lightning.core.atomic import atomic_write  # noqa: E402
from dip_lightning.core.metrics.class_agreement import class_agreement  # noqa: E402
from dip_lightning.evaluation.tables import format_number  # noqa: E402

RESULTS = REPO / "bench" / "results"
RECIPE = REPO / "experiments" / "demo.yaml"
ABLATIONS = REPO / "experiments" / "ablations"
HEAD = "--model.net.init_args.head.init_args."
FINAL_CSV = "final_metrics.csv"
READING_MARK = "<!-- reading -->"

#: variant -> (overlay YAML or None for the recipe's own conv head, head-size overrides; ``{hidden_size}`` is the
#: recipe's backbone width)
VARIANTS: dict[str, tuple[str | None, list[str]]] = {
    "conv_unet": (None, []),
    "dit_only": ("dit_only.yaml", []),
    "coord_mlp": ("head_coord_mlp.yaml", [f"{HEAD}width=16", f"{HEAD}depth=2", f"{HEAD}mlp_ratio=2"]),
    # One block: at 16x16 patches the 256x256 attention maps make two blocks 4x the conv head's step time.
    "attention": (
        "head_attention.yaml",
        [f"{HEAD}width=16", f"{HEAD}depth=1", f"{HEAD}num_heads=2", f"{HEAD}context_tokens=4"],
    ),
    # Hidden width = the backbone's: the default (2/3 of the input) is a 1.5M head at 16x16 patches, and a narrower
    # one would pass the patch through fewer dimensions than DiT-only's linear head.
    "mlp": ("head_mlp.yaml", [f"{HEAD}num_layers=3", f"{HEAD}hidden_dim={{hidden_size}}"]),
}
#: The main comparison (DiP against DiT-only) runs for every seed before the other heads.
PRIORITY = [["conv_unet", "dit_only"], ["coord_mlp", "attention", "mlp"]]
#: In-training callbacks the study leaves out: it evaluates post hoc, with its own sample counts.
SKIPPED_CALLBACKS = ("SampleGrid", "MetricsCallback")
SMOKE_NET = [
    "--model.net.init_args.hidden_size=64",
    "--model.net.init_args.depth=2",
    "--model.net.init_args.num_heads=2",
    "--data.init_args.batch_size=8",
]


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S} {os.getpid()}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ the recipe
def read_recipe(path: Path) -> dict[str, Any]:
    """What the study takes from the recipe: image and patch size, classes, batch, steps, training callbacks."""
    config = yaml.safe_load(path.read_text())
    net = config["model"]["net"]["init_args"]
    callbacks = [
        c for c in config["trainer"].get("callbacks") or [] if not c["class_path"].endswith(SKIPPED_CALLBACKS)
    ]
    return {
        "input_size": int(net["input_size"]),
        "hidden_size": int(net["hidden_size"]),
        "patch_size": int(net["patch_size"]),
        "num_classes": int(net["num_classes"]),
        "batch_size": int(config["data"]["init_args"]["batch_size"]),
        "max_steps": int(config["trainer"]["max_steps"]),
        "callbacks": callbacks,
        "sampler": describe_sampler(config["model"].get("sampler")),
    }


def describe_sampler(entry: dict | None) -> str:
    """The recipe's sampler as the report names it: ``SDESampler (num_steps 25, cfg_scale 3.0, ...)``."""
    if not entry:
        return "the kit's default sampler"
    options = ", ".join(f"{k} {v}" for k, v in (entry.get("init_args") or {}).items())
    return entry["class_path"].rsplit(".", 1)[-1] + (f" ({options})" if options else "")


def run_threads() -> str:
    """OpenMP threads of each training process (one unless the caller sets OMP_NUM_THREADS)."""
    return os.environ.get("OMP_NUM_THREADS", "1")


def prepare_data(work: Path, size: int) -> tuple[dict, Path, torch.Tensor]:
    """The demo's dataset (the demo command's crop counts and range) at the recipe's image size, an image npz of
    all its validation images (the metrics' reference), and their labels in the same order (class agreement)."""
    from dip_lightning.commands import demo
    from dip_lightning.core.data.demo_dataset import build_demo_dataset
    from dip_lightning.evaluation.export import _save_npz

    data = build_demo_dataset(
        work / "data",
        size=size,
        train_per_class=demo.TRAIN_PER_CLASS,
        val_per_class=demo.VAL_PER_CLASS,
        crop_scale=demo.CROP_SCALE,
    )
    images, labels = read_split(Path(data["root"]), "val", size)
    reference = work / "data" / f"val_images_{size}.npz"
    if not reference.exists():
        _save_npz(reference, arr_0=images.permute(0, 2, 3, 1).numpy())
    return data, reference, labels


def eval_steps(args: argparse.Namespace) -> list[int]:
    return sorted({*range(args.eval_every, args.steps + 1, args.eval_every), args.steps})


def run_order(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(variant, seed) in priority order: each group's variants seed by seed, the groups one after the other."""
    order = []
    for group in PRIORITY:
        chosen = [name for name in group if name in args.variants]
        order += [(name, seed) for seed in args.seeds for name in chosen]
    return order


# ------------------------------------------------------------------------------------------------ locks
def claim(run_dir: Path) -> bool:
    """Take ``run_dir`` for this process (a lock file with its pid), so that workers and invocations running side
    by side never work on the same run; False while another live process holds it."""
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


def release(run_dir: Path) -> None:
    (run_dir / ".bench.lock").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ training
def trained_steps(run_dir: Path) -> int:
    return int(resolve_resume(run_dir).step or 0) if run_dir.exists() else 0


def head_args(name: str, recipe: dict[str, Any]) -> list[str]:
    """The overlay and head-size arguments of one variant."""
    overlay, sizes = VARIANTS[name]
    configs = ["--config", str(ABLATIONS / overlay)] if overlay is not None else []
    return configs + [size.format(hidden_size=recipe["hidden_size"]) for size in sizes]


def fit_command(name: str, seed: int, run_dir: Path, data: dict, args: argparse.Namespace) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "dip_lightning",
        "fit",
        "--config",
        str(args.config),
        *head_args(name, args.recipe),
    ]
    cmd += [
        f"--trainer.default_root_dir={run_dir}",
        f"--seed_everything={seed}",
        f"--trainer.max_steps={args.steps}",
        f"--trainer.val_check_interval={args.val_every}",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks={json.dumps(args.recipe['callbacks'])}",
        f"--checkpoint.every_n_train_steps={args.eval_every}",
        f"--data.init_args.train_shards={data['train_shards']}",
        f"--data.init_args.val_shards={data['val_shards']}",
    ]
    return cmd + (SMOKE_NET if args.smoke else [])


def train(name: str, seed: int, run_dir: Path, data: dict, args: argparse.Namespace) -> float:
    """``fit`` one variant to ``--steps`` (continuing an interrupted run); the seconds it took, 0 when done before."""
    if trained_steps(run_dir) >= args.steps:
        return 0.0
    env = {**os.environ, "OMP_NUM_THREADS": run_threads()}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    with open(run_dir / "fit.log", "a") as out:
        cmd = fit_command(name, seed, run_dir, data, args)
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(
            f"fit of {name} seed {seed} failed (exit {proc.returncode}); see {run_dir / 'fit.log'}"
        )
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ evaluation
def _extractor() -> Any:
    """The offline Inception of the kit's metrics engine (tests put a cheaper network here)."""
    from dip_lightning.core.metrics.features import FIDHelperInception

    return FIDHelperInception().eval()


def metric_engine(reference: Path, work: Path, patch_size: int) -> Any:
    from dip_lightning.core.metrics import MetricEngine

    return MetricEngine.create(
        reference,
        rep.ENGINE_METRICS,
        patch_size=patch_size,
        device="cpu",
        extractor=_extractor(),
        cache_dir=work / "metrics_cache",
    )


def _features(engine: Any, images: np.ndarray, batch_size: int = 64) -> Any:
    batches = (
        torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
        for i in range(0, len(images), batch_size)
    )
    return engine.features(batches)


def _merged(a: Any, b: Any) -> Any:
    """Two feature sets of disjoint samples as one."""
    from dip_lightning.core.metrics.reference import FeatureSet

    features = {k: np.concatenate([a.features[k], b.features[k]]) for k in a.features}
    return FeatureSet(features, a.seam + b.seam, a.num_images + b.num_images, a.extractor)


def _samples(run_dir: Path, step: int, count: int, work: Path) -> tuple[np.ndarray, float]:
    """``count`` samples (the export rule: sample i has label i % classes, seed i) of the step's checkpoint,
    EMA weights; kept in ``<work>/samples`` (an interrupted export continues by chunks)."""
    from dip_lightning.evaluation.export import export_samples
    from dip_lightning.training.loading import load_module

    path = work / "samples" / f"{run_dir.name}_step{step}_n{count}.npz"
    start = time.perf_counter()
    if not path.exists():
        module = load_module(checkpoint_dir(run_dir) / (STEP_FILENAME.format(step=step) + ".ckpt"))
        export_samples(module, path, count, batch_size=64, chunk_size=64)
    with np.load(path) as npz:
        return npz["arr_0"], time.perf_counter() - start


def scores(engine: Any, samples: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The engine's metrics of exported samples (label i % classes) and their class agreement with the validation
    crops (`dip_lightning.core.metrics.class_agreement`)."""
    labels = torch.arange(samples.num_images) % args.recipe["num_classes"]
    reference = torch.from_numpy(engine.reference.pool_features)
    agreement = class_agreement(reference, args.val_labels, samples.features["pool"], labels)
    return {**engine.evaluate(samples), "class_agreement": agreement}


def _row(step: int, metrics: dict, count: int, seconds: float, batch: int) -> dict[str, Any]:
    return {
        "step": step,
        "images_seen": step * batch,
        **metrics,
        "num_samples": count,
        "seconds": round(seconds, 1),
    }


def evaluate_step(
    run_dir: Path, step: int, final: bool, engine: Any, args: argparse.Namespace
) -> dict | None:
    """Score one checkpoint (curve row; at the final step also the final row); None when both were done before."""
    logs = log_dir(run_dir)
    need_curve = step not in rep.read_rows(logs / EVAL_METRICS_CSV)
    need_final = final and step not in rep.read_rows(logs / FINAL_CSV)
    if not (need_curve or need_final):
        return None
    count = args.num_samples if need_final else args.curve_samples
    images, sample_seconds = _samples(run_dir, step, count, args.work)
    start = time.perf_counter()
    head = _features(engine, images[: args.curve_samples])
    batch = args.recipe["batch_size"]
    if need_curve:
        rep.append_row(
            logs / EVAL_METRICS_CSV, _row(step, scores(engine, head, args), args.curve_samples, 0, batch)
        )
    row = None
    if need_final:
        everything = _merged(head, _features(engine, images[args.curve_samples :]))
        seconds = sample_seconds + time.perf_counter() - start
        row = _row(step, scores(engine, everything, args), count, seconds, batch)
        rep.append_row(logs / FINAL_CSV, row)
    return row or {"step": step, "num_samples": args.curve_samples}


def evaluate(run_dir: Path, engine: Any, args: argparse.Namespace) -> None:
    """The final step first (the table), then the curve's earlier points."""
    steps = eval_steps(args)
    for step in [steps[-1], *steps[:-1]]:
        row = evaluate_step(run_dir, step, step == args.steps, engine, args)
        if row is not None and "fid" in row:
            shown = ", ".join(f"{k} {format_number(row.get(k))}" for k in rep.METRICS)
            log(f"{run_dir.name} step {step}, {row['num_samples']} samples: {shown} ({row['seconds']} s)")


# ------------------------------------------------------------------------------------------------ the work loop
def work_loop(args: argparse.Namespace, data: dict, engine: Any) -> int:
    """Train and evaluate every run in priority order that no other worker holds, until done or out of time;
    returns the number of runs that failed (each logged, the others go on)."""
    started, failed = time.monotonic(), 0
    for name, seed in run_order(args):
        if args.stop_after is not None and time.monotonic() - started > 60 * args.stop_after:
            log(f"--stop_after {args.stop_after} min reached: starting no further run")
            break
        run_dir = args.work / "runs" / f"{name}_seed{seed}"
        if not claim(run_dir):
            continue
        try:
            seconds = train(name, seed, run_dir, data, args) if not args.no_train else 0.0
            if seconds:
                log(f"trained {run_dir.name}: {args.steps} steps in {seconds:.0f} s")
            if trained_steps(run_dir) >= args.steps:  # else --no_train and not finished
                evaluate(run_dir, engine, args)
        except RuntimeError as err:
            failed += 1
            log(f"{run_dir.name} failed, going on with the next run: {err}")
        finally:
            release(run_dir)
    return failed


def spawn_workers(args: argparse.Namespace, argv: list[str]) -> list[subprocess.Popen]:
    """``--workers`` - 1 more processes of this script; this one is the first worker."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker"]
    procs = []
    for _ in range(args.workers - 1):
        procs.append(subprocess.Popen(cmd, cwd=REPO))
        time.sleep(2)  # the first takes the first run's lock before the next looks
    return procs


# ------------------------------------------------------------------------------------------------ results
def collect(args: argparse.Namespace) -> tuple[rep.Nested, rep.Curves, list[Path]]:
    """The finished final rows and all curve rows of the runs in ``--work`` (variants in priority order)."""
    finals: rep.Nested = {}
    curves: rep.Curves = {}
    runs = []
    for name, seed in run_order(args):
        run_dir = args.work / "runs" / f"{name}_seed{seed}"
        final = rep.read_rows(log_dir(run_dir) / FINAL_CSV).get(args.steps)
        curve = rep.read_rows(log_dir(run_dir) / EVAL_METRICS_CSV)
        if curve:
            curves.setdefault(name, {})[seed] = curve
            runs.append(run_dir)
        if final:
            finals.setdefault(name, {})[seed] = final
    return finals, curves, runs


def parameter_counts(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(head, whole model) parameters of each variant, built as ``fit`` builds them."""
    from dip_lightning.training.cli import DiPCLI

    counts = {}
    for name in args.variants:
        cli_args = ["--config", str(args.config), *head_args(name, args.recipe)]
        cli_args += ["--trainer.logger=false", "--trainer.callbacks=null"]
        model = DiPCLI(args=cli_args, run=False).model
        counts[name] = (
            sum(p.numel() for p in model.net.head.parameters()),
            sum(p.numel() for p in model.net.parameters()),
        )
    return counts


def write_grids(args: argparse.Namespace, path: Path, seed: int = 0, per_class: int = 3) -> bool:
    """DiP's and DiT-only's samples (seed ``seed``, EMA) side by side, one row of the figure per evaluation step
    (the middle one and the last), ``per_class`` samples per class; False until both runs have them."""
    steps = eval_steps(args)
    rows = []
    for step in sorted({steps[(len(steps) - 1) // 2], steps[-1]}):
        row = []
        for name, label in (("conv_unet", "DiP (conv head)"), ("dit_only", "DiT-only")):
            found = sorted((args.work / "samples").glob(f"{name}_seed{seed}_step{step}_n*.npz"))
            if not found:
                return False
            with np.load(found[0]) as npz:
                row.append(
                    (
                        f"{label}, step {step}",
                        rep.class_grid(npz["arr_0"], args.recipe["num_classes"], per_class),
                    )
                )
        rows.append(row)
    rep.mosaic(rows, path)
    return True


def machine_line() -> str:
    load = os.getloadavg()
    return (
        f"{platform.machine()} {os.cpu_count()}-core CPU VM, OMP_NUM_THREADS={run_threads()} per training run"
        f", load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)"
    )


def crossing_lines(curves: rep.Curves) -> list[str]:
    lines = []
    for metric in rep.CURVE_METRICS:
        means = rep.curve_means(curves, metric)
        for other in [n for n in means if n != "conv_unet"]:
            found = rep.crossings(means, "conv_unet", other, metric)
            if "conv_unet" in means and found:
                lines.append(f"- {metric}, conv_unet vs {other}: curves cross " + "; ".join(found))
    return lines or ["- no crossings of conv_unet's mean curves with another head's at the evaluated steps"]


def kept_reading(path: Path) -> str:
    """The hand-written reading below :data:`READING_MARK` of an earlier report (kept across reruns)."""
    if not path.is_file():
        return ""
    text = path.read_text()
    return text[text.index(READING_MARK) :] if READING_MARK in text else ""


def shown_path(path: Path) -> str:
    """A path in the repository relative to its root (the report names no machine's folders)."""
    return str(path.relative_to(REPO)) if REPO in path.parents else path.name


def command_line(args: argparse.Namespace) -> str:
    parts = [
        f"--steps {args.steps}",
        f"--eval_every {args.eval_every}",
        f"--seeds {' '.join(map(str, args.seeds))}",
    ]
    parts += [f"--num_samples {args.num_samples}", f"--curve_samples {args.curve_samples}"]
    return f"bench/head_ablation.py --config {shown_path(args.config)} " + " ".join(parts)


def write_results(args: argparse.Namespace, wall_minutes: float | None) -> Path:
    from dip_lightning.evaluation.report import write_report

    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    finals, curves, runs = collect(args)
    if runs:
        write_report(runs, results / "head_ablation", title="Head ablation runs (toy scale)")
        # The report lists its sources by path; the committed copy names the work folder, not this machine's.
        report_md = results / "head_ablation" / "report.md"
        report_md.write_text(report_md.read_text().replace(str(args.work.resolve()), "<work>"))
    rep.plot_curves(curves, results / "head_ablation_curves.png")
    rep.plot_finals(finals, results / "head_ablation.png")
    grids = write_grids(args, results / "head_ablation_grids.png")
    counts = parameter_counts(args) if not args.smoke else None
    ran = [f"{n}: seeds {', '.join(map(str, sorted(s)))}" for n, s in finals.items()]
    missing = [f"{n} seed {s}" for n, s in run_order(args) if s not in finals.get(n, {})]
    timing = f"{wall_minutes:.0f} min wall in this invocation" if wall_minutes is not None else "tables only"
    lines = [
        "# Head ablation at toy scale (paper Table 2, Fig 3/4)",
        "",
        f"Generated by `{command_line(args)}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{machine_line()}; {timing}.",
        "",
        f"Setup: `{shown_path(args.config)}` ({args.recipe['input_size']} px, {args.recipe['patch_size']}x"
        f"{args.recipe['patch_size']} patches, batch {args.recipe['batch_size']}) with each head; the same steps and "
        f"seeds per variant; EMA weights; sampler {args.recipe['sampler']}; "
        f"{args.num_samples} samples at step {args.steps} (the table) and "
        f"{args.curve_samples} at every {args.eval_every} steps (the curves) against the demo's validation images.",
        "",
        f"Finished: {'; '.join(ran) or 'nothing'}. Not run: {', '.join(missing) or 'none'}.",
        "",
        rep.final_table(finals, args.steps, counts),
        "",
        "Each cell: mean ± standard deviation over seeds (min-max).",
        "",
        f"- FID here, best first: {rep.ranking_line(finals, 'fid')}",
        "- FID in the paper (ImageNet 256, 160 epochs): conv_unet 2.16 < coord_mlp 2.20 < attention 2.98 < "
        "dit_only 5.28 < mlp 6.92",
        f"- patch seam here, nearest 1.0 first: {rep.ranking_line(finals, 'patch_seam')}",
        "",
        "## The paper's FID orderings, pair by pair, at this scale",
        "",
        *rep.ordering_lines(finals),
        "",
        f"## Learning curves ({args.curve_samples} samples per point; band: min-max over seeds)",
        "",
        "![metrics against training step](head_ablation_curves.png)",
        "",
        *crossing_lines(curves),
        "",
        "FID, mean ± std over seeds:",
        "",
        rep.curve_table(rep.curve_means(curves, "fid"), "fid"),
        "",
        "Patch seam, mean ± std over seeds:",
        "",
        rep.curve_table(rep.curve_means(curves, "patch_seam"), "patch_seam"),
        "",
        "Class agreement (samples whose nearest validation crop is of their class), mean ± std over seeds:",
        "",
        rep.curve_table(rep.curve_means(curves, "class_agreement"), "class_agreement"),
        "",
        "![final metrics per variant, one point per seed](head_ablation.png)",
        "",
    ]
    if grids:
        lines += ["![DiP and DiT-only samples side by side](head_ablation_grids.png)", ""]
    lines += ["Per-run table and curves: [head_ablation/report.md](head_ablation/report.md).", ""]
    out = results / "head_ablation.md"
    text = "\n".join(lines) + "\n" + (kept_reading(out) or "")
    with atomic_write(out, "w") as f:
        f.write(text)
    return out


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="data, run folders, samples (not the repo)")
    p.add_argument("--config", type=Path, default=RECIPE, help="the recipe every variant starts from")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's max_steps)")
    p.add_argument("--eval_every", type=int, default=None, help="curve interval (default: steps / 4)")
    p.add_argument(
        "--val_every", type=int, default=None, help="validation-loss interval (default: eval_every / 5)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--num_samples", type=int, default=256, help="samples at the final step (the table)")
    p.add_argument("--curve_samples", type=int, default=64, help="samples at every curve point")
    p.add_argument("--workers", type=int, default=1, help="runs trained and evaluated side by side")
    p.add_argument("--stop_after", type=float, default=None, help="minutes after which no new run starts")
    p.add_argument(
        "--results", type=Path, default=None, help=f"default {RESULTS} ({{work}}/results with --smoke)"
    )
    p.add_argument("--smoke", action="store_true", help="smaller network and batch, results under --work")
    p.add_argument("--no_train", action="store_true", help="evaluate and report finished runs, train nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work, args.config = args.work.resolve(), args.config.resolve()
    if REPO in args.work.parents or args.work == REPO:
        p.error("--work must be outside the repository (run folders, samples and data are never committed)")
    if args.curve_samples > args.num_samples:
        p.error(
            "--curve_samples must not exceed --num_samples (the final samples' first ones are the curve's)"
        )
    args.recipe = read_recipe(args.config)
    args.steps = args.steps or args.recipe["max_steps"]
    args.eval_every = args.eval_every or max(1, args.steps // 4)
    args.val_every = args.val_every or max(1, args.eval_every // 5)
    args.results = (args.results or (args.work / "results" if args.smoke else RESULTS)).resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    data, reference, args.val_labels = prepare_data(args.work, args.recipe["input_size"])
    # Built before the other workers start, so that one of them computes the reference features (then cached).
    engine = metric_engine(reference, args.work, args.recipe["patch_size"])
    workers = [] if args.worker else spawn_workers(args, argv)
    failed = work_loop(args, data, engine)
    if args.worker:
        return 1 if failed else 0
    failed += sum(proc.wait() != 0 for proc in workers)
    out = write_results(args, None if args.no_train else (time.perf_counter() - started) / 60)
    log(f"wrote {out}" + (f"; {failed} run(s) or worker(s) failed, see the log above" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
