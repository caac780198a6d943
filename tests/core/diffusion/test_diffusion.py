"""Flow-matching objective, time grids, ODE samplers and interval CFG (dip_lightning.core.diffusion)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dip_lightning.core.diffusion import (
    EulerSampler,
    FlowMatching,
    HeunSampler,
    ODESampler,
    make_noise,
    shift_time,
)

torch.set_num_threads(1)
NULL = 10  # null class of the toy problems


# ---------------------------------------------------------------------------------------------- flow matching
def test_interpolant_endpoints_and_target() -> None:
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    fm = FlowMatching()
    assert torch.equal(fm.interpolate(x, eps, torch.zeros(4)), eps)  # t = 0 is noise
    assert torch.equal(fm.interpolate(x, eps, torch.ones(4)), x)  # t = 1 is data
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = fm.interpolate(x, eps, t)
    for i in range(4):
        torch.testing.assert_close(x_t[i], t[i] * x[i] + (1 - t[i]) * eps[i])
    assert torch.equal(fm.target(x, eps), x - eps)
    # The target is the time derivative of the interpolant.
    h = 1e-3
    t0 = torch.full((4,), 0.3, dtype=torch.float64)
    xd, ed = x.double(), eps.double()
    deriv = (fm.interpolate(xd, ed, t0 + h) - fm.interpolate(xd, ed, t0 - h)) / (2 * h)
    torch.testing.assert_close(deriv, fm.target(xd, ed))


def test_default_loss_is_plain_mse_on_the_velocity() -> None:
    g = torch.Generator().manual_seed(1)
    x, eps, v = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    fm = FlowMatching()
    t = torch.rand(2, generator=g)
    x_t, target = fm.interpolate(x, eps, t), fm.target(x, eps)
    expected = ((v - (x - eps)) ** 2).mean()
    torch.testing.assert_close(fm.prediction_loss(v, x_t, t, target), expected)
    assert fm.prediction_loss(x - eps, x_t, t, target).item() == 0.0


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (-0.4, 0.7)])
def test_logit_normal_time_statistics(mean: float, std: float) -> None:
    fm = FlowMatching(t_mean=mean, t_std=std)
    t = fm.sample_t(200_000, generator=torch.Generator().manual_seed(2))
    assert t.dtype == torch.float32 and t.shape == (200_000,)
    assert t.min().item() > 0.0 and t.max().item() < 1.0
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - mean) < 0.01
    assert abs(logit.std().item() - std) < 0.01


def test_time_shift_formula_and_direction() -> None:
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = 3.0
    shifted = shift_time(t, s)
    torch.testing.assert_close(shifted, t / (t + s * (1 - t)))
    assert shifted[0] == 0 and shifted[-1] == 1
    assert torch.all(shifted[1:-1] < t[1:-1])  # s > 1: noisier (t = 0 is noise)
    inner = slice(1, -1)  # SNR divided by s^2 <=> t/(1-t) divided by s
    torch.testing.assert_close(shifted[inner] / (1 - shifted[inner]), t[inner] / (1 - t[inner]) / s)
    # Training times are shifted with the same formula.
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        FlowMatching(time_shift=s).sample_t(100, generator=g0),
        shift_time(FlowMatching().sample_t(100, generator=g1), s),
    )


def test_label_dropout_rate_and_null_class() -> None:
    y = torch.randint(0, 10, (100_000,), generator=torch.Generator().manual_seed(4))
    out = FlowMatching(label_dropout=0.1).drop_labels(
        y, null_class=NULL, generator=torch.Generator().manual_seed(5)
    )
    dropped = out != y
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    assert torch.all(out[dropped] == NULL)
    assert torch.equal(FlowMatching(label_dropout=0.0).drop_labels(y, NULL), y)


def test_training_inputs_are_consistent_and_seeded() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    fm = FlowMatching()
    x_t, t, y_in, target = fm.training_inputs(x, y, NULL, generator=torch.Generator().manual_seed(7))
    eps = x - target
    torch.testing.assert_close(x_t, fm.interpolate(x, eps, t))
    assert t.shape == (8,) and y_in.shape == y.shape
    again = fm.training_inputs(x, y, NULL, generator=torch.Generator().manual_seed(7))
    for a, b in zip((x_t, t, y_in, target), again):
        assert torch.equal(a, b)


def test_flow_matching_config_roundtrip() -> None:
    fm = FlowMatching(
        t_mean=-0.2,
        t_std=0.8,
        time_shift=2.0,
        label_dropout=0.2,
        prediction="x",
        loss_weight="snr",
        noise_scale=2.0,
    )
    other = FlowMatching(**fm.config())
    assert (
        other.config()
        == fm.config()
        == {
            "t_mean": -0.2,
            "t_std": 0.8,
            "time_shift": 2.0,
            "label_dropout": 0.2,
            "prediction": "x",
            "loss_space": "v",
            "t_eps": 0.05,
            "loss_weight": "snr",
            "snr_threshold": 5.0,
            "time_sampling": "logit_normal",
            "noise_scale": 2.0,
        }
    )


# ------------------------------------------------------------------------------------------------ time grids
def test_released_time_grid() -> None:
    grid = EulerSampler(num_steps=100).timesteps()
    assert len(grid) == 101 and grid[0] == 0.0 and grid[-1] == 1.0
    assert abs(grid[-2].item() - 0.99) < 1e-6
    torch.testing.assert_close(grid.diff(), torch.full((100,), 0.01, dtype=torch.float64), atol=1e-6, rtol=0)
    # The release's float32 construction, bit for bit.
    ref = torch.cat([torch.linspace(0.0, 0.99, 100), torch.ones(1)])
    assert torch.equal(grid.float(), ref)
    # At 75 steps the released default last_step (1/75) gives the uniform grid as well.
    g75 = EulerSampler(num_steps=75).timesteps()
    torch.testing.assert_close(g75, torch.linspace(0, 1, 76, dtype=torch.float64), atol=1e-6, rtol=0)
    # last_step=0.01: linspace(0, 0.99, n) + [1.0] at any n.
    g50 = EulerSampler(num_steps=50, last_step=0.01).timesteps()
    assert len(g50) == 51 and abs(g50[-2].item() - 0.99) < 1e-6 and g50[-1] == 1.0


def test_uniform_time_grid_and_shift() -> None:
    grid = EulerSampler(num_steps=8, time_grid="uniform").timesteps()
    assert torch.equal(grid, torch.linspace(0, 1, 9, dtype=torch.float64))
    shifted = EulerSampler(num_steps=8, time_grid="uniform", time_shift=2.0).timesteps()
    torch.testing.assert_close(shifted, shift_time(grid, 2.0))
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted.diff() > 0)
    with pytest.raises(ValueError):
        EulerSampler(time_grid="uniform", last_step=0.01)


# ----------------------------------------------------------------------------------------------- ODE accuracy
def straight_flow(x1: torch.Tensor):
    """Flow-matching velocity towards one data point, (x1 - x) / (1 - t): its ODE paths are straight lines."""

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = x1.repeat(x.shape[0] // x1.shape[0], 1, 1, 1)  # also under CFG's doubled batch
        return (target - x) / (1 - t).view(-1, 1, 1, 1)

    return model_fn


@pytest.mark.parametrize("sampler", [EulerSampler(num_steps=7), EulerSampler(num_steps=5, time_shift=3.0)])
def test_euler_is_exact_on_straight_flows(sampler: EulerSampler) -> None:
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x1 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    out = sampler.sample(straight_flow(x1), x0, torch.zeros(3, dtype=torch.long), NULL)
    torch.testing.assert_close(out, x1, atol=1e-10, rtol=0)
    # Constant field v = x1 - x0: exact too, any grid.
    out = sampler.sample(lambda x, t, y: x1 - x0, x0, torch.zeros(3, dtype=torch.long), NULL)
    torch.testing.assert_close(out, x1, atol=1e-10, rtol=0)


def linear_ode_error(sampler: ODESampler) -> float:
    """dx/dt = (a + b t) x from x(0) = 1: x(1) = exp(a + b / 2)."""
    a, b = -1.5, 2.0
    x0 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out = sampler.sample(
        lambda x, t, y: (a + b * t).view(-1, 1, 1, 1) * x, x0, torch.zeros(1, dtype=torch.long), 0
    )
    return abs(out.item() - math.exp(a + b / 2))


def test_heun_second_order_euler_first_order() -> None:
    heun = [linear_ode_error(HeunSampler(num_steps=n, time_grid="uniform")) for n in (16, 32, 64)]
    euler = [linear_ode_error(EulerSampler(num_steps=n, time_grid="uniform")) for n in (16, 32, 64)]
    for coarse, fine in zip(heun[:-1], heun[1:]):
        assert 3.5 < coarse / fine < 4.5
    for coarse, fine in zip(euler[:-1], euler[1:]):
        assert 1.8 < coarse / fine < 2.2
    assert heun[-1] < euler[-1] / 50


def test_samplers_are_deterministic() -> None:
    x1 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    noise = make_noise([1, 2], (3, 4, 4))
    y = torch.tensor([1, 2])
    for sampler in (EulerSampler(num_steps=6, cfg_scale=2.0), HeunSampler(num_steps=6, cfg_scale=2.0)):
        a = sampler.sample(straight_flow(x1), noise, y, NULL)
        b = sampler.sample(straight_flow(x1), noise.clone(), y, NULL)
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ CFG
class ToyModel:
    """v(x, t, y) = -x + offset[y] * (1 + t); records the batch size and labels of every call."""

    def __init__(self) -> None:
        self.offsets = torch.linspace(-1.0, 1.0, NULL + 1, dtype=torch.float64)
        self.offsets[NULL] = 0.25  # the unconditional velocity differs from every class
        self.calls: list[tuple[int, float, list[int]]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert torch.all(t == t[0])
        self.calls.append((x.shape[0], t[0].item(), y.tolist()))
        return -x + (self.offsets[y] * (1 + t)).view(-1, 1, 1, 1)


def test_interval_cfg_matches_hand_computed_reference() -> None:
    w, interval, n = 2.9, (0.11, 0.97), 100
    sampler = EulerSampler(num_steps=n, cfg_scale=w, cfg_interval=interval)
    noise = make_noise([0, 1, 2], (1, 2, 2), dtype=torch.float64)
    y = torch.tensor([0, 3, 7])
    model = ToyModel()
    out = sampler.sample(model, noise, y, NULL)

    # Hand reference: grid i/100; guided exactly at t = 0.12 ... 0.96 (strict inequalities).
    ref = noise.clone()
    oc = model.offsets[y].view(-1, 1, 1, 1)
    ou = model.offsets[NULL]
    guided_steps = 0
    for i in range(n):
        t = i / n
        v_c, v_u = -ref + oc * (1 + t), -ref + ou * (1 + t)
        guided = 12 <= i <= 96
        guided_steps += guided
        ref = ref + (1 / n) * (v_u + w * (v_c - v_u) if guided else v_c)
    assert guided_steps == 85
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)

    # Outside the interval only the conditional branch runs (batch 3); inside, one forward on [cond; uncond].
    assert len(model.calls) == n
    for i, (batch, t, labels) in enumerate(model.calls):
        if 12 <= i <= 96:
            assert batch == 6 and labels == [0, 3, 7, NULL, NULL, NULL]
        else:
            assert batch == 3 and labels == [0, 3, 7], (i, t)
    assert sampler.nfe() == sum(b for b, _, _ in model.calls) // 3 == 15 + 2 * 85


def test_cfg_constant_field_closed_form() -> None:
    """v = c_y: the endpoint is noise + c_y * (unguided time) + guided velocity * (guided time)."""
    c = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)  # class 3 is the null class here

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return c[y].view(-1, 1).expand_as(x)

    x0 = torch.zeros(2, 1, dtype=torch.float64)
    y = torch.tensor([1, 2])
    w = 3.0
    out = EulerSampler(num_steps=10, cfg_scale=w, cfg_interval=(0.25, 0.75)).sample(model_fn, x0, y, 3)
    guided_time = 0.5  # steps starting at t = 0.3, 0.4, 0.5, 0.6, 0.7
    expected = c[y] * (1 - guided_time) + (c[3] + w * (c[y] - c[3])) * guided_time
    torch.testing.assert_close(out[:, 0], expected)


def test_no_guidance_never_computes_unconditional_branch() -> None:
    model = ToyModel()
    noise = make_noise([5, 6], (1, 2, 2), dtype=torch.float64)
    EulerSampler(num_steps=10, cfg_scale=1.0, cfg_interval=(-1.0, 2.0)).sample(
        model, noise, torch.tensor([1, 2]), NULL
    )
    assert [b for b, _, _ in model.calls] == [2] * 10
    # Default interval (0, 1): every step but t = 0 is guided (strict inequality, as released).
    model = ToyModel()
    sampler = EulerSampler(num_steps=10, cfg_scale=2.0)
    sampler.sample(model, noise, torch.tensor([1, 2]), NULL)
    assert [b for b, _, _ in model.calls] == [2] + [4] * 9
    assert sampler.nfe() == 19


def test_heun_guidance_per_evaluation_and_nfe() -> None:
    model = ToyModel()
    sampler = HeunSampler(num_steps=10, cfg_scale=2.0, cfg_interval=(0.25, 0.75), time_grid="uniform")
    noise = make_noise([3], (1, 2, 2), dtype=torch.float64)
    sampler.sample(model, noise, torch.tensor([4]), NULL)
    times = [round(t, 6) for _, t, _ in model.calls]
    assert len(times) == 2 * 10 - 1  # last step is Euler: the network is never called at t = 1
    assert 1.0 not in times
    for batch, t, _ in model.calls:
        assert batch == (2 if 0.25 < t < 0.75 else 1)
    assert sampler.nfe() == sum(b for b, _, _ in model.calls)
    assert times == [round(t, 6) for t in sampler.evaluation_times()]


def test_sampler_is_a_replaceable_dataclass() -> None:
    sampler = HeunSampler(num_steps=50, cfg_scale=2.9, cfg_interval=[0.11, 0.97])  # YAML lists become tuples
    assert sampler.cfg_interval == (0.11, 0.97)
    fast = dataclasses.replace(sampler, num_steps=10)
    assert isinstance(fast, HeunSampler) and fast.num_steps == 10 and fast.cfg_scale == 2.9
    with pytest.raises(ValueError):
        EulerSampler(cfg_interval=(0.9, 0.1))
    with pytest.raises(ValueError):
        EulerSampler(num_steps=0)


# ----------------------------------------------------------------------------------------------- noise, uint8
def test_noise_depends_only_on_the_seed() -> None:
    shape = (3, 8, 8)
    batch = make_noise([11, 12, 13], shape)
    assert batch.shape == (3, *shape) and batch.dtype == torch.float32
    reordered = make_noise(torch.tensor([13, 99, 11]), shape)
    assert torch.equal(reordered[0], batch[2]) and torch.equal(reordered[2], batch[0])
    assert torch.equal(make_noise([12], shape)[0], batch[1])
    assert not torch.equal(batch[0], batch[1])
    torch.manual_seed(0)
    a = make_noise([11], shape)
    torch.manual_seed(1)
    assert torch.equal(a, make_noise([11], shape))  # global RNG plays no part


def test_built_from_yaml_by_jsonargparse() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FlowMatching, "flow")
    parser.add_class_arguments(EulerSampler, "sampler")
    cfg = parser.parse_string(
        "flow: {t_mean: -0.5, time_shift: 2.0, prediction: x, time_sampling: uniform}\n"
        "sampler: {num_steps: 50, cfg_scale: 2.9, cfg_interval: [0.11, 0.97], time_grid: uniform}\n"
    )
    built = parser.instantiate(cfg)
    assert (
        built.flow.config()
        == FlowMatching(t_mean=-0.5, time_shift=2.0, prediction="x", time_sampling="uniform").config()
    )
    assert built.flow.prediction == "x" and built.flow.t_std == 1.0
    assert built.sampler == EulerSampler(50, 2.9, (0.11, 0.97), "uniform")
