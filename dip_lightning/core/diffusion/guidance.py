"""Interval guidance, the one guidance of every sampler: ``v = v_u + w (v_c - v_u)`` inside ``t_min < t < t_max``
and the plain conditional velocity outside (the guidance interval of Kynkäänniemi et al., which the paper uses).

The weaker prediction ``v_u`` is the model's unconditional one (classifier-free guidance, the paper's), or, given
a guide network, the guide's conditional prediction with the same labels (autoguidance, Karras et al. 2024,
"Guiding a Diffusion Model with a Bad Version of Itself"): ``v = v_guide + w (v_main - v_guide)``.
Outside the interval the weaker branch is not computed at all (the batch is not doubled, the guide not called).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from dip_lightning.core.diffusion.flow_matching import ModelFn
from dip_lightning.core.errors import ConfigError

__all__ = ["check_guide", "guide_properties", "guided_velocity", "in_guidance_interval"]

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
    model_fn: ModelFn,
    x: Tensor,
    t: Tensor,
    y: Tensor,
    null_class: int,
    cfg_scale: float,
    guide_fn: ModelFn | None = None,
) -> Tensor:
    """Guidance, the kit's only implementation: ``v_u + w (v_c - v_u)``, in ``x``'s dtype.

    ``w = 1`` is one forward on the conditional batch (the weaker branch is not computed). Otherwise, without
    ``guide_fn``, classifier-free guidance: one forward on the doubled batch ``[x; x]`` with labels
    ``[y; null]`` (the paper's "100x2" evaluations). With ``guide_fn`` (a conditional guide network's
    velocity), autoguidance: ``v_guide + w (v_main - v_guide)``, one forward of each network on ``(x, t, y)``,
    so ``w = 0`` is the guide alone. ``t`` is (B,).
    """
    if cfg_scale == 1.0:
        return model_fn(x, t, y).to(x.dtype)
    if guide_fn is not None:
        v_main, v_guide = model_fn(x, t, y).to(x.dtype), guide_fn(x, t, y).to(x.dtype)
        return v_guide + cfg_scale * (v_main - v_guide)
    batch = x.shape[0]
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    v_cond, v_uncond = out.to(x.dtype)[:batch], out.to(x.dtype)[batch:]
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def guide_properties(model: Any) -> dict[str, Any]:
    """What an autoguidance guide must share with the main model, read from a module with ``net`` and ``flow``."""
    net = model.net
    return {
        "image size": int(net.input_size),
        "channels": int(net.in_channels),
        "patch size": int(net.patch_size),
        "class count": int(net.num_classes),
        "noise scale": float(model.flow.noise_scale),
    }


def check_guide(main: Any, guide: Any, source: str | os.PathLike | None = None) -> None:
    """Refuse a guide whose images, patches, classes or noise differ from the main model's (ConfigError): it
    must predict for the very inputs the main model sees. ``source`` names it (default: its ``path``)."""
    source = source if source is not None else getattr(guide, "path", "the guide")
    ours, theirs = guide_properties(main), guide_properties(guide)
    differ = [
        f"{name} {theirs[name]} (the model's: {ours[name]})" for name in ours if ours[name] != theirs[name]
    ]
    if differ:
        raise ConfigError(
            f"guide {source} does not fit the model: {', '.join(differ)}. Autoguidance needs a guide of the same "
            "kind: a smaller or earlier DiP trained on the same data (same image size, patch size and classes)."
        )
