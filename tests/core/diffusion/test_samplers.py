"""The samplers beyond Euler: SDE (the release's step functions), Heun's released guidance rule, Adams-Bashforth.

Each is checked against its limit: the SDE at zero diffusion is Euler bit for bit and at full strength keeps the
data distribution of an exactly known Gaussian flow; the multistep solver converges to the many-step Euler
solution at second order; Heun's released rule guides the evaluations the release guides.
"""

from __future__ import annotations

import math

import pytest
import torch

from dip_lightning.core.diffusion import (
    SAMPLERS,
    EulerSampler,
    HeunSampler,
    MultistepSampler,
    ODESampler,
    SDESampler,
    make_noise,
    score_from_velocity,
    seeded_noise_sampler,
)

torch.set_num_threads(1)
NULL = 10


class RecordingField:
    """A smooth nonlinear, label-dependent velocity field that records (batch size, t) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], round(t[0].item(), 6)))
        te = t.view(-1, 1, 1, 1).to(x.dtype)
        offset = (y.to(x.dtype) / NULL).view(-1, 1, 1, 1)
        return torch.sin(3 * te) * torch.cos(x) - x * te + offset


def gaussian_velocity(mean: float, std: float):  # noqa: ANN201
    """The exact velocity ``E[x - eps | x_t]`` when every element of the data is N(mean, std^2)."""

    def field(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        te = t.view(-1, 1, 1, 1).to(x_t.dtype)
        var = te**2 * std**2 + (1 - te) ** 2
        return mean + (te * std**2 - (1 - te)) / var * (x_t - te * mean)

    return field


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NULL


@pytest.mark.parametrize("guided", [False, True])
def test_sde_at_zero_diffusion_is_euler_bit_for_bit(guided: bool) -> None:
    noise = make_noise(range(4), (3, 4, 4), dtype=torch.float64)
    common = {"num_steps": 12, "cfg_scale": 3.0 if guided else 1.0, "cfg_interval": (0.2, 0.8)}
    euler = EulerSampler(**common).sample(RecordingField(), noise, _labels(4), NULL)
    for sde in (SDESampler(w_scale=0.0, **common), SDESampler(step_fn="ode", **common)):
        out = sde.sample(RecordingField(), noise, _labels(4), NULL, seeded_noise_sampler(range(4)))
        assert torch.equal(out, euler)
    assert SDESampler(**common).nfe() == EulerSampler(**common).nfe()


def test_score_from_velocity_is_minus_eps_over_sigma() -> None:
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g)
    for t in (0.0, 0.3, 0.9):
        x_t = t * x + (1 - t) * eps.double()
        torch.testing.assert_close(score_from_velocity(x - eps, x_t, t), -eps.double() / (1 - t))


@pytest.mark.parametrize(
    ("step_fn", "w_schedule"), [("sde", "linear"), ("sde_preserve", "linear"), ("sde", "constant")]
)
def test_sde_keeps_the_data_distribution_of_an_exact_gaussian_flow(step_fn: str, w_schedule: str) -> None:
    """With the exact velocity, the SDE's Langevin part leaves every marginal unchanged: samples end N(m, s^2)."""
    mean, std, n = 0.5, 0.3, 16  # 16 samples of 16 x 16 independent elements
    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sampler = SDESampler(num_steps=400, step_fn=step_fn, w_schedule=w_schedule)
    out = sampler.sample(
        gaussian_velocity(mean, std), noise, _labels(n), NULL, seeded_noise_sampler(range(n))
    )
    assert abs(out.mean().item() - mean) < 4 * std / math.sqrt(out.numel())
    assert abs(out.std().item() - std) < 0.02
    # The noise really acts: the same start without diffusion ends elsewhere.
    ode = EulerSampler(num_steps=400).sample(gaussian_velocity(mean, std), noise, _labels(n), NULL)
    assert (out - ode).abs().mean().item() > 0.05


def test_sde_images_depend_only_on_their_seed() -> None:
    seeds = [11, 12, 13]
    noise = make_noise(seeds, (3, 4, 4))
    sampler = SDESampler(num_steps=8)
    together = sampler.sample(RecordingField(), noise, _labels(3), NULL, seeded_noise_sampler(seeds))
    alone = sampler.sample(
        RecordingField(), noise[1:2], _labels(3)[1:2], NULL, seeded_noise_sampler(seeds[1:2])
    )
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-6)
    again = sampler.sample(RecordingField(), noise, _labels(3), NULL, seeded_noise_sampler(seeds))
    assert torch.equal(together, again)
    other = sampler.sample(RecordingField(), noise, _labels(3), NULL, seeded_noise_sampler([1, 2, 3]))
    assert not torch.allclose(together, other)


