"""Autoguidance in the one guidance function: ``v_guide + w (v_main - v_guide)`` with real (tiny) DiP networks,
the guidance interval as for CFG, and the fit check of a guide."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from dip_lightning.core.diffusion import EulerSampler, FlowMatching, HeunSampler, check_guide, guided_velocity
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.models import DiP
from dip_lightning.core.models.heads import PatchDetailerHead


def tiny_dip(
    seed: int, input_size: int = 16, patch_size: int = 8, num_classes: int = 4, depth: int = 1
) -> DiP:
    torch.manual_seed(seed)
    return DiP(
        input_size=input_size,
        patch_size=patch_size,
        hidden_size=32,
        depth=depth,
        num_heads=2,
        num_classes=num_classes,
        head=partial(PatchDetailerHead, depth=2, base_channels=4),
    ).eval()


class Model(torch.nn.Module):
    """What a guide or a main model offers the samplers and the check: ``net`` and ``flow``."""

    def __init__(self, net: DiP, noise_scale: float = 1.0) -> None:
        super().__init__()
        self.net, self.flow = net, FlowMatching(noise_scale=noise_scale)


class Recorded:
    """A network's forward, recording the times it is called at."""

    def __init__(self, net: DiP) -> None:
        self.net, self.times = net, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.times.append(round(float(t[0]), 6))
        return self.net(x, t, y)


@pytest.fixture(scope="module")
def nets() -> tuple[DiP, DiP]:
    return tiny_dip(0, depth=2), tiny_dip(1)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 16, 16, generator=g), torch.full((3,), 0.4), torch.tensor([0, 2, 3])


@torch.no_grad()
def test_weight_one_is_the_main_model_and_zero_the_guide(nets, inputs) -> None:
    main, guide = nets
    x, t, y = inputs
    v_main, v_guide = main(x, t, y), guide(x, t, y)
    assert not torch.allclose(v_main, v_guide)  # two different networks, or the test says nothing
    recorded = Recorded(guide)
    assert torch.equal(guided_velocity(main, x, t, y, 4, 1.0, recorded), v_main)
    assert recorded.times == []  # w = 1: the guide is not even called
    assert torch.equal(guided_velocity(main, x, t, y, 4, 0.0, guide), v_guide)
    w = 2.5
    expected = v_guide + w * (v_main - v_guide)
    assert torch.allclose(guided_velocity(main, x, t, y, 4, w, guide), expected, atol=1e-6)
    # The guide takes the labels (no null class): not what CFG computes.
    assert not torch.allclose(guided_velocity(main, x, t, y, 4, w), expected)


@torch.no_grad()
def test_samplers_at_weight_one_and_zero(nets) -> None:
    main, guide = nets
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([1, 3])
    for cls in (EulerSampler, HeunSampler):
        alone = cls(num_steps=4).sample(main, noise, y, 4)
        assert torch.equal(cls(num_steps=4, cfg_scale=1.0).sample(main, noise, y, 4, guide_fn=guide), alone)
        # w = 0 on every step (interval (-1, 2)): the guide alone.
        everywhere = cls(num_steps=4, cfg_scale=0.0, cfg_interval=(-1.0, 2.0))
        guide_alone = cls(num_steps=4).sample(guide, noise, y, 4)
        assert torch.equal(everywhere.sample(main, noise, y, 4, guide_fn=guide), guide_alone)


@torch.no_grad()
def test_the_guide_runs_only_inside_the_interval(nets) -> None:
    main, guide = nets
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    sampler = EulerSampler(num_steps=5, cfg_scale=2.0, cfg_interval=(0.3, 0.7))
    main_calls, guide_calls = Recorded(main), Recorded(guide)
    guided = sampler.sample(main_calls, noise, torch.tensor([0, 1]), 4, guide_fn=guide_calls)
    assert main_calls.times == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert guide_calls.times == [0.4, 0.6]  # t = 0.2 and 0.8 lie outside (0.3, 0.7): the main model alone
    assert sampler.nfe() == 7  # a guided evaluation counts 2 (main + guide), as CFG's cond + uncond
    assert not torch.equal(guided, sampler.sample(main, noise, torch.tensor([0, 1]), 4))  # CFG differs


@pytest.mark.parametrize(
    ("other", "named"),
    [
        ({"input_size": 32}, "image size 32 (the model's: 16)"),
        ({"patch_size": 4}, "patch size 4 (the model's: 8)"),
        ({"num_classes": 10}, "class count 10 (the model's: 4)"),
        ({"noise_scale": 2.0}, "noise scale 2.0 (the model's: 1.0)"),
    ],
)
def test_a_guide_of_another_kind_is_refused(other: dict, named: str) -> None:
    main = Model(tiny_dip(0))
    noise_scale = other.pop("noise_scale", 1.0)
    guide = Model(tiny_dip(2, **other), noise_scale)
    check_guide(main, Model(tiny_dip(1, depth=2)), "small.ckpt")  # another depth is what a guide may be
    with pytest.raises(ConfigError, match="guide small.ckpt does not fit the model") as caught:
        check_guide(main, guide, "small.ckpt")
    assert named in str(caught.value)
