"""How far above the running median (in MADs) the loss of a healthy run goes: the check behind the recipes'
``LossSpikeGuard`` thresholds.

Trains ``experiments/tiny_cpu.yaml`` (the recipe's own LossSpikeGuard on, evaluations off) for a few seeds and
batch sizes, records every step's loss, and replays each loss curve through the guard's own judgement for several
window lengths; the table gives, per run and window, the largest ``(loss - median) / MAD`` of a judged step (after
the warm-up) and where it was. The ratio does not depend on the loss's scale; a smaller batch makes the loss noisier
and its tail heavier than the recipes' global batch of 256 (a conservative proxy).

    OMP_NUM_THREADS=1 .venv/bin/python bench/loss_spike.py                     # ~10 min -> bench/results/loss_spike.md
    OMP_NUM_THREADS=1 .venv/bin/python bench/loss_spike.py --steps 30 --seeds 0 --out /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dip_lightning.core.data.demo_dataset import build_demo_dataset  # noqa: E402
from dip_lightning.training.callbacks.loss_spike import LossSpikeGuard, find_loss_spike_guard  # noqa: E402
from dip_lightning.training.cli import DiPCLI  # noqa: E402

WINDOWS = (50, 100, 200)


class RecordLoss(Callback):
    """Each optimizer step's training loss (the value the guard judges on one process)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


def recipe_guard(config: Path) -> dict:
    """The recipe's LossSpikeGuard entry (its thresholds), read from the YAML."""
    import yaml

    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    return next(c for c in callbacks if c["class_path"].endswith("LossSpikeGuard"))


def train(data: dict, run_dir: Path, seed: int, batch_size: int, steps: int) -> tuple[list[float], dict]:
    config = REPO / "experiments" / "tiny_cpu.yaml"
    callbacks = [
        {"class_path": "dip_lightning.training.callbacks.NonFiniteGuard"},
        {"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decay": 0.99}},
        recipe_guard(config),
    ]
    args = [
        "--config",
        str(config),
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--checkpoint.every_n_train_steps={steps}",
        f"--data.init_args.train_shards={data['train_shards']}",
        f"--data.init_args.val_shards={data['val_shards']}",
        f"--data.init_args.batch_size={batch_size}",
    ]
    record = RecordLoss()
    cli = DiPCLI(args=args, run=False)
    cli.trainer.callbacks.append(record)
    cli.fit(cli.model, datamodule=cli.datamodule)
    guard = find_loss_spike_guard(cli.trainer)
    assert guard is not None
    live = {
        "window": guard.window,
        "num_mads": guard.num_mads,
        "spikes": int(guard._state["spikes"]),
        "rollbacks": guard.rollbacks,
        "max_ratio": float(guard._state["max_ratio"]),
    }
    return record.losses, live


def replay(losses: list[float], window: int) -> tuple[float, int]:
    """The largest ratio the guard's judgement sees on this curve (nothing fires: num_mads is huge) and its step."""
    guard = LossSpikeGuard(window=window, num_mads=1e9)
    best, where = 0.0, 0
    for step, loss in enumerate(losses, start=1):
        before = float(guard._state["max_ratio"])
        guard.judge(step, torch.tensor(loss))
        after = float(guard._state["max_ratio"])
        if after > before:
            best, where = after, step
    return best, where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loss_spike.md")
    args = parser.parse_args()
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = build_demo_dataset(Path(tmp) / "data", size=32)
        for batch_size in args.batch_sizes:
            for seed in args.seeds if batch_size == args.batch_sizes[0] else args.seeds[:1]:
                losses, live = train(
                    data, Path(tmp) / f"run_{seed}_{batch_size}", seed, batch_size, args.steps
                )
                ratios = {w: replay(losses, w) for w in WINDOWS}
                rows.append((seed, batch_size, losses, live, ratios))
                print(seed, batch_size, live, ratios, flush=True)
    write(args, rows, time.time() - started)


def write(args: argparse.Namespace, rows: list, seconds: float) -> None:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    live = rows[0][3]
    lines = [
        "# Loss-spike guard: how far a healthy loss strays above its running median",
        "",
        f"Generated by `bench/loss_spike.py` on {when}; {platform.machine()}, 2-core CPU VM, 1 thread, "
        f"torch {torch.__version__}.",
        "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/loss_spike.py --steps {args.steps} --seeds "
        f"{' '.join(map(str, args.seeds))} --batch_sizes {' '.join(map(str, args.batch_sizes))}` (wall time "
        f"{seconds:.0f} s)",
        "",
        f"Runs: `experiments/tiny_cpu.yaml` ({args.steps} steps, lr 2e-3, EMA 0.99, evaluations off) with the "
        f"recipe's guard (window {live['window']}, {live['num_mads']:g} MADs) on. Ratio = (loss - median) / MAD "
        "over the window of the previous healthy losses (MAD floored at 1e-3 x median), the guard's own "
        "judgement replayed on the recorded curve; judged steps only (after the warm-up of one window). "
        "Batch sizes after the first run the first seed only.",
        "",
        "| seed | batch | loss first -> last | spikes fired (recipe guard) | "
        + " | ".join(f"max ratio, window {w} (step)" for w in WINDOWS)
        + " |",
        "| ---: | ---: | --- | ---: | " + " | ".join("---:" for _ in WINDOWS) + " |",
    ]
    for seed, batch_size, losses, live_run, ratios in rows:
        cells = " | ".join(f"{r:.2f} ({s})" for r, s in (ratios[w] for w in WINDOWS))
        lines.append(
            f"| {seed} | {batch_size} | {losses[0]:.3f} -> {losses[-1]:.3f} | {live_run['spikes']} | {cells} |"
        )
    worst = max([r for *_, ratios in rows for r, _ in ratios.values()] + [1e-9])
    lines += [
        "",
        f"Largest ratio over every run and window: {worst:.2f}. The recipes use {live['num_mads']:g} MADs "
        f"({live['num_mads'] / worst:.1f}x that), so a healthy run is never judged a spike, while an injected "
        "spike (a batch's images x50, `tests/training/callbacks/test_loss_spike.py`) is hundreds of MADs out.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
