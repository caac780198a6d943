"""3x3 convolutions on tiny feature maps computed as one dense matrix multiply (exact, same parameters).

Why: the Patch Detailer Head runs its deepest stages on 2x2 (and 4x4) maps of each 16x16 patch, over
B x 256 patches at once. A zero-padded 3x3 convolution on a 2x2 map is a dense linear map from the 4 input
pixels to the 4 output pixels (every output pixel sees every input pixel), yet an implicit-GEMM convolution
multiplies all 9 taps, 5 of which hit padding: 36 C_in C_out MACs per patch where 16 are useful. Written as
``flatten(NHWC) @ W_dense`` it is one large GEMM (M = patches, K = 4 C_in, N = 4 C_out) doing only the useful
work. On 4x4 maps the dense form does 16/9 of the convolution's nominal work, so it only pays if the GEMM runs
much faster than the convolution; that is for the GPU benchmark to say (``bench/gpu.py``, section head).

The dense matrix is rebuilt from the convolution's own weight in every forward (a one-hot tap tensor times the
weight), so parameters, gradients, checkpoints and the released-weight converter are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3_taps(side: int) -> Tensor:
    """One-hot (side², side², 9) tensor: ``taps[o, p, k] = 1`` where tap k of a padded 3x3 conv links input
    pixel p to output pixel o (pixels in row-major order, taps as in ``weight.flatten(2)``)."""
    taps = torch.zeros(side * side, side * side, 9)
    for oy in range(side):
        for ox in range(side):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    iy, ix = oy + dy, ox + dx
                    if 0 <= iy < side and 0 <= ix < side:
                        taps[oy * side + ox, iy * side + ix, (dy + 1) * 3 + (dx + 1)] = 1.0
    return taps


def dense_conv3x3_weight(weight: Tensor, taps: Tensor) -> Tensor:
    """The (side² C_out, side² C_in) matrix of a padded 3x3 convolution on a side x side map.

    Rows are ordered (output pixel, output channel) and columns (input pixel, input channel): the NHWC
    flattening, which is a free view of a channels_last tensor.
    """
    c_out, c_in = weight.shape[:2]
    n = taps.shape[0]
    dense = torch.einsum("opk,abk->oapb", taps.to(weight.dtype), weight.flatten(2))
    return dense.reshape(n * c_out, n * c_in)


def dense_conv3x3(x: Tensor, conv: nn.Conv2d, taps: Tensor) -> Tensor:
    """``conv(x)`` for a 3x3, stride 1, padding 1 ``conv`` on a small square map, as one matrix multiply.

    x: (N, C_in, s, s) in any memory format; returns (N, C_out, s, s) in channels_last strides.
    """
    n, c_in, h, w = x.shape
    side = int(round(taps.shape[0] ** 0.5))
    if (
        (h, w) != (side, side)
        or conv.kernel_size != (3, 3)
        or conv.padding != (1, 1)
        or conv.stride != (1, 1)
    ):
        raise ValueError(
            f"dense_conv3x3 needs a 3x3/stride 1/padding 1 conv on a {side}x{side} map, got "
            f"kernel {conv.kernel_size}, padding {conv.padding}, stride {conv.stride} on {h}x{w}"
        )
    x_flat = x.permute(0, 2, 3, 1).reshape(n, h * w * c_in)
    bias = conv.bias.repeat(h * w) if conv.bias is not None else None
    y = F.linear(x_flat, dense_conv3x3_weight(conv.weight, taps), bias)
    return y.view(n, h, w, conv.out_channels).permute(0, 3, 1, 2)
