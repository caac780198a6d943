"""The samplers: integrate the velocity from noise (t = 0) to data (t = 1) on a time grid, with interval CFG.

Euler (the paper's Euler-100), Heun (per-evaluation or the released guidance rule), the released SDE step family
and Adams-Bashforth 2, all with one signature ``sample(model_fn, noise, y, null_class, noise_sampler=None)`` and
listed in :data:`SAMPLERS`. They are dataclasses, so YAML builds them and an evaluation replaces the fields it may
choose for itself (:data:`SAMPLER_OVERRIDES`, applied by :func:`override_sampler` and nowhere else).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dip_lightning.core.diffusion.flow_matching import ModelFn, shift_time
from dip_lightning.core.diffusion.guidance import guided_velocity, in_guidance_interval
from dip_lightning.core.diffusion.noise import NoiseSampler, draw_normal
from dip_lightning.core.errors import ConfigError

__all__ = [
    "SAMPLERS",
    "SAMPLER_OVERRIDES",
    "STEP_FUNCTIONS",
    "EulerSampler",
    "HeunSampler",
    "MultistepSampler",
    "ODESampler",
    "SDESampler",
    "Trajectory",
    "override_sampler",
    "sampler_overrides",
    "score_from_velocity",
]


@dataclass
class Trajectory:
    """What the steps of one :meth:`ODESampler.sample` call share.

    Args:
        velocity: ``(x, t, guide=None) -> v``, the sampler's guided velocity (:meth:`ODESampler.velocity`) for
            this call's model, labels and null class.
        noise: the fresh noise of stochastic steps.
        previous: the previous step's ``(velocity, step size)``, kept by multistep samplers.
    """

    velocity: Callable[..., Tensor]
    noise: NoiseSampler
    previous: tuple[Tensor, float] | None = None


def _batch_noise_sampler() -> NoiseSampler:
    """Fresh noise from one generator seeded 0 for the whole batch: the default when no sampler is given."""
    generator = torch.Generator().manual_seed(0)

    def draw(like: Tensor) -> Tensor:
        return draw_normal(tuple(like.shape), like.device, like.dtype, generator)

    return draw


@dataclass
class ODESampler:
    """Base of the deterministic ODE samplers: time grid, interval classifier-free guidance, NFE accounting.

    Dataclasses, so ``dataclasses.replace(sampler, num_steps=50)`` gives a modified copy and LightningCLI
    builds them from YAML fields. To choose between Euler and Heun with ``class_path`` in YAML, type the
    config field as ``ODESampler`` and enable subclasses for it
    (``jsonargparse.set_parsing_settings(subclasses_enabled=[ODESampler])``; jsonargparse treats dataclasses
    as plain field groups otherwise).

    Args:
        num_steps: number of integration steps (100 in the paper; 75 in its fast setting).
        cfg_scale: guidance scale ``w``; 1.0 disables guidance (only the conditional branch is ever computed).
            The paper's results use 2.9 (figures 4.0).
        cfg_interval: ``(t_min, t_max)``: guidance is applied when ``t_min < t < t_max`` (strict, as in the
            released Euler sampler), ``t`` being the time at which the network is evaluated (t = 0 noise).
            Outside, the velocity is the conditional one and the unconditional branch is **not computed**
            (batch not doubled). The paper's "normalized t in [0.11, 0.97]" is read in this same code
            convention: no guidance for the noisiest 11% and the last 3% of the
            trajectory, which is what interval guidance is for (guidance at high noise costs diversity). On
            the 100-step grid ``(0.11, 0.97)`` guides the 85 steps t = 0.12, ..., 0.96, and the steps t =
            0.00, ..., 0.11 and 0.97, 0.98, 0.99 run unguided, the same steps the released float32 code
            guides. The default ``(0.0, 1.0)`` guides every step except the first (t = 0), again as the
            release; use ``(-1.0, 2.0)`` to guide every step.
        time_grid: ``"released"``: ``linspace(0, 1 - last_step, num_steps)`` then 1.0, built in float32
            exactly as the released sampler (its model inputs ``t`` match bit for bit). With the default
            ``last_step = 1 / num_steps`` this is the uniform grid ``i / num_steps`` up to float32 rounding
            (dt = 0.01 at 100 steps). ``"uniform"``: ``linspace(0, 1, num_steps + 1)`` in float64.
        time_shift: ``s`` of :func:`shift_time`, applied to the grid (1.0 = none, as released).
        last_step: the released ``last_step`` (length of the final step to t = 1), only with
            ``time_grid="released"``. ``None`` = ``1 / num_steps`` (the release's default, uniform grid).
            ``0.01`` gives ``linspace(0, 0.99, num_steps)`` + [1.0] at any ``num_steps``.

    Network evaluations (NFE): :meth:`nfe` counts per-sample evaluations, an evaluation inside the guidance
    interval counting 2 (cond + uncond, the paper's "100x2"; main + guide under autoguidance). Euler evaluates
    once per step (at the step's start). Heun evaluates at both ends of every step except the last, which is an
    Euler step so that the network is never called at t = 1 (released and JiT convention): ``2 * num_steps - 1``
    evaluations.
    """

    num_steps: int = 100
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    time_grid: Literal["released", "uniform"] = "released"
    time_shift: float = 1.0
    last_step: float | None = None

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        if len(self.cfg_interval) != 2 or self.cfg_interval[0] > self.cfg_interval[1]:
            raise ConfigError(
                f"cfg_interval must be (t_min, t_max) with t_min <= t_max, got {self.cfg_interval}"
            )
        self.cfg_interval = (float(self.cfg_interval[0]), float(self.cfg_interval[1]))
        if self.time_grid not in ("released", "uniform"):
            raise ConfigError(f"time_grid must be 'released' or 'uniform', got {self.time_grid!r}")
        if self.time_shift <= 0:
            raise ConfigError(f"time_shift must be > 0, got {self.time_shift}")
        if self.last_step is not None:
            if self.time_grid != "released":
                raise ConfigError("last_step only applies to time_grid='released'")
            if not 0.0 < self.last_step < 1.0:
                raise ConfigError(f"last_step must be in (0, 1), got {self.last_step}")

    # -- grid and guidance -----------------------------------------------------------------------------------
    def timesteps(self) -> Tensor:
        """The (num_steps + 1,) time grid, from 0 (noise) to 1 (data), time shift applied; float64 values."""
        n = self.num_steps
        if self.time_grid == "released":
            last = 1.0 / n if self.last_step is None or n == 1 else float(self.last_step)
            grid = torch.cat([torch.linspace(0.0, 1.0 - last, n), torch.ones(1)])  # float32, as released
            return shift_time(grid, self.time_shift).double()
        return shift_time(torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64), self.time_shift)

    def guided(self, t: float, include_top: bool = False) -> bool:
        """Whether an evaluation at time ``t`` uses CFG (scale != 1 and ``t_min < t < t_max``; ``<= t_max``
        with ``include_top``, the released Heun's comparison)."""
        return self.cfg_scale != 1.0 and in_guidance_interval(t, self.cfg_interval, include_top)

    def velocity(
        self,
        model_fn: ModelFn,
        x: Tensor,
        t: float,
        y: Tensor,
        null_class: int,
        guide: bool | None = None,
        guide_fn: ModelFn | None = None,
    ) -> Tensor:
        """The velocity at time ``t``, guided (:func:`guided_velocity`, the kit's one guidance) where ``guide``
        says, by default where :meth:`guided` says for ``t``; ``guide_fn`` (a guide network) makes it
        autoguidance instead of CFG."""
        guide = self.guided(t) if guide is None else guide
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        return guided_velocity(model_fn, x, t_vec, y, null_class, self.cfg_scale if guide else 1.0, guide_fn)

    def evaluation_times(self) -> list[float]:
        """Times at which the network is evaluated, in order: by default once at each step's start (Euler, SDE,
        multistep); a sampler that evaluates elsewhere overrides this."""
        return self.timesteps()[:-1].tolist()

    def evaluations(self) -> list[tuple[float, bool]]:
        """``(time, guided)`` of every network evaluation, in order."""
        return [(t, self.guided(t)) for t in self.evaluation_times()]

    def nfe(self) -> int:
        """Per-sample network evaluations for one trajectory; a guided evaluation counts 2."""
        return sum(2 if guided else 1 for _, guided in self.evaluations())

    # -- integration -----------------------------------------------------------------------------------------
    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        null_class: int,
        noise_sampler: NoiseSampler | None = None,
        guide_fn: ModelFn | None = None,
    ) -> Tensor:
        """Integrate from ``noise`` (t = 0) to t = 1; the raw endpoint (not clipped), in ``noise``'s dtype.

        The one signature and the one loop of every sampler: each sampler defines only :meth:`step`.
        ``noise_sampler`` gives the fresh noise of stochastic samplers (:func:`seeded_noise_sampler`: per-sample
        seeds, so an image depends only on its seed; without one, a generator seeded 0 for the whole batch); ODE
        samplers ignore it and are deterministic: the same noise, labels and model give the same output.
        ``guide_fn``: a conditional guide network's velocity, which replaces the unconditional prediction
        (autoguidance; ``cfg_scale`` is then its weight, applied in the same interval).
        """

        def velocity(x: Tensor, t: float, guide: bool | None = None) -> Tensor:
            return self.velocity(model_fn, x, t, y, null_class, guide, guide_fn)

        trajectory = Trajectory(velocity, _batch_noise_sampler() if noise_sampler is None else noise_sampler)
        grid = self.timesteps().tolist()
        x = noise
        for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            x = self.step(trajectory, x, t_cur, t_next, last=i == self.num_steps - 1)
        return x

    def step(self, trajectory: Trajectory, x: Tensor, t_cur: float, t_next: float, last: bool) -> Tensor:
        """One integration step of ``x`` from ``t_cur`` to ``t_next`` (``last``: the step that ends at t = 1)."""
        raise NotImplementedError

    __call__ = sample


@dataclass
class EulerSampler(ODESampler):
    """Euler ODE sampler, ``x <- x + v(x, t) dt``: the paper's sampler (Euler-100 with interval CFG).

    See :class:`ODESampler` for the arguments, the CFG interval convention and NFE (``num_steps``
    evaluations, a guided one counting 2).
    """

    def step(self, trajectory: Trajectory, x: Tensor, t_cur: float, t_next: float, last: bool) -> Tensor:
        return x + (t_next - t_cur) * trajectory.velocity(x, t_cur)


@dataclass
class HeunSampler(ODESampler):
    """Heun (trapezoidal predictor-corrector) ODE sampler, second order; the last step is plain Euler.

    Args:
        guidance_rule: ``per_evaluation`` (default): each evaluation applies guidance according to its own time
            (the corrector at ``t_next``), so the sampler integrates one well-defined guided field.
            ``released``: the released PixNerd/DiP Heun, which decides guidance for both evaluations of a step
            from the step's start time ``t_cur`` and includes the top, ``t_min < t_cur <= t_max``. The two
            differ only on steps that straddle an interval bound.

    NFE ``2 * num_steps - 1`` (guided evaluations counting 2).
    """

    guidance_rule: Literal["per_evaluation", "released"] = "per_evaluation"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance_rule not in ("per_evaluation", "released"):
            raise ConfigError(
                f"guidance_rule must be 'per_evaluation' or 'released', got {self.guidance_rule!r}"
            )

    def _step_guidance(self, t_cur: float, t_next: float) -> tuple[bool, bool]:
        """Whether the predictor (at t_cur) and the corrector (at t_next) of a step are guided."""
        if self.guidance_rule == "released":
            guided = self.guided(t_cur, include_top=True)
            return guided, guided
        return self.guided(t_cur), self.guided(t_next)

    def evaluation_times(self) -> list[float]:
        return [t for t, _ in self.evaluations()]

    def evaluations(self) -> list[tuple[float, bool]]:
        grid = self.timesteps().tolist()
        out: list[tuple[float, bool]] = []
        for i in range(self.num_steps):
            first, second = self._step_guidance(grid[i], grid[i + 1])
            out.append((grid[i], first))
            if i < self.num_steps - 1:
                out.append((grid[i + 1], second))
        return out

    def step(self, trajectory: Trajectory, x: Tensor, t_cur: float, t_next: float, last: bool) -> Tensor:
        dt = t_next - t_cur
        guide_cur, guide_next = self._step_guidance(t_cur, t_next)
        v = trajectory.velocity(x, t_cur, guide_cur)
        if last:
            return x + dt * v
        x_pred = x + dt * v
        v_next = trajectory.velocity(x_pred, t_next, guide_next)
        return x + dt * 0.5 * (v + v_next)


# ------------------------------------------------------------------------------------------------------------
# Stochastic sampling (the release's sde_step_fn family)
# ------------------------------------------------------------------------------------------------------------
def score_from_velocity(v: Tensor, x: Tensor, t: float) -> Tensor:
    """The score ``grad log p_t(x) = -eps / (1 - t)`` from the velocity, for ``x_t = t x + (1 - t) eps``.

    The released sampler's ``s = ((alpha / alpha') v - x) / (sigma^2 - (alpha / alpha') sigma' sigma)`` with
    alpha = t, sigma = 1 - t, which is ``(t v - x) / (1 - t)``; ``-x`` at t = 0 (the score of N(0, I)).
    """
    return (t * v - x) / (1.0 - t)


def ode_step(x: Tensor, v: Tensor, dt: float, score: Tensor, w: float, noise: NoiseSampler) -> Tensor:
    """``x + v dt`` (the release's ``ode_step_fn``)."""
    return x + v * dt


def sde_mean_step(x: Tensor, v: Tensor, dt: float, score: Tensor, w: float, noise: NoiseSampler) -> Tensor:
    """``x + v dt + w s dt``: the drift of the SDE without its noise (``sde_mean_step_fn``)."""
    return x + v * dt + score * (w * dt)


def sde_step(x: Tensor, v: Tensor, dt: float, score: Tensor, w: float, noise: NoiseSampler) -> Tensor:
    """Euler-Maruyama of ``dx = (v + w s) dt + sqrt(2 w) dW`` (``sde_step_fn``): the probability-flow ODE plus
    Langevin dynamics of strength ``w``, which leaves every marginal ``p_t`` unchanged."""
    return x + v * dt + score * (w * dt) + math.sqrt(2.0 * w * dt) * noise(x)


def sde_preserve_step(
    x: Tensor, v: Tensor, dt: float, score: Tensor, w: float, noise: NoiseSampler
) -> Tensor:
    """``x + v dt + w s dt / 2 + sqrt(w dt) noise`` (``sde_preserve_step_fn``): the same SDE at half strength."""
    return x + v * dt + score * (0.5 * w * dt) + math.sqrt(w * dt) * noise(x)


#: The release's step functions by name, one signature ``(x, v, dt, score, w, noise_sampler) -> x``.
STEP_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "ode": ode_step,
    "sde_mean": sde_mean_step,
    "sde": sde_step,
    "sde_preserve": sde_preserve_step,
}


@dataclass
class SDESampler(ODESampler):
    """Euler-Maruyama sampler, the release's ``EulerSampler`` with ``step_fn: sde_step_fn`` and a w-scheduler.

    Each step evaluates the (guided) velocity at its start, the score from it (:func:`score_from_velocity`),
    the diffusion strength ``w(t_cur)``, and applies ``step_fn``; the last step is ``last_step_fn`` (the
    release's default: a plain ODE step, so the output carries no fresh noise). With ``w = 0`` every step is
    the Euler step: the sampler is :class:`EulerSampler`, bit for bit (tested).

    Args:
        step_fn: ``sde`` (Euler-Maruyama), ``sde_mean`` (its drift only), ``sde_preserve`` (half strength),
            ``ode``.
        last_step_fn: the step function of the last step (``ode`` as released).
        w_schedule: ``linear``: ``w(t) = w_scale * (1 - t)``, the release's ``LinearScheduler`` as
            w-scheduler (its ``w`` is sigma = 1 - t; what the DiP and PixNerd configs name); ``constant``:
            ``w(t) = w_scale`` (the release's ``ConstScheduler`` at 1, ``GammaScheduler(gamma)`` at gamma).
        w_scale: multiplies the schedule; 0 turns the SDE into the ODE.

    NFE ``num_steps`` (one evaluation per step, a guided one counting 2). Stochastic: pass a
    ``noise_sampler`` (:func:`seeded_noise_sampler`; ``DiPModule.generate`` does) for images that depend only
    on their seeds; without one, the noise comes from a generator seeded 0 for the whole batch.
    """

    step_fn: Literal["sde", "sde_mean", "sde_preserve", "ode"] = "sde"
    last_step_fn: Literal["sde", "sde_mean", "sde_preserve", "ode"] = "ode"
    w_schedule: Literal["linear", "constant"] = "linear"
    w_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("step_fn", "last_step_fn"):
            if getattr(self, name) not in STEP_FUNCTIONS:
                raise ConfigError(
                    f"{name} must be one of {tuple(STEP_FUNCTIONS)}, got {getattr(self, name)!r}"
                )
        if self.w_schedule not in ("linear", "constant"):
            raise ConfigError(f"w_schedule must be 'linear' or 'constant', got {self.w_schedule!r}")
        if self.w_scale < 0:
            raise ConfigError(f"w_scale must be >= 0, got {self.w_scale}")

    def w(self, t: float) -> float:
        """The diffusion strength at time ``t``."""
        return self.w_scale * ((1.0 - t) if self.w_schedule == "linear" else 1.0)

    def step(self, trajectory: Trajectory, x: Tensor, t_cur: float, t_next: float, last: bool) -> Tensor:
        v = trajectory.velocity(x, t_cur)
        w = self.w(t_cur)
        if w == 0.0:
            return x + (t_next - t_cur) * v  # exactly the Euler step (no score, no noise drawn)
        step_function = STEP_FUNCTIONS[self.last_step_fn if last else self.step_fn]
        return step_function(x, v, t_next - t_cur, score_from_velocity(v, x, t_cur), w, trajectory.noise)


# ------------------------------------------------------------------------------------------------------------
# Multistep
# ------------------------------------------------------------------------------------------------------------
@dataclass
class MultistepSampler(ODESampler):
    """Adams-Bashforth multistep ODE sampler: second order at one network evaluation per step.

    Step n (size ``h_n``, previous ``h_{n-1}``, ratio ``r = h_n / h_{n-1}``) extrapolates the velocity from this
    step's and the previous step's evaluation, ``x += h_n ((1 + r/2) v_n - (r/2) v_{n-1})`` (variable-step AB2,
    so shifted grids work); the first step is Euler. Same evaluations as :class:`EulerSampler` (NFE
    ``num_steps``), second-order accurate like Heun at half Heun's evaluations per step. Guidance follows each
    evaluation's time, so the extrapolated field is the guided one. For flow matching this is the velocity form of
    a DPM-Solver++(2M)-type multistep solver, without its exponential integrator (linear-path velocities vary
    slowly in t, and the release's grid has no singular end: the network is never called at t = 1).

    Args:
        order: 2 (AB2) or 1 (which is Euler).
    """

    order: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in (1, 2):
            raise ConfigError(f"order must be 1 or 2, got {self.order}")

    def step(self, trajectory: Trajectory, x: Tensor, t_cur: float, t_next: float, last: bool) -> Tensor:
        h = t_next - t_cur
        v = trajectory.velocity(x, t_cur)
        previous, trajectory.previous = trajectory.previous, (v, h)
        if previous is None or self.order == 1:
            return x + h * v
        v_prev, h_prev = previous
        r = h / h_prev
        return x + h * ((1.0 + 0.5 * r) * v - (0.5 * r) * v_prev)


#: Every sampler by its ``sample --sampler`` name; YAML takes the class path (``model.sampler.class_path``).
SAMPLERS: dict[str, type[ODESampler]] = {
    "euler": EulerSampler,
    "heun": HeunSampler,
    "sde": SDESampler,
    "multistep": MultistepSampler,
}


# ------------------------------------------------------------------------------------------------------------
# What an evaluation may change
# ------------------------------------------------------------------------------------------------------------
#: The sampler fields an evaluation may set for itself, None keeping the configured value: every caller that
#: takes sampler settings (``generate``, ``sample``, ``sweep``, ``MetricsCallback``, ``SampleGrid``) takes these.
SAMPLER_OVERRIDES: tuple[str, ...] = ("num_steps", "cfg_scale", "cfg_interval")


def sampler_overrides(**settings: Any) -> dict[str, Any]:
    """The settings that override the configured sampler: those of :data:`SAMPLER_OVERRIDES` that are not None.

    Any other name is a ``TypeError``: an evaluation may not change the time grid or the integrator this way.
    """
    unknown = sorted(set(settings) - set(SAMPLER_OVERRIDES))
    if unknown:
        raise TypeError(
            f"sampler setting(s) {unknown} cannot be overridden; choose from {list(SAMPLER_OVERRIDES)}"
        )
    return {name: value for name, value in settings.items() if value is not None}


def override_sampler(sampler: ODESampler, **settings: Any) -> ODESampler:
    """``sampler`` with the given :func:`sampler_overrides` applied: a copy, or ``sampler`` itself when none."""
    overrides = sampler_overrides(**settings)
    return dataclasses.replace(sampler, **overrides) if overrides else sampler
