"""Interval classifier-free guidance, the one CFG of every sampler: ``v = v_u + w (v_c - v_u)`` inside
``t_min < t < t_max`` and the plain conditional velocity outside (the guidance interval of Kynkäänniemi et al.,
which the paper uses).

Outside the interval the unconditional branch is not computed at all (the batch is not doubled).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dip_lightning.core.diffusion.flow_matching import ModelFn

__all__ = ["guided_velocity", "in_guidance_interval"]

# Grid times that equal an interval bound up to float rounding count as *on* the bound (so not guided, the
# inequalities are strict). Without it, whether t = 0.11 or 0.97 on a 100-step grid is guided would depend on
# how the grid was rounded. The float32 released grid excludes both bounds too: this agrees with it.
_INTERVAL_TOL = 1e-6


def in_guidance_interval(t: float, interval: tuple[float, float], include_top: bool = False) -> bool:
    """Whether time ``t`` lies inside ``interval = (t_min, t_max)``: ``t_min < t < t_max``, or ``t <= t_max``
    with ``include_top`` (the released Heun's comparison); bounds within 1e-6 of ``t`` count as on it."""
    t_min, t_max = interval
    if include_top:
        return t_min + _INTERVAL_TOL < t < t_max + _INTERVAL_TOL
    return t_min + _INTERVAL_TOL < t < t_max - _INTERVAL_TOL


def guided_velocity(
    model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor, null_class: int, cfg_scale: float
) -> Tensor:
    """Classifier-free guidance, the kit's only implementation: ``v_u + w (v_c - v_u)``, in ``x``'s dtype.

    ``w = 1`` is one forward on the conditional batch (the unconditional branch is not computed). Otherwise one
    forward on the doubled batch ``[x; x]`` with labels ``[y; null]`` (the paper's "100x2" evaluations).
    ``t`` is (B,).
    """
    if cfg_scale == 1.0:
        return model_fn(x, t, y).to(x.dtype)
    batch = x.shape[0]
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    v_cond, v_uncond = out.to(x.dtype)[:batch], out.to(x.dtype)[batch:]
    return v_uncond + cfg_scale * (v_cond - v_uncond)
