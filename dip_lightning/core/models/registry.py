"""Named model sizes (`DiP-XL/16`, `DiT-B/32`, ...) and a parameter / MAC summary.

Sizes: S and B follow DiT (12 blocks, 384/6 heads and 768/12 heads); L and XL are the released DiP configs (22
blocks 1024 wide and 26 blocks 1152 wide, 16 heads each). `/16` models default to 256 px and `/32` models to
512 px (the paper's DiP-XL/32 is its ImageNet-512 model); override with `input_size=`. `DiP-*` use the Patch
Detailer Head post hoc; `DiT-*` are the DiT-only baselines (LinearHead = DiT FinalLayer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dip_lightning.core.errors import ConfigError
from dip_lightning.core.models.dip import DiP
from dip_lightning.core.models.heads import LinearHead

_SIZES: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 22, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 26, "hidden_size": 1152, "num_heads": 16},
}
_FAMILIES: dict[str, type[nn.Module] | None] = {"DiP": None, "DiT": LinearHead}

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    f"{family}-{size}/{patch}": {
        **dims,
        "patch_size": patch,
        "input_size": 256 if patch == 16 else 512,
        "head": head,
    }
    for family, head in _FAMILIES.items()
    for size, dims in _SIZES.items()
    for patch in (16, 32)
}
"""Keyword arguments of DiP for each named model (`head=None` means the Patch Detailer Head)."""


def list_models() -> list[str]:
    """All registered model names."""
    return list(MODEL_CONFIGS)


def create_model(name: str, **overrides: Any) -> DiP:
    """Build a named model; keyword overrides replace or extend its config (e.g. depth=32, num_classes=10)."""
    if name not in MODEL_CONFIGS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return DiP(**{**MODEL_CONFIGS[name], **overrides})


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_summary(model: DiP, input_size: int | None = None, batch_size: int = 1) -> dict[str, Any]:
    """Parameters and forward MACs (per image) of a DiP, split into backbone and head(s).

    The head side is every head module (post-hoc and intermediate); everything else, including the injection
    projection of the intermediate placement, counts as backbone. MACs are FlopCounterMode FLOPs / 2 (matmuls,
    convolutions and attention; elementwise ops are not counted), the DiT "GFLOPs" convention.
    A model built on the `meta` device is counted on meta tensors, which costs no compute; otherwise one
    forward with `batch_size` images runs on the model's device under no_grad.
    """
    size = input_size or model.input_size
    param = next(model.parameters())
    device = param.device
    x = torch.zeros(batch_size, model.in_channels, size, size, device=device, dtype=param.dtype)
    t = torch.full((batch_size,), 0.5, device=device, dtype=param.dtype)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    # The math SDPA backend decomposes attention into matmuls the counter sees; fused CPU/GPU kernels may be
    # missing from its table (meta tensors take the math path anyway).
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(x, t, y)
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    heads = model.head_modules()
    total_flops = counter.get_total_flops()
    head_flops = sum(flops.get(f"{root}.{name}", 0) for name in heads)
    params_total = _count(model)
    params_head = sum(_count(m) for m in heads.values())
    return {
        "input_size": size,
        "tokens": (size // model.patch_size) ** 2,
        "params_total": params_total,
        "params_backbone": params_total - params_head,
        "params_head": params_head,
        "gmacs_total": total_flops / 2 / batch_size / 1e9,
        "gmacs_backbone": (total_flops - head_flops) / 2 / batch_size / 1e9,
        "gmacs_head": head_flops / 2 / batch_size / 1e9,
    }
