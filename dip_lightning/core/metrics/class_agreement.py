"""Class agreement: how often a class-conditional sample looks, to Inception, most like a real image of its class.

The fraction of samples whose nearest reference image (Euclidean distance of the pool features precision/recall
use) carries the sample's label: a 1-nearest-neighbour classification of the samples, scored against the labels
they were generated for. Chance is the reference's largest class share (1/C for balanced classes); real images of
the reference's distribution score high. Not in the DiP paper nor in the ADM evaluator: a kit metric for small runs,
where it moves while precision and recall, which count a sample only when it is nearly a photo, stay at 0
(docs/design.md, "Metrics").
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dip_lightning.core.metrics.errors import MetricsError
from dip_lightning.core.metrics.precision_recall import feature_tensor, squared_distances

__all__ = ["class_agreement", "nearest_labels"]


def nearest_labels(
    queries: Tensor | np.ndarray,
    support: Tensor | np.ndarray,
    support_labels: Tensor | np.ndarray,
    block_size: int = 10000,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """The label of each query's nearest support feature (``block_size`` queries at a time)."""
    q = feature_tensor(queries, device, dtype)
    s = feature_tensor(support, device, dtype)
    labels = np.asarray(support_labels, dtype=np.int64)
    if len(labels) != s.shape[0]:
        raise MetricsError(f"{s.shape[0]} reference features but {len(labels)} labels")
    if s.shape[0] == 0:
        raise MetricsError("class agreement needs at least one reference feature")
    nearest = torch.cat([squared_distances(block, s).argmin(dim=1).cpu() for block in q.split(block_size)])
    return labels[nearest.numpy()]


def class_agreement(
    reference: Tensor | np.ndarray,
    reference_labels: Tensor | np.ndarray,
    samples: Tensor | np.ndarray,
    sample_labels: Tensor | np.ndarray,
    block_size: int = 10000,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Fraction of ``samples`` whose nearest ``reference`` feature has the sample's label."""
    wanted = np.asarray(sample_labels, dtype=np.int64)
    if len(wanted) != len(samples):
        raise MetricsError(f"{len(samples)} sample features but {len(wanted)} labels")
    found = nearest_labels(samples, reference, reference_labels, block_size, device, dtype)
    return float((found == wanted).mean())
