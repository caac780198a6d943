"""CPU benchmark: the tiny config's training step time and memory, the head's layouts and dense stages, the
per-step overhead of what the demo adds to the bare step, and the demo's wall time.

    python bench/cpu.py                 # step times of experiments/tiny_cpu.yaml + head variants (~3 minutes)
    python bench/cpu.py --demo          # also times `python -m dip_lightning demo` end to end (a few minutes)
    python bench/cpu.py --overhead      # only the overhead section: bare step vs + logger, bar, EMA, ... (~12 min)
    python bench/cpu.py --inception     # only the metrics Inception's layout and CPU batch size section (~2 min)

Writes bench/results/cpu.md (``--overhead``: only its own section of it). Timings depend on what else runs on
the machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The benchmarks' own demo data (32 px): not the repository's data/demo, which `make demo` builds at its 64 px.
BENCH_DATA = Path(tempfile.gettempdir()) / "dip_bench_demo_data"
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

    from dip_lightning.core.models import PatchDetailerHead

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

    from dip_lightning.core.data.demo_dataset import build_demo_dataset
    from dip_lightning.training.cli import DiPCLI

    torch.set_num_threads(threads)
    data = build_demo_dataset(BENCH_DATA, size=32)
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


# ---------------------------------------------------------------------------------------------- overhead
# What the demo adds to the bare training step, one piece at a time. Each variant runs in its own process, so the
# rich bar can be given a terminal (`script`) or a file, exactly as a user's shell or a log file would; the
# variants are interleaved over rounds (the machine's speed drifts between minutes).
BARE = ["--trainer.callbacks=null", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
EMA_CALLBACK = {"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decay": 0.99}}


def demo_callbacks_without_evaluations() -> list[dict]:
    """The config's callbacks with their evaluations pushed past the end: what they cost on the other steps."""
    import yaml

    callbacks = yaml.safe_load((REPO / "experiments" / "tiny_cpu.yaml").read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        args = callback.get("init_args", {})
        if "every_n_steps" in args:  # SampleGrid, MetricsCallback
            args.update(every_n_steps=10**9, on_train_end=False)
    return callbacks


def overhead_variants() -> dict[str, tuple[bool, list[str]]]:
    """label -> (stdout is a terminal, CLI overrides on top of the tiny config)."""
    callbacks = demo_callbacks_without_evaluations()
    logger_bar = ["--trainer.callbacks=null"]
    foreach = ["--model.optimizer.init_args.foreach=true"]
    return {
        "bare (no callbacks, bar, logger)": (False, BARE),
        "bare, AdamW foreach": (False, [*BARE, *foreach]),
        "+ TensorBoard logger": (False, BARE[:2]),
        "+ logger + bar, stdout a file": (False, logger_bar),
        "+ logger + bar, stdout a terminal": (True, logger_bar),
        "+ logger + bar + EMA, terminal": (True, [f"--trainer.callbacks={json.dumps([EMA_CALLBACK])}"]),
        "demo config between evaluations, terminal": (True, [f"--trainer.callbacks={json.dumps(callbacks)}"]),
        "demo config between evaluations, terminal, foreach": (
            True,
            [f"--trainer.callbacks={json.dumps(callbacks)}", *foreach],
        ),
    }


def overhead_variant(label: str, threads: int, steps: int, data_dir: Path) -> dict:
    """One variant in this process: mean and median wall time between consecutive training-batch ends, which
    covers everything a step costs (data, hooks, bar, logging), after a warm-up of 20 steps."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from dip_lightning.training.cli import DiPCLI

    torch.set_num_threads(threads)
    _, overrides = overhead_variants()[label]
    ends: list[float] = []

    class Clock(Callback):
        def on_train_batch_end(self, *args: object) -> None:
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        cli = DiPCLI(
            args=[
                "--config", str(REPO / "experiments" / "tiny_cpu.yaml"),
                f"--trainer.default_root_dir={tmp}",
                f"--trainer.max_steps={steps}",
                "--trainer.limit_val_batches=0",
                "--checkpoint.every_n_train_steps=1000000",
                f"--data.init_args.train_shards={data_dir / 'train-*.tar'}",
                f"--data.init_args.val_shards={data_dir / 'val-*.tar'}",
                *overrides,
            ],
            run=False,
        )  # fmt: skip
        for callback in cli.trainer.callbacks:
            if hasattr(callback, "reference") and callback.reference is not None:
                callback.reference = str(data_dir / "ref_val.npz")
        cli.trainer.callbacks.append(Clock())
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    gaps = [b - a for a, b in zip(ends[20:], ends[21:])]
    return {
        "mean_step_s": statistics.fmean(gaps),
        "median_step_s": statistics.median(gaps),
        "steps": len(gaps),
    }


def overhead(threads: int, steps: int, rounds: int, labels: list[str] | None) -> dict[str, list[dict]]:
    from dip_lightning.commands.demo import reference_stats
    from dip_lightning.core.data.demo_dataset import build_demo_dataset

    data_dir = BENCH_DATA
    dataset = build_demo_dataset(data_dir, size=32)
    reference_stats(dataset["val_shards"], data_dir / "ref_val.npz", dataset["image_size"])
    variants = overhead_variants()
    labels = labels or list(variants)
    results: dict[str, list[dict]] = {label: [] for label in labels}
    for _ in range(rounds):
        for label in labels:
            tty, _ = variants[label]
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [sys.executable, __file__, "--variant", label, "--threads", str(threads)]
                cmd += ["--steps", str(steps), "--data_dir", str(data_dir), "--result", out.name]
                if tty:  # a pseudo-terminal as standard output, as in a user's shell
                    cmd = ["script", "-qec", shlex.join(cmd), "/dev/null"]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, capture_output=True, env=env)
                results[label].append(json.loads(Path(out.name).read_text()))
            print(f"{label}: {results[label][-1]} (load {os.getloadavg()[0]:.1f})", flush=True)
    return results


OVERHEAD_HEADING = "## Per-step overhead of the demo's training loop (`--overhead`)"


def overhead_report(
    results: dict[str, list[dict]], threads: int, steps: int, load: tuple[float, float]
) -> str:
    first = statistics.median(r["mean_step_s"] for r in next(iter(results.values())))
    # The best round: another process sharing the cores only ever adds time, so the minimum is the least
    # disturbed estimate; the median says how typical it is.
    first_best = min(r["mean_step_s"] for r in next(iter(results.values())))
    lines = [
        OVERHEAD_HEADING,
        "",
        f"- command: `python bench/cpu.py --overhead --steps {steps}`, {time.strftime('%Y-%m-%d %H:%M')} UTC",
        f"- machine: {os.cpu_count()} cores, {threads} threads, Python {sys.version.split()[0]}, load average "
        f"before/after {load[0]:.1f}/{load[1]:.1f}",
        "- each row: experiments/tiny_cpu.yaml, batch 32, validation and checkpoints off, one process per run,",
        "  variants interleaved; s/step = mean wall time between consecutive batch ends after 20 warm-up steps",
        "  (the mean, not the median, because periodic costs such as logging every 10 steps count); the median",
        "  and the best of the rounds are shown, then every round.",
        "",
        "| variant | s/step, median of rounds | vs first row | s/step, best round | vs first row "
        "| rounds (mean s/step) | median step of the rounds |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for label, runs in results.items():
        means = " ".join(f"{r['mean_step_s']:.4f}" for r in runs)
        medians = " ".join(f"{r['median_step_s']:.4f}" for r in runs)
        mid = statistics.median(r["mean_step_s"] for r in runs)
        best = min(r["mean_step_s"] for r in runs)
        vs_mid, vs_best = 100 * (mid / first - 1), 100 * (best / first_best - 1)
        lines.append(
            f"| {label} | {mid:.4f} | {vs_mid:+.1f}% | {best:.4f} | {vs_best:+.1f}% | {means} | {medians} |"
        )
    return "\n".join(lines) + "\n"


INCEPTION_HEADING = "## The metrics Inception on CPU: layout and images per pass (`--inception`)"


def inception_variants(rounds: int, images: int = 64) -> dict[str, list[float]]:
    """Seconds per image of the default extractor (pool + sFID features of 32 px images resized to 299 px):
    the one NCHW pass of all images it ran before 2026-12-02 against channels-last passes of several sizes."""
    import torch

    from dip_lightning.core.metrics.features import FIDHelperInception, _run_graph_layers, resize_bilinear_tf1

    extractor = FIDHelperInception()
    batch = torch.randint(
        0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )

    def nchw_one_pass() -> None:
        x = (resize_bilinear_tf1(batch.float(), (299, 299)) - 128.0) / 128.0
        _run_graph_layers(extractor._layers, x, want_spatial=True)

    def channels_last(per_pass: int):
        def run() -> None:
            extractor.cpu_batch_size = per_pass
            extractor.features(batch, ("pool", "spatial"))

        return run

    variants = {f"NCHW, one pass of {images} (before)": nchw_one_pass}
    variants |= {f"channels-last, {n} per pass": channels_last(n) for n in (images, 32, 16, 8)}
    results: dict[str, list[float]] = {label: [] for label in variants}
    with torch.inference_mode():
        for (
            run
        ) in variants.values():  # warm-up: TorchScript profiles its first calls per input shape and layout
            run()
        for _ in range(rounds):
            for label, run in variants.items():
                t0 = time.perf_counter()
                run()
                results[label].append((time.perf_counter() - t0) / images)
    return results


def inception_report(
    results: dict[str, list[float]], threads: int, rounds: int, load: tuple[float, float]
) -> str:
    first = statistics.median(next(iter(results.values())))
    lines = [
        INCEPTION_HEADING,
        "",
        f"- command: `python bench/cpu.py --inception --rounds {rounds}`, {time.strftime('%Y-%m-%d %H:%M')} UTC",
        f"- machine: {os.cpu_count()} cores, {threads} threads, Python {sys.version.split()[0]}, load average "
        f"before/after {load[0]:.1f}/{load[1]:.1f}",
        "- each row: FIDHelperInception pool + sFID features of 64 random 32 px images (resized to 299 px), "
        "variants interleaved; the same features up to float rounding (tests/core/metrics/test_features.py)",
        "",
        "| variant | ms/image, median of rounds | vs first row | rounds (ms/image) |",
        "| --- | ---: | ---: | --- |",
    ]
    for label, runs in results.items():
        mid = statistics.median(runs)
        rounds_ms = " ".join(f"{1000 * r:.0f}" for r in runs)
        lines.append(f"| {label} | {1000 * mid:.0f} | {100 * (mid / first - 1):+.0f}% | {rounds_ms} |")
    return "\n".join(lines) + "\n"


def replace_section(text: str, heading: str, section: str) -> str:
    """``text`` with the section that starts at the line ``heading`` (up to the next "## " line) replaced by
    ``section``, or ``section`` appended."""
    lines = text.splitlines(keepends=True)
    if heading + "\n" not in lines:
        return text.rstrip("\n") + "\n\n" + section
    start = lines.index(heading + "\n")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


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
    p.add_argument("--overhead", action="store_true", help="only the per-step overhead section")
    p.add_argument("--inception", action="store_true", help="only the metrics Inception section")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --overhead / --inception")
    p.add_argument("--variants", default="", help="semicolon-separated subset of the --overhead variants")
    # Internal: one --overhead variant in a child process.
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--data_dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        result = overhead_variant(args.variant, args.threads, args.steps, args.data_dir)
        Path(args.result).write_text(json.dumps(result))
        return
    if args.inception:
        import torch

        torch.set_num_threads(args.threads)
        load_before = os.getloadavg()[0]
        results = inception_variants(args.rounds)
        report = inception_report(results, args.threads, args.rounds, (load_before, os.getloadavg()[0]))
        out = REPO / "bench" / "results" / "cpu.md"
        out.write_text(replace_section(out.read_text() if out.exists() else "", INCEPTION_HEADING, report))
        print(report + f"wrote its section into {out}")
        return
    if args.overhead:
        load_before = os.getloadavg()[0]
        labels = [v for v in args.variants.split(";") if v] or None
        results = overhead(args.threads, args.steps, args.rounds, labels)
        report = overhead_report(results, args.threads, args.steps, (load_before, os.getloadavg()[0]))
        out = REPO / "bench" / "results" / "cpu.md"
        out.write_text(replace_section(out.read_text() if out.exists() else "", OVERHEAD_HEADING, report))
        print(report + f"wrote its section into {out}")
        return
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
    text = "\n".join(lines) + "\n"
    for heading in (OVERHEAD_HEADING, INCEPTION_HEADING):  # measured separately: keep them
        if out.exists() and heading + "\n" in out.read_text():
            previous = out.read_text().splitlines(keepends=True)
            start = previous.index(heading + "\n")
            end = next(
                (i for i in range(start + 1, len(previous)) if previous[i].startswith("## ")), len(previous)
            )
            text = replace_section(text, heading, "".join(previous[start:end]))
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
