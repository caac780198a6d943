"""All diffusion math for DiP in one module: the flow-matching objective, time sampling, samplers and CFG.

Conventions (those of the released DiP/PixNerd code, see ``docs/paper.md`` §2.2 and §3):

- **Time runs from noise to data**: ``x_t = t * x + (1 - t) * eps`` with ``t = 0`` pure noise and
  ``t = 1`` clean data. The network predicts the velocity ``v = dx_t/dt = x - eps``. The paper's appendix
  uses the mirrored convention (``t = 1`` noise, target ``eps - x0``); the two are equivalent under
  ``t -> 1 - t``, ``v -> -v``.
- **Loss**: ``mean((v_pred - v)^2)`` over every element, constant weighting over ``t``. Options (named
  ablations, ``docs/paper.md`` §2.5): the network may predict ``x`` or ``eps`` instead (``prediction``), the
  loss may be taken in another space (``loss_space``; JiT takes x-prediction's loss on v), weighted by the
  released ``loss_weight`` functions; :func:`convert_prediction` is the one place predictions change space
  and :meth:`FlowMatching.velocity_model` hands every sampler a velocity.
- **Training times**: logit-normal, ``t = sigmoid(N(t_mean, t_std^2))`` (or uniform), then an optional time
  shift. Noise ``eps ~ N(0, noise_scale^2)``, unit scale as released.
- **Time shift** (one formula for training and for the sampler grid): ``t' = t / (t + s * (1 - t))``. In this
  convention ``s > 1`` moves every ``t`` towards the noise end (``t' < t``); ``s = 1`` is the identity.
  Equivalently the signal-to-noise ratio is divided by ``s^2``: ``t' / (1 - t') = (t / (1 - t)) / s``. This is
  the released ``time_shift_fn``/``shift_respace_fn`` and the SD3 shift written for ``t = 0`` noise.
- **Label dropout** for classifier-free guidance: each label is replaced by the null class with
  probability 0.1.
- **Sampling**: Euler ODE on a time grid from 0 to 1 (100 steps in the paper), interval CFG
  ``v = v_u + w (v_c - v_u)`` inside ``t_min < t < t_max`` and the plain conditional velocity outside
  (:func:`guided_velocity`, the one CFG of every sampler). Also Heun (per-evaluation or the released guidance
  rule), the released SDE step family (:class:`SDESampler`) and Adams-Bashforth 2 (:class:`MultistepSampler`):
  one signature ``sample(model_fn, noise, y, null_class, noise_sampler=None)``, listed in :data:`SAMPLERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dip_lightning.core.seeding import mix_seed

__all__ = [
    "FlowMatching",
    "convert_prediction",
    "ODESampler",
    "EulerSampler",
    "HeunSampler",
    "SDESampler",
    "MultistepSampler",
    "SAMPLERS",
    "STEP_FUNCTIONS",
    "seeded_noise_sampler",
    "score_from_velocity",
    "ModelFn",
    "make_noise",
    "shift_time",
    "guided_velocity",
]

#: ``model_fn(x, t, y) -> v``: x (B, C, H, W), t (B,) in [0, 1], y (B,) long -> velocity (B, C, H, W).
ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]

# Grid times that equal an interval bound up to float rounding count as *on* the bound (so not guided, the
# inequalities are strict). Without it, whether t = 0.11 or 0.97 on a 100-step grid is guided would depend on
# how the grid was rounded. The float32 released grid excludes both bounds too: this agrees with it.
_INTERVAL_TOL = 1e-6


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Time shift ``t' = t / (t + shift * (1 - t))`` (t = 0 noise); ``shift > 1`` gives noisier times.

    Endpoints are fixed (0 -> 0, 1 -> 1) and the map is monotone, so a shifted grid stays a valid grid.
    """
    if shift == 1.0:
        return t
    return t / (t + shift * (1.0 - t))


