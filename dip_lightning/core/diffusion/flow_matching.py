"""The DiP training objective: linear flow matching, in the released code's conventions (PixNerd's trainer).

- **Time runs from noise to data**: ``x_t = t x + (1 - t) eps``, ``t = 0`` pure noise, ``t = 1`` clean data; the
  network predicts the velocity ``v = dx_t/dt = x - eps``. The paper's appendix writes the mirrored convention
  (``t = 1`` noise, target ``eps - x0``), the same under ``t -> 1 - t``, ``v -> -v``.
- **Loss**: ``mean((v_pred - v)^2)`` over every element, constant over ``t``; the other predictions (``x``,
  ``eps``), loss spaces and weights are named ablations. :func:`convert_prediction` is the one place a prediction
  changes space, and :meth:`FlowMatching.velocity_model` hands every sampler a velocity.
- **Times**: logit-normal ``t = sigmoid(N(t_mean, t_std^2))`` (or uniform), then :func:`shift_time`, the one
  shift formula of training times and sampler grids alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from dip_lightning.core.diffusion.noise import draw_normal, draw_uniform
from dip_lightning.core.errors import ConfigError

__all__ = [
    "LOSS_WEIGHTS",
    "SPACES",
    "TIME_SAMPLINGS",
    "FlowMatching",
    "ModelFn",
    "convert_prediction",
    "shift_time",
]

#: ``model_fn(x, t, y) -> v``: x (B, C, H, W), t (B,) in [0, 1], y (B,) long -> velocity (B, C, H, W).
ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Time shift ``t' = t / (t + shift * (1 - t))`` (t = 0 noise); ``shift > 1`` gives noisier times.

    Endpoints are fixed (0 -> 0, 1 -> 1) and the map is monotone, so a shifted grid stays a valid grid. The
    signal-to-noise ratio is divided by ``shift^2`` (``t' / (1 - t') = (t / (1 - t)) / shift``): the released
    ``time_shift_fn`` / ``shift_respace_fn``, and SD3's shift written for ``t = 0`` noise.
    """
    if shift == 1.0:
        return t
    return t / (t + shift * (1.0 - t))


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
    raise ConfigError(f"unknown prediction space {source!r}; choose one of {SPACES}")


class FlowMatching:
    """The DiP training objective: linear flow matching, logit-normal times, label dropout.

    The defaults are the released recipe bit for bit: v-prediction, loss on v, constant weight, logit-normal(0, 1)
    times, unit noise, label dropout 0.1. The other options are named ablations.

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
            raise ConfigError(f"t_std must be >= 0, got {t_std}")
        if time_shift <= 0:
            raise ConfigError(f"time_shift must be > 0, got {time_shift}")
        if not 0.0 <= label_dropout <= 1.0:
            raise ConfigError(f"label_dropout must be in [0, 1], got {label_dropout}")
        for name, value, choices in (
            ("prediction", prediction, SPACES),
            ("loss_space", loss_space, SPACES),
            ("loss_weight", loss_weight, LOSS_WEIGHTS),
            ("time_sampling", time_sampling, TIME_SAMPLINGS),
        ):
            if value not in choices:
                raise ConfigError(f"model.flow.{name} must be one of {choices}, got {value!r}")
        if not 0.0 < t_eps < 1.0:
            raise ConfigError(f"model.flow.t_eps must be in (0, 1), got {t_eps}")
        if snr_threshold <= 0:
            raise ConfigError(f"model.flow.snr_threshold must be > 0, got {snr_threshold}")
        if noise_scale <= 0:
            raise ConfigError(f"model.flow.noise_scale must be > 0, got {noise_scale}")
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
            return shift_time(draw_uniform((batch_size,), device, generator), self.time_shift)
        n = draw_normal((batch_size,), device, torch.float32, generator)
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
        drop = draw_uniform((y.shape[0],), y.device, generator) < self.label_dropout
        return torch.where(drop, torch.full_like(y, null_class), y)

    @staticmethod
    def mse(v_pred: Tensor, target: Tensor) -> Tensor:
        """Mean squared error over all elements, computed in float32 (bf16 autocast outputs are upcast)."""
        return torch.mean((v_pred.float() - target.float()) ** 2)

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
        eps = draw_normal(tuple(x.shape), x.device, x.dtype, generator)
        if self.noise_scale != 1.0:
            eps = eps * self.noise_scale
        x_t = self.interpolate(x, eps, t)
        y_dropped = self.drop_labels(y, null_class, generator=generator)
        return x_t, t, y_dropped, self.prediction_target(x, eps)
