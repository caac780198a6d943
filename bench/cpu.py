"""CPU benchmark: the tiny config's training step time and memory, the head's layouts and dense stages, and the
demo's wall time.

    python bench/cpu.py                 # step times of experiments/tiny_cpu.yaml + head variants (~3 minutes)
    python bench/cpu.py --demo          # also times `python -m dip_lightning demo` end to end (a few minutes)

Writes bench/results/cpu.md. Timings depend on what else runs on the machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


HEAD_OVERRIDES = {
    "config (NHWC, dense_conv_side 4)": [],
    "NHWC, dense_conv_side 0": ["--model.net.init_args.head.init_args.dense_conv_side=0"],
    "NCHW, dense_conv_side 0 (the computation before 2026-11-26)": [
        "--model.net.init_args.head.init_args.dense_conv_side=0",
        "--model.net.init_args.head.init_args.channels_last=false",
    ],
}


def head_variants(threads: int, reps: int = 6) -> list[dict]:
    """Forward + backward of the Patch Detailer Head alone, fp32, per layout and dense_conv_side."""
    import torch

    from dip_lightning.models import PatchDetailerHead

    torch.set_num_threads(threads)
    shapes = {
        "XL head (D 1152, P 16, 6.97M), 512 patches": dict(hidden_size=1152, patch_size=16),
        "tiny_cpu head (D 192, P 8, depth 3, base 16), 512 patches": dict(
            hidden_size=192, patch_size=8, depth=3, base_channels=16
        ),
    }
    rows = []
    for label, kw in shapes.items():
        torch.manual_seed(0)
        x = torch.randn(512, 3, kw["patch_size"], kw["patch_size"])
        tokens = torch.randn(512, kw["hidden_size"])
        for channels_last in (False, True):
            for side in (0, 2, 4):
                head = PatchDetailerHead(
                    in_channels=3, channels_last=channels_last, dense_conv_side=side, **kw
                )
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    head(x, tokens, None).square().mean().backward()
                    times.append(time.perf_counter() - t0)
                rows.append(
                    {
                        "head": label,
                        "layout": "NHWC" if channels_last else "NCHW",
                        "dense_conv_side": side,
                        "median_ms": 1e3 * statistics.median(times[1:]),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def step_times(threads: int, steps: int, *overrides: str) -> dict:
    import torch
    from lightning.pytorch.callbacks import Callback

    from dip_lightning.cli import DiPCLI
    from dip_lightning.data.demo import build_demo_dataset

    torch.set_num_threads(threads)
    data = build_demo_dataset(REPO / "data" / "demo", size=32)
    times: list[float] = []

    class Clock(Callback):
        def on_train_batch_start(self, *args: object) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args: object) -> None:
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        cli = DiPCLI(
            args=[
                "--config", str(REPO / "experiments" / "tiny_cpu.yaml"),
                f"--trainer.default_root_dir={tmp}",
                f"--trainer.max_steps={steps}",
                "--trainer.callbacks=null",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                f"--data.init_args.train_shards={data['train_shards']}",
                f"--data.init_args.val_shards={data['val_shards']}",
                *overrides,
            ],
            run=False,
        )  # fmt: skip
        cli.trainer.callbacks.append(Clock())
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    warm = times[5:]
    return {
        "threads": threads,
        "steps": steps,
        "median_step_s": statistics.median(warm),
        "p90_step_s": sorted(warm)[int(0.9 * len(warm))],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "batch": cli.datamodule.batch_size,
    }


def demo_wall(threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "dip_lightning", "demo", "--run_root", tmp, "--threads", str(threads)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        wall = time.time() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[demo]")]
    return {"wall_s": wall, "returncode": proc.returncode, "lines": lines}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--demo", action="store_true")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    # Two interleaved rounds: the machine's speed drifts by ~10% over minutes, which would otherwise land on
    # whichever variant ran during a slow spell.
    rounds: dict[str, list[dict]] = {label: [] for label in HEAD_OVERRIDES}
    for _ in range(2):
        for label, overrides in HEAD_OVERRIDES.items():
            rounds[label].append(step_times(args.threads, args.steps, *overrides))
            print(label, rounds[label][-1], flush=True)
    heads = head_variants(args.threads)
    demo = demo_wall(args.threads) if args.demo else None
    load_after = os.getloadavg()[0]
    lines = [
        "# CPU benchmark",
        "",
        f"- command: `python bench/cpu.py{' --demo' if args.demo else ''}`, {time.strftime('%Y-%m-%d %H:%M')} UTC",
        f"- machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, load average before/after "
        f"{load_before:.1f}/{load_after:.1f} (a shared machine: higher load means slower numbers)",
        "",
        "## experiments/tiny_cpu.yaml training step (callbacks off)",
        "",
        "| head computation | threads | batch | median s/step, round 1 / round 2 | p90 s/step | peak RSS (GiB) |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {label} | {r[0]['threads']} | {r[0]['batch']} | {r[0]['median_step_s']:.3f} / "
            f"{r[1]['median_step_s']:.3f} | {max(t['p90_step_s'] for t in r):.3f} "
            f"| {max(t['peak_rss_gib'] for t in r):.2f} |"
            for label, r in rounds.items()
        ),
        "",
        "## Patch Detailer Head alone, forward + backward, fp32 (same function in every row)",
        "",
        "| head | layout | dense_conv_side | median ms |",
        "| --- | --- | --- | --- |",
        *(f"| {r['head']} | {r['layout']} | {r['dense_conv_side']} | {r['median_ms']:.0f} |" for r in heads),
    ]
    if demo is not None:
        lines += ["", "## `python -m dip_lightning demo` end to end", "", f"wall time {demo['wall_s']:.0f} s "
                  f"(exit {demo['returncode']}), dataset and FID reference statistics already built:", "", "```",
                  *demo["lines"], "```"]  # fmt: skip
    out = REPO / "bench" / "results" / "cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
