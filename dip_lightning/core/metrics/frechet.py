"""Fréchet distance between Gaussian fits of two feature sets: FID, sFID and FD-DINOv2 all use it.

`FIDStats` is a Gaussian fit (mean, unbiased covariance, count, extractor name); `StatsAccumulator` builds one
from a stream of features with float64 running sums, so 50k x 2048 features never have to sit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dip_lightning.core.metrics.errors import MetricsError

__all__ = ["FIDStats", "StatsAccumulator", "frechet_distance"]


@dataclass
class FIDStats:
    """Gaussian statistics of a feature set: mean, unbiased covariance (float64), count and extractor name.

    ``num_samples == 0`` means unknown (ADM reference batches do not record it).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    extractor: str = ""

    @classmethod
    def from_features(cls, features: Tensor | np.ndarray, extractor: str = "") -> FIDStats:
        acc = StatsAccumulator()
        acc.update(torch.as_tensor(features))
        return acc.stats(extractor)


class StatsAccumulator:
    """Running float64 sums for mean and covariance: ``cov = (sum x xᵀ - n mu muᵀ) / (n - 1)`` (``np.cov``)."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None
        self.count = 0

    def update(self, features: Tensor) -> None:
        f = features.detach().to("cpu", torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def stats(self, extractor: str = "") -> FIDStats:
        if self.sum is None or self.outer is None or self.count < 2:
            raise MetricsError(f"statistics need at least 2 images (a covariance), got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return FIDStats(mu.numpy(), sigma.numpy(), self.count, extractor)


def frechet_distance(
    mu1: np.ndarray | Tensor,
    sigma1: np.ndarray | Tensor,
    mu2: np.ndarray | Tensor,
    sigma2: np.ndarray | Tensor,
) -> float:
    """Fréchet distance between two Gaussians, in float64: ``|mu1-mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)``.

    ``tr((S1 S2)^½)`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``S1^½ S2 S1^½`` (same spectrum as ``S1 S2``). Two symmetric eigendecompositions are several times faster
    than scipy's ``sqrtm`` (the ADM evaluator's route) at 2048 dims, better conditioned,
    and tiny negative eigenvalues from round-off are clipped instead of producing complex numbers.
    """
    m1, m2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape:
        raise MetricsError(
            f"statistics of different sizes: {tuple(m1.shape)} vs {tuple(m2.shape)}; they come from different "
            "feature networks"
        )
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)
