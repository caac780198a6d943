"""Inception Score as the ADM evaluator computes it: ``exp(E_x KL(p(y|x) || p(y)))`` per split, averaged.

ADM cuts the softmax outputs into consecutive splits of ``split_size = 5000`` images (not a fixed number of
splits, as the original improved-GAN code did), so 50k samples give 10 splits and fewer than 5000 samples give
one. `inception_score` returns the mean over splits, as ADM prints it; `inception_score_splits` the per-split
values.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["ADM_SPLIT_SIZE", "inception_score", "inception_score_splits"]

ADM_SPLIT_SIZE = 5000


def inception_score_splits(probs: Tensor | np.ndarray, split_size: int = ADM_SPLIT_SIZE) -> list[float]:
    """``exp(mean_x sum_y p log(p / p_split(y)))`` for each consecutive split of ``split_size`` rows."""
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"expected class probabilities of shape (N, K) with N >= 1, got {tuple(p.shape)}")
    scores = []
    for part in p.split(split_size):
        marginal = part.mean(0, keepdim=True)
        # xlogy: 0 log 0 = 0 (ADM's formula gives nan there; a softmax is never exactly 0 in practice).
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)
        scores.append(math.exp(float(kl.sum(1).mean())))
    return scores


def inception_score(probs: Tensor | np.ndarray, split_size: int = ADM_SPLIT_SIZE) -> float:
    """Mean Inception Score over ADM's splits (see the module docstring)."""
    return float(np.mean(inception_score_splits(probs, split_size)))