def test_multistep_converges_to_many_step_euler_at_second_order() -> None:
    noise = make_noise(range(3), (2, 4, 4), dtype=torch.float64)
    y = _labels(3)
    reference = EulerSampler(num_steps=20_000, time_grid="uniform").sample(RecordingField(), noise, y, NULL)

    def error(sampler: ODESampler) -> float:
        return (sampler.sample(RecordingField(), noise, y, NULL) - reference).abs().max().item()

    euler, ab2 = {}, {}
    for steps in (10, 20, 40):
        euler[steps] = error(EulerSampler(num_steps=steps, time_grid="uniform"))
        ab2[steps] = error(MultistepSampler(num_steps=steps, time_grid="uniform"))
    assert ab2[20] < euler[20] / 5  # far closer at the same evaluations
    assert ab2[20] / ab2[40] > 3.0 and euler[20] / euler[40] < 2.5  # order 2 vs order 1
    # Order 1 is Euler; a shifted grid (variable steps) converges too.
    noise_y = (noise, y, NULL)
    assert torch.equal(
        MultistepSampler(num_steps=10, order=1).sample(RecordingField(), *noise_y),
        EulerSampler(num_steps=10).sample(RecordingField(), *noise_y),
    )
    shifted = error(MultistepSampler(num_steps=40, time_grid="uniform", time_shift=2.0))
    assert shifted < euler[40]
    field = RecordingField()
    MultistepSampler(num_steps=10).sample(field, *noise_y)
    assert len(field.calls) == MultistepSampler(num_steps=10).nfe() == 10


def test_heun_released_guidance_rule_decides_by_the_step_start_with_the_top_included() -> None:
    noise = make_noise([3], (1, 2, 2), dtype=torch.float64)
    y = torch.tensor([4])
    common = {"num_steps": 10, "cfg_scale": 2.0, "cfg_interval": (0.25, 0.7), "time_grid": "uniform"}
    guided_times = {}
    for rule in ("per_evaluation", "released"):
        field = RecordingField()
        sampler = HeunSampler(guidance_rule=rule, **common)
        sampler.sample(field, noise, y, NULL)
        guided_times[rule] = [t for b, t in field.calls if b == 2]
        assert sum(b for b, _ in field.calls) == sampler.nfe()
        assert [(t, b == 2) for b, t in field.calls] == [(round(t, 6), g) for t, g in sampler.evaluations()]
    # Per evaluation: each time inside (0.25, 0.7), the bound 0.7 excluded.
    assert guided_times["per_evaluation"] == [0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.6]
    # Released: steps starting at 0.3 ... 0.7 (0.7 <= t_max) are guided at both ends; the step from 0.2 is not.
    assert guided_times["released"] == [0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8]
    with pytest.raises(ValueError, match="guidance_rule"):
        HeunSampler(guidance_rule="start")


def test_every_sampler_is_built_from_yaml_by_class_path() -> None:
    from jsonargparse import ArgumentParser

    import dip_lightning.training.module  # noqa: F401  (enables sampler subclasses, as the CLI does)

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--sampler", type=ODESampler)
    for name, cls in SAMPLERS.items():
        extra = {"sde": "w_schedule: constant", "heun": "guidance_rule: released", "multistep": "order: 2"}
        init = "{num_steps: 7" + (f", {extra[name]}" if name in extra else "") + "}"
        cfg = parser.parse_string(
            f"sampler:\n  class_path: {cls.__module__}.{cls.__name__}\n  init_args: {init}\n"
        )
        built = parser.instantiate(cfg).sampler
        assert type(built) is cls and built.num_steps == 7


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_samples_an_x_prediction_network(name: str) -> None:
    """The module converts any prediction to the velocity before the sampler sees it (one place)."""
    from dip_lightning.core.diffusion import FlowMatching

    x1 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))

    def x_oracle(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x1.expand_as(x)  # single-point data: the clean image is known everywhere

    sampler = SAMPLERS[name](num_steps=20)
    noise = make_noise([1, 2], (3, 4, 4))
    out = sampler.sample(
        FlowMatching(prediction="x", t_eps=1e-3).velocity_model(x_oracle),
        noise,
        _labels(2),
        NULL,
        seeded_noise_sampler([1, 2]),
    )
    torch.testing.assert_close(out, x1, atol=2e-3, rtol=0)
