"""CPU benchmark: the tiny config's training step time and memory, and the demo's wall time.

    python bench/cpu.py                 # step time + peak RSS of experiments/tiny_cpu.yaml (~1 minute)
    python bench/cpu.py --demo          # also times `python -m dip_lightning.demo` end to end (a few minutes)

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


def step_times(threads: int, steps: int) -> dict:
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
            [sys.executable, "-m", "dip_lightning.demo", "--run-root", tmp, "--threads", str(threads)],
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
    train = step_times(args.threads, args.steps)
    print(train, flush=True)
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
        "| threads | batch | median s/step | p90 s/step | peak RSS (GiB) |",
        "| --- | --- | --- | --- | --- |",
        f"| {train['threads']} | {train['batch']} | {train['median_step_s']:.3f} | {train['p90_step_s']:.3f} "
        f"| {train['peak_rss_gib']:.2f} |",
    ]
    if demo is not None:
        lines += ["", "## `python -m dip_lightning.demo` end to end", "", f"wall time {demo['wall_s']:.0f} s "
                  f"(exit {demo['returncode']}), dataset and FID reference statistics already built:", "", "```",
                  *demo["lines"], "```"]  # fmt: skip
    out = REPO / "bench" / "results" / "cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
