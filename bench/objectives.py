"""x-prediction vs v-prediction on the demo data, and the samplers at equal network evaluations (issue 14).

1. ``train``: the tiny config (``experiments/tiny_cpu.yaml``) on the demo data, once with ``model.flow.prediction=v``
   (the release) and once with ``x`` (JiT, loss on v), same steps and seed, EMA 0.99 as the config; each run is
   skipped when its ``last.ckpt`` already holds the asked steps.
2. ``evaluate``: both checkpoints' 8x8 grids side by side (``docs/objectives_grids.png``) and their FIDs (Euler,
   25 steps); then, on the v-prediction checkpoint, Euler, Heun, SDE (Euler-Maruyama, the release's
   ``sde_step_fn`` with its linear w-scheduler) and the multistep solver at equal network evaluations.

FID: :func:`fid_of` is the one place that computes it (the metrics engine's FID against the demo's
validation statistics, ``dip_lightning.commands.demo.reference_stats``). These are demo-scale proxy numbers (a few
hundred samples against 128 validation crops, an ImageNet Inception on 32 px photos): they rank settings on this
data, not the paper's protocol.

    OMP_NUM_THREADS=1 .venv/bin/python bench/objectives.py                  # all phases, 400 steps, 128 samples
    .venv/bin/python bench/objectives.py --phase train --predictions x    # one training (run two side by side)
    .venv/bin/python bench/objectives.py --phase evaluate --parts sde     # one evaluation part; then --phase report
    OMP_NUM_THREADS=1 .venv/bin/python bench/objectives.py --smoke          # 4 steps, 32 samples, writes no md

Each FID of 128 samples costs minutes of CPU Inception (32 px upscaled to 299); that, not training, dominates.
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

REPO = Path(__file__).resolve().parents[1]
try:
    import dip_lightning  # noqa: F401
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from dip_lightning.checkpoint.run_folder import checkpoint_dir, log_dir  # noqa: E402
from dip_lightning.core.data.demo_dataset import build_demo_dataset  # noqa: E402
from dip_lightning.core.images import to_uint8  # noqa: E402

RESULTS = REPO / "bench" / "results"
PREDICTIONS = ("v", "x")


# ------------------------------------------------------------------------------------------------ FID, one place
def fid_of(samples_uint8_nhwc: np.ndarray, reference_path: str | os.PathLike) -> float:
    """FID of uint8 (N, H, W, 3) samples against a reference file: the bench's only FID computation, through the
    kit's metrics engine (`dip_lightning.core.metrics.compute_metrics`) with the offline fid-helper Inception."""
    from dip_lightning.core.metrics import compute_metrics
    from dip_lightning.core.metrics.features import FIDHelperInception

    extractor = _extractor(FIDHelperInception)
    return compute_metrics(samples_uint8_nhwc, reference_path, metrics=["fid"], extractor=extractor)["fid"]


_EXTRACTORS: dict[type, Any] = {}


def _extractor(cls: type) -> Any:
    if cls not in _EXTRACTORS:
        _EXTRACTORS[cls] = cls().eval()
    return _EXTRACTORS[cls]


# ------------------------------------------------------------------------------------------------ training
def _checkpoint_step(path: Path) -> int:
    if not path.is_file():
        return -1
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", -1))


def train(prediction: str, data: dict, runs: Path, steps: int, threads: int) -> Path:
    """The tiny config with ``model.flow.prediction=prediction``; returns its checkpoint of step ``steps``."""
    run = runs / f"pred_{prediction}"
    # The step's own file, not last.ckpt: a continued run (other every_n_train_steps) gets Lightning's last-v1.ckpt.
    last = checkpoint_dir(run) / f"step{steps:08d}.ckpt"
    if _checkpoint_step(last) == steps:
        print(f"[train] {prediction}: {last} holds step {steps} already", flush=True)
        return last
    callbacks = [{"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decay": 0.99}}]
    cmd = [
        sys.executable,
        "-m",
        "dip_lightning",
        "fit",
        "--config",
        str(REPO / "experiments" / "tiny_cpu.yaml"),
        f"--trainer.default_root_dir={run}",
        f"--trainer.max_steps={steps}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        f"--checkpoint.every_n_train_steps={steps}",
        f"--data.init_args.train_shards={data['train_shards']}",
        f"--data.init_args.val_shards={data['val_shards']}",
        f"--model.flow.prediction={prediction}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    log = runs / f"pred_{prediction}.log"
    runs.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"training {prediction} failed (exit {proc.returncode}); see {log}")
    print(f"[train] {prediction}: {steps} steps in {time.perf_counter() - start:.0f} s -> {last}", flush=True)
    return last


