"""Counter-based seeds: every random draw of the kit is a pure function of integers, never of call order.

* :func:`hash64` / :func:`mix_seed`: splitmix64 over a tuple of integers (vectorised over numpy arrays). The
  training noise of a step is seeded from (global seed, rank, step, micro-batch); the data stream's shard
  choices, permutations and flips from (seed, tag, rank, position). A resumed run therefore draws exactly what
  the uninterrupted run drew, with nothing to restore but counters.
* :func:`sample_labels_and_seeds`: the evaluation rule shared by the in-training FID, ``sample`` /
  ``predict`` exports and every metric command: global sample ``i`` has class ``i % num_classes`` (50 per
  class for 50k samples of ImageNet) and noise seed ``seed + i``, so an index gives the same image whatever
  the batch size, the number of processes or an interruption.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hash64", "mix_seed", "sample_labels_and_seeds"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash64(*parts: int | np.ndarray) -> np.ndarray:
    """uint64 hash of integers / broadcastable integer arrays: the same inputs give the same bits."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as splitmix64 intends
        h = np.zeros(1, dtype=np.uint64)
        for part in parts:
            arr = np.asarray(part)
            if arr.dtype != np.uint64:
                arr = (arr.astype(np.int64) if arr.dtype.kind in "iub" else arr).astype(np.uint64)
            h = _splitmix64(h ^ arr)
    return h


def mix_seed(*values: int) -> int:
    """A non-negative 63-bit seed (for ``torch.Generator.manual_seed``) from several integers."""
    return int(hash64(*values).reshape(-1)[0]) >> 1


def sample_labels_and_seeds(
    indices: np.ndarray, num_classes: int, seed: int = 0, balanced: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Class label and noise seed of each global sample index (int64 arrays).

    Labels are ``i % num_classes`` (class-balanced), or with ``balanced=False`` a draw that depends only on
    ``(seed, i)``; seeds are ``seed + i``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if balanced:
        labels = indices % num_classes
    else:
        labels = np.array(
            [np.random.default_rng([seed, int(i)]).integers(num_classes) for i in indices], dtype=np.int64
        )
    return labels.astype(np.int64), indices + np.int64(seed)
