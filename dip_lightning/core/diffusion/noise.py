"""The noise of sampling and training: per-sample seeded streams, so an image depends only on its seed.

:func:`make_noise` draws each sample's initial noise from its own CPU generator and
:func:`seeded_noise_sampler` the fresh noise of stochastic samplers the same way: an image is the same whatever
the batch, rank or device it is generated on. :func:`draw_normal` / :func:`draw_uniform` are ``torch.randn`` /
``torch.rand`` with a generator that may live on another device than the output (training draws).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dip_lightning.core.seeding import mix_seed

__all__ = ["NoiseSampler", "draw_normal", "draw_uniform", "make_noise", "seeded_noise_sampler"]

#: ``noise_sampler(like) -> N(0, I)`` of ``like``'s shape, dtype and device: the fresh noise of an SDE step.
NoiseSampler = Callable[[Tensor], Tensor]
_SDE_STREAM = 0x5DE  # separates the SDE's per-sample noise stream from the initial noise of the same seed


def draw_normal(
    shape: Sequence[int], device: torch.device | str | None, dtype: torch.dtype, generator: Any
) -> Tensor:
    """``torch.randn`` accepting a generator on another device than the output (draws on the generator's)."""
    if generator is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    out = torch.randn(*shape, device=generator.device, dtype=dtype, generator=generator)
    return out.to(device) if device is not None else out


def draw_uniform(shape: Sequence[int], device: torch.device | str | None, generator: Any) -> Tensor:
    """``torch.rand`` accepting a generator on another device than the output, as :func:`draw_normal`."""
    if generator is None:
        return torch.rand(*shape, device=device)
    out = torch.rand(*shape, device=generator.device, generator=generator)
    return out.to(device) if device is not None else out


def make_noise(
    seeds: Sequence[int] | Tensor,
    shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial noise (len(seeds), *shape); sample ``i`` comes from its own generator seeded with ``seeds[i]``.

    Noise is drawn on the CPU and then moved, so a (label, seed) pair gives the same starting point whatever
    the batch it lands in, its position in that batch, the number of ranks, or the device.
    """
    seed_list = [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]
    noise = [
        torch.randn(*shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32)
        for s in seed_list
    ]
    if not noise:
        return torch.empty(0, *shape, device=device, dtype=dtype)
    return torch.stack(noise).to(device=device, dtype=dtype)


def seeded_noise_sampler(seeds: Sequence[int] | Tensor) -> NoiseSampler:
    """Fresh noise for stochastic samplers, sample ``i`` from its own CPU generator seeded by ``seeds[i]``.

    As :func:`make_noise`: an image depends only on its (label, seed), not on its batch, rank or device. Each
    call draws the next block of every sample's stream.
    """
    seed_list = [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]
    generators = [torch.Generator().manual_seed(mix_seed(s, _SDE_STREAM)) for s in seed_list]

    def draw(like: Tensor) -> Tensor:
        if like.shape[0] != len(generators):
            raise ValueError(
                f"noise for {like.shape[0]} samples asked of a sampler seeded for {len(generators)}"
            )
        noise = [torch.randn(*like.shape[1:], generator=g, dtype=torch.float32) for g in generators]
        return torch.stack(noise).to(device=like.device, dtype=like.dtype)

    return draw