# ------------------------------------------------------------------------------------------------ evaluation
def generate(module: Any, sampler: Any, num: int, num_classes: int, batch: int = 128) -> np.ndarray:
    """``num`` uint8 NHWC samples, sample i with label i % C and seed i (the kit's export rule)."""
    from dip_lightning.core.seeding import sample_labels_and_seeds

    labels, seeds = sample_labels_and_seeds(np.arange(num), num_classes, 0, True)
    out = []
    for b in range(0, num, batch):
        x = module.generate(
            torch.from_numpy(labels[b : b + batch]), torch.from_numpy(seeds[b : b + batch]), sampler
        )
        out.append(to_uint8(x).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def side_by_side_grid(grids: dict[str, np.ndarray], out: Path, rows: int = 8, upscale: int = 2) -> Path:
    """Square grids (first rows*rows samples each, one class per column) next to each other, with a gap."""
    from PIL import Image

    tiles = []
    for images in grids.values():
        n, h, w, c = images.shape
        rows = min(rows, int(n**0.5))
        sel = images[: rows * rows].reshape(rows, rows, h, w, c)  # row r, column k = sample r * rows + k
        tiles.append(sel.transpose(0, 2, 1, 3, 4).reshape(rows * h, rows * w, c))
    gap = np.full((tiles[0].shape[0], 8, 3), 255, dtype=np.uint8)
    joined = np.concatenate(
        [t if i == 0 else np.concatenate([gap, t], axis=1) for i, t in enumerate(tiles)], 1
    )
    img = Image.fromarray(joined)
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


SAMPLER_NAMES = ("euler", "heun", "sde", "multistep")
PARTS = ("objectives", *SAMPLER_NAMES)


def sampler_at(name: str, nfe: int) -> tuple[str, Any]:
    """(label, sampler) spending ``nfe`` evaluations: Euler, the SDE and the multistep solver take ``nfe`` steps
    (one evaluation each), Heun ``(nfe + 1) // 2`` (two per step but the last)."""
    from dip_lightning.core.diffusion import EulerSampler, HeunSampler, MultistepSampler, SDESampler

    return {
        "euler": ("euler", EulerSampler(num_steps=nfe)),
        "heun": ("heun", HeunSampler(num_steps=(nfe + 1) // 2)),
        "sde": ("sde (sde_step, w = 1 - t)", SDESampler(num_steps=nfe)),
        "multistep": ("multistep (AB2)", MultistepSampler(num_steps=nfe)),
    }[name]


def evaluate(part: str, checkpoints: dict[str, Path], ref: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One part of the evaluation: ``objectives`` (both checkpoints, Euler 25, grid) or one sampler on the
    v-prediction checkpoint at each NFE budget. Parts are independent, so separate processes may run them."""
    from dip_lightning.core.diffusion import EulerSampler
    from dip_lightning.training.loading import load_module

    torch.set_num_threads(args.threads)
    if part == "objectives":
        result: dict[str, Any] = {"objectives": {}}
        grids = {}
        for prediction, path in checkpoints.items():
            module = load_module(path).eval()
            start = time.perf_counter()
            samples = generate(module, EulerSampler(num_steps=25), args.num_samples, module.num_classes)
            grids[prediction] = samples
            fid = fid_of(samples, ref)
            result["objectives"][prediction] = {"fid": fid, "seconds": time.perf_counter() - start}
            print(
                f"[eval] prediction {prediction}: FID {fid:.2f} (Euler 25, {args.num_samples} samples)",
                flush=True,
            )
        grid_path = (
            Path(args.runs) / "objectives_grids.png" if args.smoke else REPO / "docs" / "objectives_grids.png"
        )
        result["grid"] = str(side_by_side_grid(grids, grid_path))
        return result
    module = load_module(checkpoints["v"]).eval()
    rows = []
    for nfe in args.nfe:
        label, sampler = sampler_at(part, nfe)
        start = time.perf_counter()
        fid = fid_of(generate(module, sampler, args.num_samples, module.num_classes), ref)
        rows.append({"sampler": label, "nfe": sampler.nfe(), "steps": sampler.num_steps, "fid": fid})
        rows[-1]["seconds"] = time.perf_counter() - start
        print(f"[eval] {label:26s} NFE {sampler.nfe():3d}: FID {fid:.2f}", flush=True)
    return {"samplers": rows}


def final_train_loss(run: Path, last_n: int = 5) -> float | None:
    """Mean of the last ``last_n`` logged ``train/loss`` values (v-space for both targets), from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir(run)))
    events.Reload()
    if "train/loss" not in events.Tags().get("scalars", []):
        return None
    values = [e.value for e in events.Scalars("train/loss")][-last_n:]
    return sum(values) / len(values)


def write_markdown(result: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    lines = [
        "# Objectives and samplers on the demo data (`bench/objectives.py`)",
        "",
        f"Measured {datetime.date.today().isoformat()} on a 2-core CPU ({platform.machine()}, torch "
        f"{torch.__version__}, OMP_NUM_THREADS={args.threads}); command: `OMP_NUM_THREADS={args.threads} "
        f".venv/bin/python bench/objectives.py --steps {args.steps} --num_samples {args.num_samples}`.",
        "",
        f"The tiny config (`experiments/tiny_cpu.yaml`, 2.9M parameters, 8x8 patches of 32 px demo crops), "
        f"{args.steps} steps of batch 32, seed 0, EMA 0.99 weights, once per prediction target. FID: "
        f"{args.num_samples} samples (label i % 8, seed i) against the 128 validation crops' statistics "
        "(`ref_val.npz` of the 32 px demo data, fid-helper Inception): a demo-scale proxy that ranks settings on this "
        "data; differences of a few points are within its noise (128 reference images).",
        "",
        "## x-prediction vs v-prediction (Euler, 25 steps)",
        "",
        "| `model.flow.prediction` | loss | train/loss, last 50 steps | FID |",
        "| --- | --- | ---: | ---: |",
    ]
    for prediction, row in result["objectives"].items():
        loss = "v (release)" if prediction == "v" else "v, JiT's clamp 1 - t >= 0.05"
        train_loss = final_train_loss(Path(args.runs) / f"pred_{prediction}")
        shown = f"{train_loss:.3f}" if train_loss is not None else "-"
        lines.append(f"| `{prediction}` | {loss} | {shown} | {row['fid']:.2f} |")
    lines += [
        "",
        f"Grids (left v, right x; one class per column, same seeds): `{result.get('grid')}`.",
        "",
        "## Samplers at equal network evaluations (v-prediction checkpoint, no guidance)",
        "",
        "| sampler | steps | NFE | FID |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in result["samplers"]:
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {row['fid']:.2f} |")
    lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        help="32 px demo data folder, built if missing (default: <runs>/demo_data; not data/demo, which make demo "
        "builds at 64 px)",
    )
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench_objectives"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--num_samples", type=int, default=128)
    parser.add_argument("--nfe", type=int, nargs="+", default=[10])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--phase", choices=["train", "evaluate", "report", "all"], default="all")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="evaluate only these (parallel processes)",
    )
    parser.add_argument(
        "--predictions", nargs="+", choices=PREDICTIONS, default=list(PREDICTIONS), help="train only these"
    )
    parser.add_argument("--smoke", action="store_true", help="4 steps, 32 samples, NFE 4; writes no results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.num_samples, args.nfe = 4, 32, [4]
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    data = build_demo_dataset(args.data or runs / "demo_data", size=32)
    if args.phase == "train":
        for p in args.predictions:  # separate processes may train the two in parallel
            train(p, data, runs, args.steps, args.threads)
        return 0
    checkpoints = {p: train(p, data, runs, args.steps, args.threads) for p in PREDICTIONS}
    if args.phase in ("evaluate", "all"):
        from dip_lightning.commands.demo import reference_stats

        ref = reference_stats(data["val_shards"], Path(args.data) / "ref_val.npz", data["image_size"])
        for part in args.parts:
            (runs / f"eval_{part}.json").write_text(
                json.dumps(evaluate(part, checkpoints, ref, args), indent=2)
            )
    if args.phase in ("report", "all") and not args.smoke:
        merged: dict[str, Any] = {"objectives": {}, "samplers": []}
        for part in PARTS:  # the parts found, in table order
            path = runs / f"eval_{part}.json"
            if path.exists():
                found = json.loads(path.read_text())
                merged["objectives"].update(found.get("objectives", {}))
                merged["samplers"] += found.get("samplers", [])
                merged["grid"] = merged.get("grid") or found.get("grid")
        if merged.get("grid"):
            merged["grid"] = str(Path(merged["grid"]).resolve().relative_to(REPO))
        merged["samplers"].sort(key=lambda row: row["nfe"])
        write_markdown(merged, args, RESULTS / "objectives.md")
        print(f"wrote {RESULTS / 'objectives.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
