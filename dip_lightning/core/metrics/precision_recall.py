"""Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator computes them.

Each feature set is a manifold: the union of balls around its points whose radius is the distance to the k-th
nearest neighbour within the set (k = 3; the point itself is the 0-th). Precision is the fraction of sample
features inside the reference manifold, recall the fraction of reference features inside the sample manifold.
A point on a ball's surface counts as inside (ADM's ``<=``).

The same paper's **realism score** of one sample (its Sec. 5) grades what precision only counts:
``max_r radius_r / |sample - r|`` over the reference points, >= 1 exactly when the sample is inside a ball;
below 1 it says how far a sample is from being counted (``realism_scores``).

Distances are computed in row blocks (``block_size`` x N at a time), so memory is ``O(block_size * N)``, on
any device. ADM computes squared distances in float16 (falling back to float32 on overflow); here they are
float32 by default (``dtype``), which can flip only points within rounding of a ball's surface.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dip_lightning.core.metrics.errors import MetricsError

__all__ = [
    "ADM_NEIGHBOURHOOD",
    "feature_tensor",
    "manifold_coverage",
    "manifold_radii",
    "precision_recall",
    "realism_scores",
    "squared_distances",
]

ADM_NEIGHBOURHOOD = 3


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``max(|a|² - 2 a·b + |b|², 0)``, the ADM evaluator's pairwise squared distance."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_(min=0)


def feature_tensor(x: Tensor | np.ndarray, device: str | torch.device | None, dtype: torch.dtype) -> Tensor:
    """``x`` as a ``dtype`` tensor on ``device`` (the CPU when None)."""
    return torch.as_tensor(x).to(
        device=torch.device("cpu") if device is None else torch.device(device), dtype=dtype
    )


def manifold_radii(
    features: Tensor | np.ndarray,
    k: int = ADM_NEIGHBOURHOOD,
    block_size: int = 10000,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Squared distance of every feature to its k-th nearest neighbour in the set (self included as 0-th)."""
    f = feature_tensor(features, device, dtype)
    if f.shape[0] <= k:
        raise MetricsError(f"the k={k} manifold needs more than {k} feature vectors, got {f.shape[0]}")
    radii = [squared_distances(block, f).kthvalue(k + 1, dim=1).values for block in f.split(block_size)]
    return torch.cat(radii)


def manifold_coverage(
    queries: Tensor | np.ndarray,
    support: Tensor | np.ndarray,
    support_radii: Tensor,
    block_size: int = 10000,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Fraction of ``queries`` inside at least one ball ``|q - s|² <= r_s`` of the support set."""
    q = feature_tensor(queries, device, dtype)
    s = feature_tensor(support, device, dtype)
    r = feature_tensor(support_radii, device, dtype)
    inside = [(squared_distances(block, s) <= r[None]).any(dim=1) for block in q.split(block_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    reference: Tensor | np.ndarray,
    samples: Tensor | np.ndarray,
    k: int = ADM_NEIGHBOURHOOD,
    block_size: int = 10000,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """(precision, recall) of sample features against reference features with ADM's k=3 manifolds."""
    opts = {"block_size": block_size, "device": device, "dtype": dtype}
    ref_radii = manifold_radii(reference, k, **opts)
    sample_radii = manifold_radii(samples, k, **opts)
    precision = manifold_coverage(samples, reference, ref_radii, **opts)
    recall = manifold_coverage(reference, samples, sample_radii, **opts)
    return precision, recall


def realism_scores(
    reference: Tensor | np.ndarray,
    samples: Tensor | np.ndarray,
    k: int = ADM_NEIGHBOURHOOD,
    keep: float = 1.0,
    block_size: int = 10000,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Realism score of every sample, ``max_r radius_r / |sample - r|`` (Kynkäänniemi et al. 2019, Sec. 5).

    ``keep``: the fraction of reference balls used, smallest radii first. 1.0 (all) makes ``score >= 1``
    exactly "counted by :func:`precision_recall`'s precision"; the paper keeps 0.5, so that a few outlying
    references with wide balls do not lift the score. A sample on a reference point scores huge (``inf`` when
    their distance rounds to 0).
    """
    if not 0.0 < keep <= 1.0:
        raise MetricsError(f"keep must be in (0, 1], got {keep}")
    opts = {"block_size": block_size, "device": device, "dtype": dtype}
    ref = feature_tensor(reference, device, dtype)
    radii = manifold_radii(ref, k, **opts)
    kept = radii.argsort()[: max(1, round(keep * len(radii)))]
    ref, radii = ref[kept], radii[kept]
    s = feature_tensor(samples, device, dtype)
    scores = []
    for block in s.split(block_size):
        # max of sqrt(r / d) is the sqrt of max(r / d); 0 / 0 (a sample on a zero-radius point) is inside: inf.
        ratio = (radii[None] / squared_distances(block, ref)).nan_to_num(nan=float("inf"))
        scores.append(ratio.amax(dim=1).sqrt())
    return torch.cat(scores)
