"""Forward FLOPs counted on meta tensors: the same count as a real forward, at no cost, the network untouched."""

from __future__ import annotations

import torch

from dip_lightning.core.models import create_model, model_summary
from dip_lightning.core.models.flops import forward_flops_per_image


def tiny_dip() -> torch.nn.Module:
    return create_model("DiP-S/16", input_size=32, depth=2, num_classes=4)  # 4 tokens of 16x16


def test_meta_count_equals_a_real_forward_count() -> None:
    net = tiny_dip()
    # model_summary runs a real CPU forward under the flop counter (math attention); MACs = FLOPs / 2.
    real = model_summary(net)["gmacs_total"] * 2e9
    assert forward_flops_per_image(net) == round(real)


def test_count_leaves_the_network_as_it_was() -> None:
    net = tiny_dip()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    forward_flops_per_image(net)
    after = net.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())


def test_a_network_compiled_in_place_is_counted_through_its_eager_forward() -> None:
    net = tiny_dip()
    eager = forward_flops_per_image(net)
    net.compile()  # lazy: nothing is compiled until a call
    compiled_call = net._compiled_call_impl
    assert forward_flops_per_image(net) == eager
    assert net._compiled_call_impl is compiled_call
