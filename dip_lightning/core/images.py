"""Pixel conventions: uint8 images and the model's float range ``[-1, 1]``, converted in one place.

* uint8 ``k`` -> float ``k / 127.5 - 1`` (:func:`to_model_range`): 0 -> -1, 255 -> 1;
* float ``x`` -> uint8 ``clamp(127.5 x + 128, 0, 255)`` truncated (:func:`to_uint8`), the DiT / ADM sample
  convention, i.e. ``127.5 (x + 1)`` rounded half up: -1 -> 0, 0 -> 128, 1 -> 255. It inverts
  :func:`to_model_range` exactly, and it is what grids, FID, ``predict`` and the ADM export all use, so a
  sample index gives the same pixels everywhere.
"""

from __future__ import annotations

import torch

__all__ = ["to_model_range", "to_uint8"]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` (any memory layout) -> contiguous float32 in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got {images.dtype}")
    return images.contiguous().to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> uint8 of the same shape, the DiT/ADM convention (see the module docstring).

    Values outside ``[-1, 1]`` are clipped (samplers return the raw ODE endpoint).
    """
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    return torch.clamp(127.5 * x + 128.0, 0.0, 255.0).to(torch.uint8)