def _randn(
    shape: Sequence[int], device: torch.device | str | None, dtype: torch.dtype, generator: Any
) -> Tensor:
    """``torch.randn`` accepting a generator on another device than the output (draws on the generator's)."""
    if generator is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    out = torch.randn(*shape, device=generator.device, dtype=dtype, generator=generator)
    return out.to(device) if device is not None else out


def _rand(shape: Sequence[int], device: torch.device | str | None, generator: Any) -> Tensor:
    if generator is None:
        return torch.rand(*shape, device=device)
    out = torch.rand(*shape, device=generator.device, generator=generator)
    return out.to(device) if device is not None else out


def _expand_t(t: Tensor, like: Tensor) -> Tensor:
    """(B,) times -> (B, 1, 1, ...) broadcastable against ``like``, in ``like``'s dtype."""
    return t.to(dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))


# ------------------------------------------------------------------------------------------------------------
# Training objective
# ------------------------------------------------------------------------------------------------------------
#: What the network outputs (``prediction``) and the space a loss is taken in (``loss_space``).
Space = Literal["v", "x", "eps"]
SPACES: tuple[str, ...] = ("v", "x", "eps")
#: Loss weights of the released trainer (PixNerd ``training_repa.py``), as functions of alpha = t, sigma = 1 - t.
LossWeight = Literal["constant", "inverse_sigma", "snr", "min_snr", "max_snr"]
LOSS_WEIGHTS: tuple[str, ...] = ("constant", "inverse_sigma", "snr", "min_snr", "max_snr")
TimeSampling = Literal["logit_normal", "uniform"]
TIME_SAMPLINGS: tuple[str, ...] = ("logit_normal", "uniform")


def convert_prediction(out: Tensor, x_t: Tensor, t: Tensor, source: str, dest: str, t_eps: float) -> Tensor:
    """A prediction of kind ``source`` (``v``, ``x`` or ``eps``) at ``(x_t, t)`` as the quantity ``dest``.

    The one place where predictions change space (training losses in another space, samplers): with
    ``x_t = t x + (1 - t) eps`` and ``v = x - eps``,

    - from v: ``x = x_t + (1 - t) v``, ``eps = x_t - t v`` (no division);
    - from x: ``v = (x - x_t) / (1 - t)``, ``eps = (x_t - t x) / (1 - t)``;
    - from eps: ``v = (x_t - eps) / t``, ``x = (x_t - (1 - t) eps) / t``.

    Divisions by ``1 - t`` (or ``t``) are clamped below at ``t_eps``, JiT's ``(1 - t).clamp_min(t_eps)``, so
    x-prediction stays finite at t -> 1 and eps-prediction at t = 0 (the sampler's first step). ``t`` is (B,).
    Returns ``out`` itself when ``source == dest``.
    """
    if source == dest:
        return out
    te = _expand_t(t, x_t)
    if source == "v":
        return x_t + (1.0 - te) * out if dest == "x" else x_t - te * out
    if source == "x":
        one_minus_t = (1.0 - te).clamp_min(t_eps)
        return (out - x_t) / one_minus_t if dest == "v" else (x_t - te * out) / one_minus_t
    if source == "eps":
        t_safe = te.clamp_min(t_eps)
        return (x_t - out) / t_safe if dest == "v" else (x_t - (1.0 - te) * out) / t_safe
    raise ValueError(f"unknown prediction space {source!r}; choose one of {SPACES}")


