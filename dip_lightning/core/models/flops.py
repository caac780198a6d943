"""The forward FLOPs of a network per image, counted on shapes alone (meta tensors): no compute, no weights moved.

Used for model FLOPs utilisation (MFU). The count is ``torch.utils.flop_counter``'s: matmuls, convolutions and
attention (two FLOPs per multiply-add; elementwise ops are not counted), the convention of
:func:`~dip_lightning.core.models.registry.model_summary` (which reports the same count as MACs).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["forward_flops_per_image"]


def forward_flops_per_image(net: nn.Module) -> int:
    """FLOPs of one forward ``net(x, t, y)`` of one image at ``net.input_size`` (a DiP or anything with its
    ``in_channels``, ``input_size`` interface).

    The weights are replaced by meta tensors of the same shapes for the count (``torch.func.functional_call``),
    so it costs nothing on the device and leaves ``net`` untouched, whatever device it lives on. A network compiled
    in place is counted through its eager forward.
    """
    meta = torch.device("meta")
    tensors = {name: torch.empty_like(p, device=meta) for name, p in net.named_parameters()}
    tensors.update({name: torch.empty_like(b, device=meta) for name, b in net.named_buffers()})
    size = int(net.input_size)
    x = torch.zeros(1, int(net.in_channels), size, size, device=meta)
    t = torch.full((1,), 0.5, device=meta)
    y = torch.zeros(1, dtype=torch.long, device=meta)
    counter = FlopCounterMode(display=False)
    compiled = getattr(net, "_compiled_call_impl", None)  # nn.Module.compile(): count the eager forward
    net._compiled_call_impl = None
    try:
        # The math SDPA backend is attention as matmuls the counter sees (meta takes that path anyway).
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
            torch.func.functional_call(net, tensors, (x, t, y))
    finally:
        net._compiled_call_impl = compiled
    return int(counter.get_total_flops())
