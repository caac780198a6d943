"""Images and independent reference computations for the metrics tests: seeded images with spatial structure,
FID by numpy and scipy, precision/recall by brute force; a slow extractor."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp

from dip_lightning.core.metrics.features import PixelProjection


def smooth_images(n: int, seed: int, size: int = 16, shift: float = 0.0) -> np.ndarray:
    """uint8 (n, size, size, 3) images (NHWC, as ADM sample files) with spatial structure (upsampled low-res
    noise), seeded."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) + shift
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


#: Classes of `labelled_images`.
CLASSES = 4


def labelled_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each of `CLASSES` classes (class c brighter by 0.25 c) and their labels."""
    images = [smooth_images(per_class, seed=seed + 100 * c, shift=0.25 * c - 0.3) for c in range(CLASSES)]
    return np.concatenate(images), np.repeat(np.arange(CLASSES), per_class)


def run_two_forked_processes(worker: Callable[..., None], args: tuple, timeout: float = 120) -> None:
    """``worker(rank, *args)`` in two forked processes (no re-import); a hung collective past ``timeout`` seconds
    kills them and fails the test."""
    context = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"two processes of {worker.__name__} did not finish within {timeout:.0f} s")


def nchw(images: np.ndarray) -> torch.Tensor:
    """NHWC images as a contiguous NCHW tensor (the layout the feature networks take)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with numpy statistics and scipy's matrix square root (the ADM evaluator's route)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def brute_force_pr(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al.'s definition with explicit loops over float64 Euclidean distances."""

    def radii(x: np.ndarray) -> np.ndarray:
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(queries: np.ndarray, support: np.ndarray, r: np.ndarray) -> float:
        hits = 0
        for q in queries:
            dist = np.sqrt(((support - q) ** 2).sum(-1))
            hits += bool((dist <= r).any())
        return hits / len(queries)

    return inside(samples, ref, radii(ref)), inside(ref, samples, radii(samples))


class SlowPixelProjection(PixelProjection):
    """:class:`PixelProjection` that sleeps ``delay`` s per batch: an evaluation that lasts, without using the CPU,
    for tests that signal a run during its evaluation (``extractor: {class_path: tests.helpers.metrics....}``)."""

    def __init__(self, num_features: int = 8, size: int = 4, delay: float = 0.2) -> None:
        super().__init__(num_features=num_features, size=size)
        self.delay = delay

    def extract_kinds(self, images: torch.Tensor, kinds: Collection[str]) -> dict[str, torch.Tensor]:
        time.sleep(self.delay)
        return super().extract_kinds(images, kinds)