class FlowMatching:
    """The DiP training objective: linear flow matching, logit-normal times, label dropout.

    The defaults are the released recipe bit for bit: v-prediction, loss on v, constant weight, logit-normal(0, 1)
    times, unit noise. The other options are named ablations (``docs/paper.md`` §2.2, §2.5).

    A plain object (no parameters), built by LightningCLI from YAML; :meth:`config` gives its settings. A
    checkpoint records the objective through the config LightningCLI stores (``hyper_parameters["flow"]``), and
    resuming with other objective settings is refused (:data:`OBJECTIVE_FIELDS`).

    Args:
        t_mean: mean of the normal whose sigmoid is the training time (0 in the release; JiT uses -0.8).
        t_std: standard deviation of that normal (1 in the release; JiT 0.8).
        time_shift: shift ``s`` applied after sampling, ``t' = t / (t + s (1 - t))``; ``s > 1`` trains more on
            noisy times. 1.0 (no shift) is the release.
        label_dropout: probability that a label is replaced by the null class (CFG training), 0.1 in
            the release.
        prediction: what the network outputs: ``v`` (velocity ``x - eps``, the release), ``x`` (the clean
            image, JiT "Back to Basics") or ``eps`` (the noise). Samplers convert it to the velocity
            (:meth:`velocity`), so every command works for every prediction.
        loss_space: the quantity the squared error compares: ``v`` (the release; JiT's choice for
            x-prediction), ``x`` or ``eps``. Prediction and target are both converted from the prediction's
            space with :func:`convert_prediction` (JiT converts the target too, so the clamp of ``1 - t``
            applies to both).
        t_eps: the clamp of ``1 - t`` (x-prediction) or ``t`` (eps-prediction) in those conversions, for
            training and sampling alike; JiT's ``t_eps`` = 0.05. Unused with ``prediction: v``.
        loss_weight: per-sample weight over t, from the released trainer (alpha = t, sigma = 1 - t):
            ``constant`` (1; the release's configs), ``inverse_sigma`` (``1 / sigma^2``), ``snr``
            (``alpha / sigma``; the release names the ratio, not its square, SNR), ``min_snr``
            (``max(alpha / sigma, snr_threshold)``: the release's ``minsnr``, a *lower* clip) and ``max_snr``
            (``min(alpha / sigma, snr_threshold)``: the release's ``maxsnr``, the Min-SNR-gamma cap of Hang et
            al. 2023 applied to the release's ratio).
        snr_threshold: the clip of ``min_snr`` / ``max_snr`` (5 in the release, as Min-SNR's gamma).
        time_sampling: ``logit_normal`` (the release) or ``uniform`` (``t ~ U[0, 1)``, the release's
            ``lognorm_t: false``); the time shift applies to both.
        noise_scale: standard deviation of the noise, ``eps ~ N(0, noise_scale^2 I)``; 1 in the release, 2 in
            JiT at 512 px (more noise for more pixels). Sampling starts from noise of the same scale.
    """

    #: Everything that changes what the network learns: a resume may not change them (``check_compatible``).
    OBJECTIVE_FIELDS = (
        "prediction",
        "loss_space",
        "t_eps",
        "loss_weight",
        "snr_threshold",
        "time_sampling",
        "noise_scale",
    )

    def __init__(
        self,
        t_mean: float = 0.0,
        t_std: float = 1.0,
        time_shift: float = 1.0,
        label_dropout: float = 0.1,
        prediction: Space = "v",
        loss_space: Space = "v",
        t_eps: float = 0.05,
        loss_weight: LossWeight = "constant",
        snr_threshold: float = 5.0,
        time_sampling: TimeSampling = "logit_normal",
        noise_scale: float = 1.0,
    ) -> None:
        if t_std < 0:
            raise ValueError(f"t_std must be >= 0, got {t_std}")
        if time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {time_shift}")
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        for name, value, choices in (
            ("prediction", prediction, SPACES),
            ("loss_space", loss_space, SPACES),
            ("loss_weight", loss_weight, LOSS_WEIGHTS),
            ("time_sampling", time_sampling, TIME_SAMPLINGS),
        ):
            if value not in choices:
                raise ValueError(f"model.flow.{name} must be one of {choices}, got {value!r}")
        if not 0.0 < t_eps < 1.0:
            raise ValueError(f"model.flow.t_eps must be in (0, 1), got {t_eps}")
        if snr_threshold <= 0:
            raise ValueError(f"model.flow.snr_threshold must be > 0, got {snr_threshold}")
        if noise_scale <= 0:
            raise ValueError(f"model.flow.noise_scale must be > 0, got {noise_scale}")
        self.t_mean = float(t_mean)
        self.t_std = float(t_std)
        self.time_shift = float(time_shift)
        self.label_dropout = float(label_dropout)
        self.prediction: str = prediction
        self.loss_space: str = loss_space
        self.t_eps = float(t_eps)
        self.loss_weight: str = loss_weight
        self.snr_threshold = float(snr_threshold)
        self.time_sampling: str = time_sampling
        self.noise_scale = float(noise_scale)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this objective: ``FlowMatching(**fm.config())``."""
        return {
            "t_mean": self.t_mean,
            "t_std": self.t_std,
            "time_shift": self.time_shift,
            "label_dropout": self.label_dropout,
            "prediction": self.prediction,
            "loss_space": self.loss_space,
            "t_eps": self.t_eps,
            "loss_weight": self.loss_weight,
            "snr_threshold": self.snr_threshold,
            "time_sampling": self.time_sampling,
            "noise_scale": self.noise_scale,
        }

    # -- pieces ----------------------------------------------------------------------------------------------
    def sample_t(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Training times (batch_size,) float32: ``shift(sigmoid(t_mean + t_std * n))``, ``n ~ N(0, 1)``.

        Logit-normal concentrates training on intermediate noise levels, where velocity is hardest to
        predict. With ``time_sampling="uniform"``: ``shift(u)``, ``u ~ U[0, 1)``.
        """
        if self.time_sampling == "uniform":
            return shift_time(_rand((batch_size,), device, generator), self.time_shift)
        n = _randn((batch_size,), device, torch.float32, generator)
        return shift_time(torch.sigmoid(self.t_mean + self.t_std * n), self.time_shift)

    @staticmethod
    def interpolate(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = t * x + (1 - t) * eps``: data at t = 1, noise at t = 0. ``t`` is (B,)."""
        t = _expand_t(t, x)
        return t * x + (1.0 - t) * eps

    @staticmethod
    def target(x: Tensor, eps: Tensor) -> Tensor:
        """The velocity ``d x_t / dt = x - eps`` (independent of t for the linear interpolant)."""
        return x - eps

    def prediction_target(self, x: Tensor, eps: Tensor) -> Tensor:
        """What a perfect network outputs for this (x, eps): ``x - eps``, ``x`` or ``eps`` by ``prediction``."""
        if self.prediction == "v":
            return self.target(x, eps)
        return x if self.prediction == "x" else eps

    def drop_labels(self, y: Tensor, null_class: int, generator: torch.Generator | None = None) -> Tensor:
        """Replace each label by ``null_class`` independently with probability ``label_dropout``."""
        if self.label_dropout <= 0.0:
            return y
        drop = _rand((y.shape[0],), y.device, generator) < self.label_dropout
        return torch.where(drop, torch.full_like(y, null_class), y)

    @staticmethod
    def mse(v_pred: Tensor, target: Tensor) -> Tensor:
        """Mean squared error over all elements, computed in float32 (bf16 autocast outputs are upcast)."""
        return torch.mean((v_pred.float() - target.float()) ** 2)

    def loss(self, v_pred: Tensor, x: Tensor, eps: Tensor | None = None) -> Tensor:
        """The released loss: v-space mean squared error, constant weighting (whatever this object's options).

        ``loss(v_pred, x, eps)`` compares with ``x - eps``. ``loss(v_pred, target)`` (no ``eps``) takes the
        second argument as the target already. The configured objective is :meth:`prediction_loss`.
        """
        target = x if eps is None else self.target(x, eps)
        return self.mse(v_pred, target)

    def weight(self, t: Tensor) -> Tensor:
        """The per-sample loss weight (B,) float32 at times ``t`` (alpha = t, sigma = 1 - t), see ``loss_weight``.

        Unclamped, as released: ``inverse_sigma`` and ``snr`` grow without bound as t -> 1.
        """
        alpha, sigma = t.float(), 1.0 - t.float()
        if self.loss_weight == "constant":
            return torch.ones_like(alpha)
        if self.loss_weight == "inverse_sigma":
            return 1.0 / sigma**2
        ratio = alpha / sigma
        if self.loss_weight == "snr":
            return ratio
        if self.loss_weight == "min_snr":
            return ratio.clamp(min=self.snr_threshold)
        return ratio.clamp(max=self.snr_threshold)

    def prediction_loss(self, out: Tensor, x_t: Tensor, t: Tensor, target: Tensor) -> Tensor:
        """The configured objective: ``mean(weight(t) * (C(out) - C(target))^2)`` in float32.

        ``out`` is the network output, ``target`` its ideal value (:meth:`training_inputs`), ``C`` the
        conversion from ``prediction`` to ``loss_space`` (:func:`convert_prediction`). With the defaults this
        is :meth:`mse` of ``out`` and ``target``, the released loss, bit for bit.
        """
        if self.loss_space != self.prediction:
            out = convert_prediction(
                out.float(), x_t.float(), t, self.prediction, self.loss_space, self.t_eps
            )
            target = convert_prediction(
                target.float(), x_t.float(), t, self.prediction, self.loss_space, self.t_eps
            )
        if self.loss_weight == "constant":
            return self.mse(out, target)
        squared = (out.float() - target.float()) ** 2
        return torch.mean(_expand_t(self.weight(t), squared) * squared)

    def velocity(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The network output ``out`` at ``(x_t, t)`` as a velocity (``out`` itself for v-prediction)."""
        return convert_prediction(out, x_t, t, self.prediction, "v", self.t_eps)

    def velocity_model(self, net: ModelFn) -> ModelFn:
        """``net`` as the ``model_fn(x, t, y) -> v`` every sampler takes; ``net`` itself for v-prediction.

        Samplers, grids, FID and export all sample through this (``DiPModule.generate``). Guidance is linear
        in the prediction and the conversion is affine in it at fixed (x_t, t), so guiding the velocity is
        guiding the prediction.
        """
        if self.prediction == "v":
            return net

        def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return self.velocity(net(x, t, y), x, t)

        return model_fn

    def training_inputs(
        self, x: Tensor, y: Tensor, null_class: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Everything one training step needs: ``(x_t, t, y_dropped, target)``; ``target`` is in the space of
        ``prediction`` (the velocity ``x - eps`` by default), for :meth:`prediction_loss`.

        Draw order (t, then eps, then the dropout mask) is fixed, so a seeded ``generator`` gives reproducible
        inputs, e.g. for a validation loss comparable across evaluations.
        """
        t = self.sample_t(x.shape[0], device=x.device, generator=generator)
        eps = _randn(tuple(x.shape), x.device, x.dtype, generator)
        if self.noise_scale != 1.0:
            eps = eps * self.noise_scale
        x_t = self.interpolate(x, eps, t)
        y_dropped = self.drop_labels(y, null_class, generator=generator)
        return x_t, t, y_dropped, self.prediction_target(x, eps)


# ------------------------------------------------------------------------------------------------------------
# Noise and output helpers
# ------------------------------------------------------------------------------------------------------------
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


def guided_velocity(
    model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor, null_class: int, cfg_scale: float
) -> Tensor:
    """Classifier-free guidance, the kit's only implementation: ``v_u + w (v_c - v_u)``, in ``x``'s dtype.

    ``w = 1`` is one forward on the conditional batch (the unconditional branch is not computed). Otherwise one
    forward on the doubled batch ``[x; x]`` with labels ``[y; null]`` (the paper's "100x2" evaluations).
    ``t`` is (B,).
    """
    if cfg_scale == 1.0:
        return model_fn(x, t, y).to(x.dtype)
    batch = x.shape[0]
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    v_cond, v_uncond = out.to(x.dtype)[:batch], out.to(x.dtype)[batch:]
    return v_uncond + cfg_scale * (v_cond - v_uncond)


# ------------------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------------------
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
            convention (``docs/paper.md §3.2``): no guidance for the noisiest 11% and the last 3% of the
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
    interval counting 2 (cond + uncond, the paper's "100x2"). Euler evaluates once per step (at the step's
    start). Heun evaluates at both ends of every step except the last, which is an Euler step so that the
    network is never called at t = 1 (released and JiT convention): ``2 * num_steps - 1`` evaluations.
    """

    num_steps: int = 100
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    time_grid: Literal["released", "uniform"] = "released"
    time_shift: float = 1.0
    last_step: float | None = None

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if len(self.cfg_interval) != 2 or self.cfg_interval[0] > self.cfg_interval[1]:
            raise ValueError(
                f"cfg_interval must be (t_min, t_max) with t_min <= t_max, got {self.cfg_interval}"
            )
        self.cfg_interval = (float(self.cfg_interval[0]), float(self.cfg_interval[1]))
        if self.time_grid not in ("released", "uniform"):
            raise ValueError(f"time_grid must be 'released' or 'uniform', got {self.time_grid!r}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")
        if self.last_step is not None:
            if self.time_grid != "released":
                raise ValueError("last_step only applies to time_grid='released'")
            if not 0.0 < self.last_step < 1.0:
                raise ValueError(f"last_step must be in (0, 1), got {self.last_step}")

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
        if self.cfg_scale == 1.0:
            return False
        t_min, t_max = self.cfg_interval
        if include_top:
            return t_min + _INTERVAL_TOL < t < t_max + _INTERVAL_TOL
        return t_min + _INTERVAL_TOL < t < t_max - _INTERVAL_TOL

    def velocity(
        self, model_fn: ModelFn, x: Tensor, t: float, y: Tensor, null_class: int, guide: bool | None = None
    ) -> Tensor:
        """The velocity at time ``t``, guided (:func:`guided_velocity`, the kit's one CFG) where ``guide`` says,
        by default where :meth:`guided` says for ``t``."""
        guide = self.guided(t) if guide is None else guide
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        return guided_velocity(model_fn, x, t_vec, y, null_class, self.cfg_scale if guide else 1.0)

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
    ) -> Tensor:
        """Integrate from ``noise`` (t = 0) to t = 1; the raw endpoint (not clipped), in ``noise``'s dtype.

        The one signature of every sampler. ``noise_sampler`` gives the fresh noise of stochastic samplers
        (:func:`seeded_noise_sampler`: per-sample seeds, so an image depends only on its seed); ODE samplers
        ignore it and are deterministic: the same noise, labels and model give the same output.
        """
        raise NotImplementedError

    def __call__(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        null_class: int,
        noise_sampler: NoiseSampler | None = None,
    ) -> Tensor:
        return self.sample(model_fn, noise, y, null_class, noise_sampler)


@dataclass
class EulerSampler(ODESampler):
    """Euler ODE sampler, ``x <- x + v(x, t) dt``: the paper's sampler (Euler-100 with interval CFG).

    See :class:`ODESampler` for the arguments, the CFG interval convention and NFE (``num_steps``
    evaluations, a guided one counting 2).
    """

    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        null_class: int,
        noise_sampler: NoiseSampler | None = None,
    ) -> Tensor:
        grid = self.timesteps().tolist()
        x = noise
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            x = x + (t_next - t_cur) * self.velocity(model_fn, x, t_cur, y, null_class)
        return x


@dataclass
class HeunSampler(ODESampler):
    """Heun (trapezoidal predictor-corrector) ODE sampler, second order; the last step is plain Euler.

    Args:
        guidance_rule: ``per_evaluation`` (default): each evaluation applies guidance according to its own time
            (the corrector at ``t_next``), so the sampler integrates one well-defined guided field.
            ``released``: the released PixNerd/DiP Heun, which decides guidance for both evaluations of a step
            from the step's start time ``t_cur`` and includes the top, ``t_min < t_cur <= t_max``
            (``docs/paper.md`` §3.1). The two differ only on steps that straddle an interval bound.

    NFE ``2 * num_steps - 1`` (guided evaluations counting 2).
    """

    guidance_rule: Literal["per_evaluation", "released"] = "per_evaluation"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance_rule not in ("per_evaluation", "released"):
            raise ValueError(
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

    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        null_class: int,
        noise_sampler: NoiseSampler | None = None,
    ) -> Tensor:
        grid = self.timesteps().tolist()
        x = noise
        for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            dt = t_next - t_cur
            guide_cur, guide_next = self._step_guidance(t_cur, t_next)
            v = self.velocity(model_fn, x, t_cur, y, null_class, guide_cur)
            if i == self.num_steps - 1:
                x = x + dt * v
                break
            x_pred = x + dt * v
            v_next = self.velocity(model_fn, x_pred, t_next, y, null_class, guide_next)
            x = x + dt * 0.5 * (v + v_next)
        return x


# ------------------------------------------------------------------------------------------------------------
# Stochastic sampling (the release's sde_step_fn family)
# ------------------------------------------------------------------------------------------------------------
#: ``noise_sampler(like) -> N(0, I)`` of ``like``'s shape, dtype and device: the fresh noise of an SDE step.
NoiseSampler = Callable[[Tensor], Tensor]
_SDE_STREAM = 0x5DE  # separates the SDE's per-sample noise stream from the initial noise of the same seed


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
                raise ValueError(
                    f"{name} must be one of {tuple(STEP_FUNCTIONS)}, got {getattr(self, name)!r}"
                )
        if self.w_schedule not in ("linear", "constant"):
            raise ValueError(f"w_schedule must be 'linear' or 'constant', got {self.w_schedule!r}")
        if self.w_scale < 0:
            raise ValueError(f"w_scale must be >= 0, got {self.w_scale}")

    def w(self, t: float) -> float:
        """The diffusion strength at time ``t``."""
        return self.w_scale * ((1.0 - t) if self.w_schedule == "linear" else 1.0)

    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        null_class: int,
        noise_sampler: NoiseSampler | None = None,
    ) -> Tensor:
        if noise_sampler is None:
            generator = torch.Generator().manual_seed(0)

            def noise_sampler(like: Tensor) -> Tensor:
                return _randn(tuple(like.shape), like.device, like.dtype, generator)

        grid = self.timesteps().tolist()
        x = noise
        for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            v = self.velocity(model_fn, x, t_cur, y, null_class)
            w = self.w(t_cur)
            if w == 0.0:
                x = x + (t_next - t_cur) * v  # exactly the Euler step (no score, no noise drawn)
                continue
            step = STEP_FUNCTIONS[self.step_fn if i < self.num_steps - 1 else self.last_step_fn]
            x = step(x, v, t_next - t_cur, score_from_velocity(v, x, t_cur), w, noise_sampler)
        return x


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
            raise ValueError(f"order must be 1 or 2, got {self.order}")

    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        null_class: int,
        noise_sampler: NoiseSampler | None = None,
    ) -> Tensor:
        grid = self.timesteps().tolist()
        x = noise
        previous: tuple[Tensor, float] | None = None  # (velocity, step size) of the previous step
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            h = t_next - t_cur
            v = self.velocity(model_fn, x, t_cur, y, null_class)
            if previous is None or self.order == 1:
                x = x + h * v
            else:
                v_prev, h_prev = previous
                r = h / h_prev
                x = x + h * ((1.0 + 0.5 * r) * v - (0.5 * r) * v_prev)
            previous = (v, h)
        return x


#: Every sampler by its ``sample --sampler`` name; YAML takes the class path (``model.sampler.class_path``).
SAMPLERS: dict[str, type[ODESampler]] = {
    "euler": EulerSampler,
    "heun": HeunSampler,
    "sde": SDESampler,
    "multistep": MultistepSampler,
}
