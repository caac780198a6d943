"""Data-path benchmark: decode throughput per core from prepared shards, and end to end through the
DataModule with N DataLoader workers. Not a test; ``make bench-data`` or

    OMP_NUM_THREADS=1 .venv/bin/python bench/data.py [--images 256] [--seconds 2] [--out FILE]

1. Builds an ImageNet-like source folder (JPEG q90, ~500x375, random crops of scikit-image's photos),
   then prepares it at 256 px as ``png`` (level 1), ``jpg`` (q95) and ``orig`` shards with the shard tool.
2. Per core: one process, no workers, reads batches of 64 through ``TrainShardStream.make_batch`` (tar
   read + decode + ADM crop for ``orig`` + batch assembly) for ``--seconds`` per repeat, 5 repeats
   interleaved across formats (the machine is shared: best-of is the least disturbed figure). A bare
   ``PIL.Image.open(...).load()`` loop over the same jpg bytes is measured alongside as a reference.
3. End to end: ``ShardDataModule.train_dataloader()`` with 1 and 2 workers on the jpg shards, plus the
   float conversion ``on_after_batch_transfer`` does (here on the CPU, in the main process).

The target (BENCHMARKS.md, "Anchors and targets"): >= 900 decoded img/s per core for 256 px jpg shards.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LABELS = {
    "jpg": "jpg q95, 256 px",
    "png": "png level 1, 256 px",
    "orig": "orig (~500x375 JPEG q90, ADM crop at load)",
}


def make_source(root: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    from dip_lightning.core.data.demo_dataset import DEMO_CLASSES, load_photo

    rng = np.random.default_rng(seed)
    photos = {name: Image.fromarray(load_photo(name)) for name in DEMO_CLASSES}
    for i in range(n):
        name = DEMO_CLASSES[i % len(DEMO_CLASSES)]
        img = photos[name]
        w, h = img.size
        cw, ch = rng.integers(w // 3, w + 1), rng.integers(h // 3, h + 1)
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        target = (int(rng.integers(400, 560)), int(rng.integers(300, 420)))  # ImageNet-like sizes
        crop = img.crop((int(x0), int(y0), int(x0 + cw), int(y0 + ch))).resize(
            target, Image.Resampling.BICUBIC
        )
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:05d}.jpg", quality=90)


def make_batcher(pattern: str, batch: int = 64) -> Callable[[], int]:
    """A function reading the next batch through the training stream; returns the image count."""
    from dip_lightning.core.data.shards import expand_shards, shard_sample_counts
    from dip_lightning.core.data.streams import TrainShardStream

    urls = expand_shards(pattern)
    stream = TrainShardStream(
        urls, shard_sample_counts(urls), image_size=256, batch_size=batch, batches_per_epoch=10**6, mix=2
    )
    stream.make_batch(0)  # warm: tar index, page cache
    position = [1]

    def step() -> int:
        x, _ = stream.make_batch(position[0])
        position[0] += 1
        return int(x.shape[0])

    return step


def make_pil_reference(pattern: str) -> Callable[[], int]:
    """Bare Pillow decode of the same jpg bytes held in memory (no tar, no conversion, no batch)."""
    import io

    from PIL import Image

    from dip_lightning.core.data.shards import expand_shards, local_reader

    reader = local_reader()
    blobs = [reader.read(u, i)["jpg"] for u in expand_shards(pattern) for i in range(len(reader.index(u)))]
    position = [0]

    def step() -> int:
        for _ in range(64):
            img = Image.open(io.BytesIO(blobs[position[0] % len(blobs)]))
            img.load()
            position[0] += 1
        return 64

    return step


def measure(steps: dict[str, Callable[[], int]], seconds: float, repeats: int = 5) -> dict[str, tuple]:
    """Repeats interleaved across ``steps``; ``{name: (best, median)}`` images/s."""
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                n += step()
            rates[name].append(n / (time.perf_counter() - t0))
    return {name: (max(r), statistics.median(r)) for name, r in rates.items()}


def end_to_end(
    pattern: str, workers: int, seconds: float, convert: bool, batch: int = 64, repeats: int = 2
) -> float:
    """Best images/s of ``repeats`` windows through ``ShardDataModule.train_dataloader()``."""
    import torch

    from dip_lightning.core.data import ShardDataModule
    from dip_lightning.core.images import to_model_range

    dm = ShardDataModule(
        train_shards=pattern, image_size=256, batch_size=batch, num_workers=workers, epoch_length=10**7
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(2 * max(1, workers)):  # workers started, first batches out
        next(it)
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            x, _ = next(it)
            if convert:
                x = to_model_range(x)
                assert x.dtype == torch.float32
            n += x.shape[0]
        best = max(best, n / (time.perf_counter() - t0))
    del it
    return best


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import PIL
    import torch

    versions = f"Python {platform.python_version()}, Pillow {PIL.__version__}, torch {torch.__version__}"
    return f"{cpu}, {cores} cores, {versions}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="source images (default 256)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per repeat (default 2)")
    p.add_argument("--out", default=str(REPO / "bench/results/data.md"), help="markdown report ('' = none)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from dip_lightning.core.data.prepare import prepare_split

    load_before = os.getloadavg()
    t_start = time.time()
    rows: list[str] = []
    prep: list[str] = []
    e2e: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dip-bench-data-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        make_source(tmp_path / "src", args.images)
        print(f"source: {args.images} JPEGs in {time.perf_counter() - t0:.1f} s")
        sizes: dict[str, float] = {}
        for fmt in LABELS:
            t0 = time.perf_counter()
            m = prepare_split(
                tmp_path / "src", tmp_path / fmt, image_size=256, format=fmt, shard_size=64, progress=False
            )
            rate = m["num_samples"] / (time.perf_counter() - t0)
            sizes[fmt] = sum(s["bytes"] for s in m["shards"]) / m["num_samples"] / 1024
            prep.append(f"| {fmt} | {rate:.0f} | {sizes[fmt]:.0f} KiB |")
            print(f"prepare {fmt}: {rate:.0f} img/s, {sizes[fmt]:.0f} KiB/img")

        steps = {fmt: make_batcher(str(tmp_path / fmt / "train-*.tar")) for fmt in LABELS}
        steps["pil"] = make_pil_reference(str(tmp_path / "jpg" / "train-*.tar"))
        result = measure(steps, args.seconds)
        for fmt, label in LABELS.items():
            best, med = result[fmt]
            print(f"per core {fmt}: best {best:.0f} img/s, median {med:.0f}")
            rows.append(f"| {label} | {sizes[fmt]:.0f} KiB | {best:.0f} | {med:.0f} |")
        best, med = result["pil"]
        print(f"reference, bare PIL decode of the jpg bytes: best {best:.0f} img/s, median {med:.0f}")
        rows.append(
            f"| reference: bare `Image.open(...).load()` of the jpg bytes | | {best:.0f} | {med:.0f} |"
        )

        for workers in (1, 2):
            rates = [
                end_to_end(str(tmp_path / "jpg" / "train-*.tar"), workers, 2 * args.seconds, convert)
                for convert in (False, True)
            ]
            print(
                f"end to end jpg, {workers} worker(s): {rates[0]:.0f} img/s, with conversion {rates[1]:.0f}"
            )
            e2e.append(f"| jpg q95, 256 px | {workers} | 64 | {rates[0]:.0f} | {rates[1]:.0f} |")
    load_after = os.getloadavg()
    elapsed = time.time() - t_start
    print(f"total {elapsed:.0f} s")
    if not args.out:
        return 0
    text = "\n".join(
        [
            "# Data pipeline benchmark",
            "",
            "- command: `OMP_NUM_THREADS=1 .venv/bin/python bench/data.py` (`make bench-data`), "
            f"{elapsed:.0f} s",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
            f"- machine: {machine()}",
            f"- load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f}; the machine "
            "is shared, so other jobs ran at the same time and the figures are lower bounds",
            f"- source: {args.images} ImageNet-like JPEGs (q90, 400-560 x 300-420 px, crops of "
            "scikit-image photos), prepared at 256 px with `dip_lightning.core.data.prepare`",
            "",
            "## Per core (one process, no DataLoader workers)",
            "",
            "Tar read by offset + decode (+ ADM crop for orig) + batch assembly into uint8 "
            f"(64, 3, 256, 256); {args.seconds:g} s per repeat, 5 repeats interleaved across rows.",
            "",
            "| shards | size / image | best img/s | median img/s |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            "Target: >= 900 img/s per core for 256 px jpg shards.",
            "",
            "## End to end through ShardDataModule",
            "",
            "`train_dataloader()` with N workers: uint8 batches as the loader yields them, and with the "
            "uint8 -> float [-1, 1] conversion of `on_after_batch_transfer` done here on the CPU in the "
            "main process (on a GPU it runs on the device, where it is free; on this 2-core machine the "
            "main process and the workers share the same two cores). Best of 2 repeats.",
            "",
            "| shards | workers | batch | img/s (uint8 batches) | img/s (with float conversion on CPU) |",
            "| --- | --- | --- | --- | --- |",
            *e2e,
            "",
            "## Shard preparation (all cores, from the source JPEGs)",
            "",
            "| format | img/s | size / image |",
            "| --- | --- | --- |",
            *prep,
            "",
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
