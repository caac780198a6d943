"""What precision and recall ask of a sample at the demo's scale, and what the demo's samples give.

Precision and recall (ADM's k=3 Inception manifolds, the kit's metrics code) against the demo's validation crops:

1. **The bar**: real training crops of the same data, unchanged and degraded (Gaussian blur of sigma pixels,
   Gaussian noise of s/255, resized to a smaller side and back), as if they were samples. It shows how close to a
   photo a sample must be before precision counts it.
2. **The class agreement**: the fraction of images whose nearest validation crop (Inception pool features) is of
   their own class (chance: one in the number of classes). It asks whether a sample shows its class, not whether it
   is as sharp as a photo. Given for the real and degraded crops and, with ``--checkpoint``, for the EMA samples of
   a demo run (label i % classes, seed i, the run's sampler).
3. **The realism score** (same paper as the metrics, Sec. 5): per image, the largest ratio of a validation crop's
   k-NN radius to the image's distance from it. Precision counts exactly the images scoring >= 1; the median
   says how far the images are from being counted, where precision is stuck at 0. Each checkpoint's samples are
   also scored blurred by 0.7 px and with their patch borders smoothed: whether removing their in-patch noise or
   their seams brings them closer. A bar row rebuilds real crops from patches of other crops of their class: real
   content in every patch, no layout shared across patches.
4. **The network's own denoising** (with ``--checkpoint``): real crops noised to time t (``x_t = t x + (1 - t)
   eps``, t = 1 clean) and the EMA network's one-step clean estimate of them (``x_t + (1 - t) v`` for
   v-prediction), at t = 0.9 and 0.95, where the layout is given and only the detail is left to restore: whether
   the network, not the sampler, keeps the samples from being counted.

    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_metric_bar.py --data data/demo \\
        --checkpoint runs/demo/<run>/checkpoints/last.ckpt [more checkpoints ...]

Writes ``bench/results/demo_metric_bar.md`` (``--results`` elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a checkout without `pip install -e .`

from dip_lightning.core.data.shards import decode_sample, expand_shards, stream_samples  # noqa: E402
from dip_lightning.core.diffusion.flow_matching import convert_prediction  # noqa: E402
from dip_lightning.core.diffusion.samplers import SAMPLER_OVERRIDES, SAMPLERS  # noqa: E402
from dip_lightning.core.images import to_uint8  # noqa: E402
from dip_lightning.core.metrics.class_agreement import class_agreement  # noqa: E402
from dip_lightning.core.metrics.features import FeatureExtractor, make_extractor  # noqa: E402
from dip_lightning.core.metrics.precision_recall import precision_recall, realism_scores  # noqa: E402
from dip_lightning.training.loading import load_module  # noqa: E402
from dip_lightning.training.module import DiPModule  # noqa: E402

BLUR_SIGMAS = (0.5, 0.7, 1.0, 1.5)
NOISE_LEVELS = (4, 8, 16)
RESIZE_FRACTIONS = (0.75, 0.5, 0.25)  # of the side: area-downsampled to it, bilinear back up
ESTIMATE_TIMES = (0.9, 0.95)  # t of the one-step clean estimates (t = 1 clean)
PATCH = 16  # px: the demo model's patch size
SAMPLE_BLUR = 0.7  # px: the samples blurred as much, to see whether their noise is what keeps them out


def read_split(data: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, S, S) and labels (N,) of one split of a demo data folder, in shard order."""
    images, labels = [], []
    for url in expand_shards(sorted(str(p) for p in data.glob(f"{split}-*.tar"))):
        for sample in stream_samples(url):
            image, label = decode_sample(sample, size)
            images.append(image)
            labels.append(label)
    if not images:
        raise SystemExit(
            f"no {split}-*.tar shards in {data}: build them with `python -m dip_lightning demo-data`"
        )
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 images blurred by a separable Gaussian (radius 4 px, reflected borders), rounded back to uint8."""
    taps = torch.arange(-4, 5, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    x = images.float()
    x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="reflect"), kernel.view(1, 1, 1, 9).repeat(3, 1, 1, 1), groups=3)
    x = F.conv2d(F.pad(x, (0, 0, 4, 4), mode="reflect"), kernel.view(1, 1, 9, 1).repeat(3, 1, 1, 1), groups=3)
    return x.round().clamp(0, 255).to(torch.uint8)


def add_noise(images: torch.Tensor, level: float, seed: int = 0) -> torch.Tensor:
    """uint8 images plus Gaussian noise of standard deviation ``level``/255."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * level
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def resample(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 images area-downsampled to ``side`` pixels and bilinearly upsampled back: detail above ``side`` lost."""
    small = F.interpolate(images.float(), size=(side, side), mode="area")
    back = F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return back.round().clamp(0, 255).to(torch.uint8)


def patch_mosaic(images: torch.Tensor, labels: torch.Tensor, patch: int, seed: int = 0) -> torch.Tensor:
    """Each image rebuilt patch by patch, every ``patch`` x ``patch`` tile taken from a random image of its class
    (same position): real content everywhere, no layout shared across tiles (the "bag of patches" look)."""
    out = images.clone()
    generator = torch.Generator().manual_seed(seed)
    tiles = images.shape[-1] // patch
    for i, label in enumerate(labels):
        same_class = (labels == label).nonzero().flatten()
        for ty in range(tiles):
            for tx in range(tiles):
                j = same_class[torch.randint(len(same_class), (1,), generator=generator)].item()
                rows, cols = slice(ty * patch, (ty + 1) * patch), slice(tx * patch, (tx + 1) * patch)
                out[i, :, rows, cols] = images[j, :, rows, cols]
    return out


def smooth_seams(images: torch.Tensor, patch: int, width: int = 2, sigma: float = 1.0) -> torch.Tensor:
    """uint8 images whose pixels within ``width`` of a patch border are replaced by their Gaussian blur."""
    position = torch.arange(images.shape[-1]) % patch
    near = (position < width) | (position >= patch - width)
    band = near[:, None] | near[None, :]
    return torch.where(band, gaussian_blur(images, sigma), images)


def features(extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([extractor(batch) for batch in images.split(64)])


def checkpoint_samples(
    module: DiPModule, num: int, settings: dict[str, object], sampler_name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` EMA samples of a run's module (uint8) and their labels; ``settings`` (num_steps, cfg_scale,
    cfg_interval) replace the run's sampler settings, ``sampler_name`` its integrator."""
    sampler = module.make_sampler(**settings)
    if sampler_name is not None:
        sampler = SAMPLERS[sampler_name](**{name: getattr(sampler, name) for name in SAMPLER_OVERRIDES})
    labels = torch.arange(num) % module.net.num_classes
    with torch.no_grad():
        samples = module.generate(labels, torch.arange(num), sampler=sampler)
    return to_uint8(samples), labels


def one_step_estimates(
    module: DiPModule, images: torch.Tensor, labels: torch.Tensor, t: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real uint8 images noised to time ``t`` by the run's flow (x_t = t x + (1 - t) eps) and the network's one-step
    clean estimate of them (its output converted to x whatever the run predicts), both as uint8."""
    flow = module.flow
    x = images.float() / 127.5 - 1
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    times = torch.full((len(x),), t)
    x_t = flow.interpolate(x, eps, times)
    with torch.no_grad():
        clean = convert_prediction(
            module.net(x_t, times, labels), x_t, times, flow.prediction, "x", flow.t_eps
        )
    return to_uint8(clean), to_uint8(x_t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a demo data folder (train-*.tar, val-*.tar)")
    p.add_argument("--size", type=int, default=64, help="image size of the crops (without --checkpoint)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        nargs="*",
        default=[],
        help="demo runs' checkpoints: their EMA samples are scored too",
    )
    p.add_argument(
        "--num_samples", type=int, default=128, help="samples of the checkpoint, and real crops scored"
    )
    p.add_argument(
        "--cfg_scale", type=float, help="guidance scale of the checkpoint's samples (default: the run's)"
    )
    p.add_argument(
        "--cfg_interval", type=float, nargs=2, help="guidance interval (t_min t_max) of the samples"
    )
    p.add_argument("--num_steps", type=int, help="sampling steps of the samples (default: the run's)")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="integrator (default: the run's)")
    p.add_argument("--extractor", default="fid-helper", help="feature network (pixel-projection: smoke runs)")
    p.add_argument(
        "--samples_only", action="store_true", help="score only the checkpoint's samples (no bar rows)"
    )
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "demo_metric_bar.md")
    args = p.parse_args()
    torch.manual_seed(0)
    start = time.time()

    guidance = {"num_steps": args.num_steps, "cfg_scale": args.cfg_scale, "cfg_interval": args.cfg_interval}
    guidance = {k: v for k, v in guidance.items() if v is not None}
    runs = []  # (row name, EMA module, uint8 samples, labels)
    size = args.size
    for ckpt in args.checkpoint:
        module = load_module(ckpt, weights="ema").eval()
        images, sample_labels = checkpoint_samples(module, args.num_samples, guidance, args.sampler)
        size = module.net.input_size
        runs.append((f"EMA samples of {ckpt.parent.parent.name} {ckpt.stem}", module, images, sample_labels))
    val, val_labels = read_split(args.data, "val", size)
    train, train_labels = read_split(args.data, "train", size)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.num_samples]
    train, train_labels = train[pick], train_labels[pick]
    extractor = make_extractor(args.extractor)
    ref = features(extractor, val)

    rows: list[tuple[str, float, float, float, float]] = []

    def score(name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        feats = features(extractor, images)
        precision, recall = precision_recall(ref, feats)
        realism = float(realism_scores(ref, feats).median())
        rows.append((name, precision, recall, class_agreement(ref, val_labels, feats, labels), realism))
        print(
            f"{name:50s} precision {precision:.2f} recall {recall:.2f} class agreement {rows[-1][3]:.2f} "
            f"realism {realism:.2f}",
            flush=True,
        )

    half_p, half_r = precision_recall(ref[::2], ref[1::2])
    if not args.samples_only:
        score("real training crops", train, train_labels)
        for sigma in BLUR_SIGMAS:
            score(f"real crops, Gaussian blur sigma {sigma} px", gaussian_blur(train, sigma), train_labels)
        for level in NOISE_LEVELS:
            score(f"real crops + Gaussian noise {level}/255", add_noise(train, level), train_labels)
        for fraction in RESIZE_FRACTIONS:
            side = round(size * fraction)
            score(f"real crops resized to {side} px and back", resample(train, side), train_labels)
        mosaic = patch_mosaic(train, train_labels, PATCH)
        score(f"real crops, each {PATCH}x{PATCH} patch from another crop of the class", mosaic, train_labels)
    settings = "".join(
        f", {k} {v}" for k, v in {"sampler": args.sampler, **guidance}.items() if v is not None
    )
    for name, module, images, sample_labels in runs:
        score(name + settings, images, sample_labels)
        score(
            f"... the same, Gaussian blur sigma {SAMPLE_BLUR} px",
            gaussian_blur(images, SAMPLE_BLUR),
            sample_labels,
        )
        score(
            "... the same, 2 px along patch borders blurred 1 px", smooth_seams(images, PATCH), sample_labels
        )
        for t in ESTIMATE_TIMES:
            estimate, noised = one_step_estimates(module, train, train_labels, t)
            score(f"... real crops noised to t = {t}: its one-step clean estimate", estimate, train_labels)
            score(f"... real crops noised to t = {t}, not denoised", noised, train_labels)

    classes = int(val_labels.max()) + 1
    when = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        "# Precision and recall at the demo's scale: the bar, and what the demo's samples give",
        "",
        f"Generated by `python bench/demo_metric_bar.py --data <demo data> --size {size}"
        + (
            " --checkpoint " + " ".join(f"<{c.parent.parent.name}>/{c.name}" for c in args.checkpoint)
            if args.checkpoint
            else ""
        )
        + f" --num_samples {args.num_samples}` on {when:%Y-%m-%d %H:%M} UTC, {platform.machine()} "
        f"{torch.get_num_threads()}-thread CPU, {time.time() - start:.0f} s"
        + ("" if args.extractor == "fid-helper" else f", extractor {args.extractor} (not Inception)")
        + ".",
        "",
        f"Reference: the {len(val)} validation crops ({size} px, {classes} classes); each row scores "
        f"{args.num_samples} images against them with the kit's precision/recall (ADM's k=3 manifolds of Inception "
        "pool features). Class agreement: the fraction whose nearest validation crop is of their own class "
        f"(chance {1 / classes:.3f}). Realism: the median realism score (Kynkäänniemi et al. 2019, Sec. 5, all "
        "reference balls kept); precision counts exactly the images scoring >= 1. Real-vs-real (the validation "
        f"crops in two halves): precision {half_p:.2f}, recall {half_r:.2f}. Resized rows: area-downsampled to the "
        "side named, bilinear back up. Each checkpoint's rows end with the scored real crops noised to time t "
        "(x_t = t x + (1 - t) eps, t = 1 clean) and the EMA network's one-step clean estimate of them (x_t + "
        "(1 - t) v for v-prediction): its denoising where the layout is given.",
        "",
        "| images scored | precision | recall | class agreement | realism (median) |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {pr:.2f} | {rc:.2f} | {agree:.2f} | {real:.2f} |"
            for name, pr, rc, agree, real in rows
        ),
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
