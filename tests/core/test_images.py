"""The one uint8 <-> [-1, 1] convention (dip_lightning.core.images)."""

from __future__ import annotations

import torch

from dip_lightning.core.images import to_model_range, to_uint8


def test_to_uint8_rounding() -> None:
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 1 / 255, 0.5, 1.0, 3.0]).view(1, 1, 1, -1)
    out = to_uint8(x).flatten().tolist()
    assert out == [0, 0, 0, 128, 128, 191, 255, 255]
    # Round-to-nearest of 127.5 (x + 1) (ties, measure zero here, go up).
    sweep = torch.rand(10_000, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 2 - 1
    expected = torch.floor(127.5 * (sweep + 1) + 0.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(to_uint8(sweep.view(1, 1, 1, -1)).flatten(), expected)
    assert to_uint8(torch.zeros(2, 3, 4, 4)).shape == (2, 3, 4, 4)


def test_every_uint8_value_survives_the_round_trip() -> None:
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    x = to_model_range(values)
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), values)
    # bf16 sampling output (autocast) converts through float32 the same way.
    assert torch.equal(to_uint8(x.bfloat16()), to_uint8(x.bfloat16().float()))
