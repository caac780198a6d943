"""The dense-matmul form of the Patch Detailer Head's small 3x3 convolutions computes the same function.

Float64 checks are exact up to rounding; the bf16 check bounds the error of the optimised path under the
autocast used for training and sampling by the error the plain convolution itself has there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip_lightning.core.models import DiP, PatchDetailerHead
from dip_lightning.core.models.dense_conv import conv3x3_taps, dense_conv3x3, dense_conv3x3_weight

torch.set_num_threads(1)


def test_taps_link_each_output_pixel_to_its_3x3_neighbourhood():
    taps = conv3x3_taps(2)
    # On a 2x2 map every output pixel sees every input pixel through exactly one tap.
    assert torch.equal(taps.sum(-1), torch.ones(4, 4))
    # Pixel (0, 0) sees (1, 1) through the bottom-right tap (index 8) and itself through the centre (4).
    assert taps[0, 3, 8] == 1 and taps[0, 0, 4] == 1
    # 4x4: 100 of 144 taps in the interior rows/cols land inside (10 per axis of 12), i.e. 6.25 per pixel.
    assert conv3x3_taps(4).sum() == 100


@pytest.mark.parametrize("side", [1, 2, 3, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_conv_equals_conv_values_and_gradients(side, channels_last):
    torch.manual_seed(side)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1).double()
    x = torch.randn(6, 5, side, side, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_(True)
    x_new = x.detach().clone().requires_grad_(True)
    ref = conv(x_ref)
    grads_ref = torch.autograd.grad(ref.sin().sum(), [x_ref, conv.weight, conv.bias])
    out = dense_conv3x3(x_new, conv, conv3x3_taps(side).double())
    assert out.is_contiguous(memory_format=torch.channels_last)
    grads_new = torch.autograd.grad(out.sin().sum(), [x_new, conv.weight, conv.bias])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g_new, g_ref in zip(grads_new, grads_ref):
        torch.testing.assert_close(g_new, g_ref, rtol=1e-12, atol=1e-12)


def test_dense_weight_is_the_convolution_matrix():
    # Column j of the dense matrix is the convolution of the j-th unit input (NHWC order).
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    side = 3
    dense = dense_conv3x3_weight(conv.weight, conv3x3_taps(side).double())
    eye = torch.eye(side * side * 2, dtype=torch.float64).view(-1, side, side, 2).permute(0, 3, 1, 2)
    columns = conv(eye).permute(0, 2, 3, 1).reshape(side * side * 2, -1).T
    torch.testing.assert_close(dense, columns, rtol=0, atol=1e-14)


def test_dense_conv_rejects_other_convolutions():
    taps = conv3x3_taps(2)
    with pytest.raises(ValueError, match="3x3/stride 1/padding 1"):
        dense_conv3x3(torch.randn(1, 4, 2, 2), torch.nn.Conv2d(4, 4, 3, padding=0), taps)
    with pytest.raises(ValueError, match="on a 2x2 map"):
        dense_conv3x3(torch.randn(1, 4, 4, 4), torch.nn.Conv2d(4, 4, 3, padding=1), taps)


def _head_grads(head: PatchDetailerHead, patches, tokens, channels_last: bool = False):
    head.zero_grad(set_to_none=True)
    out = head.unet(patches, tokens, channels_last=channels_last)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in head.named_parameters()}


@pytest.mark.parametrize("dense_conv_side", [2, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_head_with_dense_stages_is_the_same_function(dense_conv_side, channels_last):
    # Paper-width head (6.97M parameters) at P=16: output and every parameter's gradient must agree. The
    # gradients of the deep (2x2/4x4) stages are what the dense path changes, so they are compared one by one
    # (the output alone barely depends on the deep stages at the released init).
    torch.manual_seed(0)
    ref = PatchDetailerHead(96, 16, 3).double()
    head = PatchDetailerHead(96, 16, 3, dense_conv_side=dense_conv_side).double()
    assert head.state_dict().keys() == ref.state_dict().keys()  # tap tables are not in checkpoints
    head.load_state_dict(ref.state_dict())
    patches = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    tokens = torch.randn(5, 96, dtype=torch.float64)
    out_ref, grads_ref = _head_grads(ref, patches, tokens)
    out, grads = _head_grads(head, patches, tokens, channels_last)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-13, msg=name)
    assert grads["enc.3.0.weight"].abs().max() > 0  # the deepest stage is really exercised


def test_dense_head_under_bf16_autocast_is_within_bf16_tolerance():
    torch.manual_seed(0)
    ref = PatchDetailerHead(96, 16, 3, base_channels=32)
    head = PatchDetailerHead(96, 16, 3, base_channels=32, dense_conv_side=4)
    head.load_state_dict(ref.state_dict())
    patches, tokens = torch.randn(16, 3, 16, 16), torch.randn(16, 96)
    with torch.no_grad():
        exact = ref.double().unet(patches.double(), tokens.double()).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = ref.float().unet(patches, tokens).float()
            dense = head.unet(patches, tokens, channels_last=True).float()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # The dense path is as close to the float64 result as bf16 convolutions are (and both are bf16-close).
    assert rel(dense, exact) < 2e-2
    assert rel(dense, exact) < 2 * rel(plain, exact) + 1e-3


def test_dense_head_trains_inside_dip_and_loads_plain_checkpoints():
    torch.manual_seed(0)
    kw = dict(input_size=32, patch_size=16, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    plain = DiP(**kw, head=lambda d, p, c: PatchDetailerHead(d, p, c, base_channels=8))
    fast = DiP(**kw, head=lambda d, p, c: PatchDetailerHead(d, p, c, base_channels=8, dense_conv_side=4))
    fast.load_state_dict(plain.state_dict())  # strict: same keys
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    torch.testing.assert_close(fast(x, t, y), plain(x, t, y), rtol=1e-5, atol=1e-6)
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    F.mse_loss(fast(x, t, y), x).backward()
    before = fast.head.enc[2][0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, fast.head.enc[2][0].weight)


@pytest.mark.parametrize("side", [-1, 8])
def test_dense_side_out_of_range_is_rejected(side):
    with pytest.raises(ValueError, match="dense_conv_side must be 0..4"):
        PatchDetailerHead(64, 16, 3, dense_conv_side=side)
