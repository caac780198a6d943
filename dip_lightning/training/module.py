"""The LightningModule: a DiP network trained with flow matching (+ REPA) and sampled with an ODE sampler.

The parts live elsewhere: the network in :mod:`dip_lightning.core.models`, the objective and the samplers in
:mod:`dip_lightning.core.diffusion`, REPA in :mod:`dip_lightning.core.repa`, EMA, grids and metrics in
:mod:`dip_lightning.training.callbacks`. Progress is counted in optimizer steps and in images
(``train/images_seen``), as edm2 does; the images, their rate and the other monitors are logged by
:class:`~dip_lightning.training.callbacks.monitor.TrainingMonitor`. The training noise comes from a generator keyed
by (seed, rank, step, micro-batch), so a resumed run continues bit for bit (docs/design.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from dip_lightning.checkpoint.format import (
    DEFAULT_WEIGHTS,
    STATE_DICT,
    WeightRequest,
    select_weights,
    weights_label,
)
from dip_lightning.checkpoint.resume import apply_optimizer_setting_changes, optimizer_setting_changes
from dip_lightning.core.compat import given_hyperparameters
from dip_lightning.core.diffusion import (
    EulerSampler,
    FlowMatching,
    ODESampler,
    check_guide,
    make_noise,
    override_sampler,
    seeded_noise_sampler,
)
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.images import to_uint8
from dip_lightning.core.repa import REPA
from dip_lightning.core.seeding import mix_seed
from dip_lightning.training.callbacks.nonfinite import step_skipped

# Samplers are dataclasses; let YAML (and load_from_checkpoint, which re-parses the stored config) pick any
# subclass: `class_path: dip_lightning.core.diffusion.HeunSampler`.
set_parsing_settings(subclasses_enabled=[ODESampler])

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


class _SharedOnCopy:
    """A callable that ``copy.deepcopy`` shares instead of copying.

    The EMA callback deep-copies the whole LightningModule. Under LightningCLI the optimizer and scheduler
    factories hold jsonargparse instantiators that reference the CLI itself (trainer, datamodule, parser): the
    copy would duplicate all of it and, in DDP started by Lightning's launcher, fails on rank 0 (the launcher
    process's ``Popen`` holds a lock). The factories are stateless, so the copy can share them.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> _SharedOnCopy:
        return self


def default_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The paper's optimizer: AdamW, lr 1e-4, betas (0.9, 0.999), weight decay 0 (Table 4)."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)


class DiPModule(pl.LightningModule):
    """Trains a DiP network with flow matching and REPA; generates images with an ODE sampler.

    On resume the configured optimizer settings apply (lr, betas, weight decay ...; a new lr continues a
    schedule from the same point), not the ones the checkpoint saved; the resume log line lists what changed.

    Loaded outside ``fit``, the weights are those :attr:`weight_request` names
    (:func:`~dip_lightning.checkpoint.format.select_weights`): ``validate``/``test``/``predict --ckpt_path ...
    --weights ema:0.9996`` sets it; Lightning's ``load_from_checkpoint`` takes the default (the first EMA decay);
    :func:`dip_lightning.training.loading.load_module` takes any request. :attr:`loaded_weights` says which.

    Args:
        net: the denoiser (a :class:`~dip_lightning.core.models.DiP`), ``net(x, t, y)`` -> ``flow.prediction``.
        flow: the flow-matching objective (prediction, loss space and weight, time distribution, noise scale, dropout).
        sampler: the sampler used by :meth:`generate` (grids, FID, export, predict).
        repa: representation alignment; ``null`` turns it off.
        optimizer: optimizer factory (YAML ``class_path: torch.optim.AdamW``); default is the paper's AdamW.
        lr_scheduler: optional scheduler factory (the paper uses a constant lr).
        compile: compile the network in place with ``torch.compile`` for training (state_dict keys unchanged).
        compile_mode: ``torch.compile`` mode (``max-autotune`` tunes kernels; it and ``reduce-overhead``: CUDA graphs).
        sample_dtype: autocast dtype for sampling on GPU (``bfloat16`` as in the release; ``float32`` to disable).
        val_seed: seed of the fixed noise/time draws that make the validation loss comparable across evaluations.
    """

    #: Options that change how the module computes, not what: a resume may change them.
    EXECUTION_OPTIONS = ("compile", "compile_mode")

    #: Which weights of a checkpoint were loaded (:func:`dip_lightning.checkpoint.format.weights_label`), None if none.
    loaded_weights: str | None = None
    #: The weights a checkpoint load outside ``fit`` takes (DiPCLI sets it from ``--weights``).
    weight_request: WeightRequest = DEFAULT_WEIGHTS

    def __init__(
        self,
        net: nn.Module,
        flow: FlowMatching | None = None,
        sampler: ODESampler | None = None,
        repa: REPA | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        compile_mode: CompileMode = "default",
        sample_dtype: str = "bfloat16",
        val_seed: int = 1234,
    ) -> None:
        super().__init__()
        # Under LightningCLI the saved hyperparameters are the parsed config (class_path dicts), which is what makes
        # `DiPModule.load_from_checkpoint(path)` rebuild the whole network. Built by hand, the arguments are live
        # objects: keep them out of the checkpoint (they would be pickled, weights and all).
        under_cli = given_hyperparameters() is not None
        self.save_hyperparameters(
            ignore=[] if under_cli else ["net", "flow", "sampler", "repa", "optimizer", "lr_scheduler"]
        )
        self.net = net
        self.flow = flow if flow is not None else FlowMatching()
        self.sampler = sampler if sampler is not None else EulerSampler()
        self.repa = repa
        if repa is not None:
            repa.bind(hidden_size=net.hidden_size, num_tokens=(net.input_size // net.patch_size) ** 2)
        self.optimizer_factory = _SharedOnCopy(optimizer or default_optimizer)
        self.lr_scheduler_factory = _SharedOnCopy(lr_scheduler) if lr_scheduler is not None else None
        if compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.compile_net = compile
        self.compile_mode = compile_mode
        self.sample_dtype = sample_dtype
        self.val_seed = val_seed
        self._noise_step: int | None = None  # see _training_generator
        self._noise_micro = 0
        self.last_loss: torch.Tensor | None = None  # the last training step's loss (NonFiniteGuard)

    # ------------------------------------------------------------------ properties the callbacks rely on
    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.net.in_channels, self.net.input_size, self.net.input_size)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self._check_data_matches_model(datamodule)
        if stage == "fit" and self.compile_net:
            # Runs after the EMA callback's deepcopy, so the EMA copy used for sampling stays eager.
            self.compile_network(self.compile_mode)

    def compile_network(self, mode: CompileMode = "default", dynamic: bool | None = None) -> None:
        """``torch.compile`` the network in place: parameter names, hence checkpoints, stay unchanged.

        ``dynamic=False`` specialises on every input shape (sampling: batch B and 2B under CFG) instead of
        recompiling with symbolic shapes after the second one.
        """
        if mode not in COMPILE_MODES:
            raise ConfigError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        self.net.compile(mode=None if mode == "default" else mode, dynamic=dynamic)
        self.compiled_mode = mode

    def _check_data_matches_model(self, datamodule: Any) -> None:
        image_size = getattr(datamodule, "image_size", None)
        if image_size is not None and int(image_size) != int(self.net.input_size):
            raise ConfigError(
                f"the datamodule's image_size={image_size} but the model was built for input_size="
                f"{self.net.input_size}: set model.net.init_args.input_size (the CLI links the data's image_size "
                "to it), or build the datamodule with the model's size."
            )
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is not None and int(num_classes) != self.num_classes:
            raise ConfigError(
                f"the datamodule's num_classes={num_classes} but the model has num_classes={self.num_classes}: "
                "set model.net.init_args.num_classes (the CLI links the data's num_classes to it), or build the "
                "datamodule with the model's class count."
            )

    # ------------------------------------------------------------------ training
    def _losses(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        x_t, t, y_in, target = self.flow.training_inputs(
            x, y, null_class=self.net.null_class, generator=generator
        )
        if self.repa is not None:
            out, hidden = self.net(x_t, t, y_in, return_block=self.repa.block)
        else:
            out, hidden = self.net(x_t, t, y_in), None
        flow_loss = self.flow.prediction_loss(out, x_t, t, target)
        losses = {"flow_loss": flow_loss, "loss": flow_loss}
        if self.repa is not None:
            repa_loss = self.repa.loss(hidden, x)
            losses["repa_loss"] = repa_loss
            losses["loss"] = flow_loss + self.repa.weight * repa_loss
        return losses

    def _training_generator(self, device: torch.device) -> torch.Generator:
        """The generator of this micro-batch's noise, time and label-dropout draws.

        Seeded from (global seed, rank, optimizer step, micro-batch within the step), not the global RNG: a
        run resumed from any checkpoint draws exactly what the uninterrupted run drew, with nothing to restore
        but the step counter (and whatever other code consumed global random numbers meanwhile does not
        matter). The global seed is Lightning's ``PL_GLOBAL_SEED`` (``seed_everything``; 0 by default in the
        CLI).
        """
        step = self.trainer.global_step if self._trainer is not None else 0
        if step != self._noise_step:
            self._noise_step, self._noise_micro = step, 0
        else:
            self._noise_micro += 1
        rank = self.global_rank if self._trainer is not None else 0
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return torch.Generator(device=device).manual_seed(mix_seed(seed, rank, step, self._noise_micro))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        losses = self._losses(x, y, generator=self._training_generator(x.device))
        # Read by NonFiniteGuard before the update (on the device: no sync here).
        self.last_loss = losses["loss"].detach()
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"})
        return losses["loss"]

    def _logs_at(self, step: int) -> bool:
        """Whether Lightning writes the step metrics to the loggers at the end of optimizer step ``step``
        (1-based). Values logged at other steps are either overwritten or, worse, written later as if fresh;
        and logging a Python number creates a GPU tensor from host memory, a host-device sync. So the values
        that cost something are logged only at these steps."""
        every = self.trainer.log_every_n_steps
        return every > 0 and step % every == 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._logs_at(self.trainer.global_step + 1):  # global_step counts this step only after the update
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
                self.log("train/grad_norm", norm)
            self.log("train/lr", optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ validation: a comparable loss
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        generator = torch.Generator(device=x.device).manual_seed(self.val_seed + batch_idx)
        losses = self._losses(x, y, generator=generator)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=x.shape[0])
        return losses["loss"]

    # ------------------------------------------------------------------ sampling
    def make_sampler(self, **overrides: Any) -> ODESampler:
        """The configured sampler with an evaluation's settings applied
        (:data:`~dip_lightning.core.diffusion.SAMPLER_OVERRIDES`; None keeps the configured value)."""
        return override_sampler(self.sampler, **overrides)

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        seeds: torch.Tensor,
        sampler: ODESampler | None = None,
        guide: nn.Module | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """Images in [-1, 1], shape (B, C, H, W), one per (label, seed).

        The initial noise of image i depends only on ``seeds[i]``, so an image is the same whatever batch it is
        generated in. ``guide``: a weaker DiP of the same kind (``net`` and ``flow``: a DiPModule or a
        :class:`~dip_lightning.training.autoguidance.Guide`) whose conditional prediction replaces the
        unconditional one (autoguidance, ``cfg_scale`` its weight).
        """
        sampler = sampler if sampler is not None else self.make_sampler(**overrides)
        if guide is not None:
            check_guide(self, guide)
        device = self.device
        labels = labels.to(device=device, dtype=torch.long)
        noise = make_noise(seeds, self.image_shape, device=device)
        if self.flow.noise_scale != 1.0:
            noise = noise * self.flow.noise_scale  # the scale the network was trained with
        # Every prediction (v, x, eps) reaches the sampler as a velocity: the one conversion point.
        model_fn = self.flow.velocity_model(self.net)
        # The guide's own prediction type is converted by its own flow: both reach the sampler as velocities.
        guide_fn = guide.flow.velocity_model(guide.to(device).net.eval()) if guide is not None else None
        was_training = self.net.training
        self.net.eval()
        use_autocast = device.type == "cuda" and self.sample_dtype != "float32"
        try:
            with torch.autocast(device.type, dtype=getattr(torch, self.sample_dtype), enabled=use_autocast):
                x = sampler.sample(
                    model_fn,
                    noise,
                    labels,
                    null_class=self.net.null_class,
                    noise_sampler=seeded_noise_sampler(seeds),
                    guide_fn=guide_fn,
                )
        finally:
            self.net.train(was_training)
        return x.float()

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Batches of ``{"labels", "seeds"}`` (:class:`dip_lightning.core.data.LabelSeedDataModule`) -> uint8."""
        labels, seeds = batch["labels"], batch["seeds"]
        images = self.generate(labels, seeds)
        return {
            "images": to_uint8(images),
            "labels": labels,
            "seeds": seeds,
            "index": batch.get("index", seeds),
        }

    # ------------------------------------------------------------------ optimisation
    def configured_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer as this run's configuration builds it (for comparing settings on resume)."""
        built = self.configure_optimizers()
        return built["optimizer"] if isinstance(built, dict) else built

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning loads the weights and the optimizer from this same dict.
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if fitting:
            # Resume: the EMA callback restores its averages; the configured optimizer settings win.
            if checkpoint.get("optimizer_states"):
                changes = optimizer_setting_changes(checkpoint, self.configured_optimizer())
                apply_optimizer_setting_changes(checkpoint, changes)
            return
        # The file being loaded: the trainer's (validate/test/predict), unknown to load_from_checkpoint.
        path = (self._trainer.ckpt_path if self._trainer is not None else None) or "the checkpoint"
        weights = select_weights(checkpoint, path, self.weight_request)
        self.loaded_weights = weights_label(checkpoint, path, self.weight_request)
        checkpoint[STATE_DICT] = weights

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        # A step whose update NonFiniteGuard skipped leaves the schedule where it was too.
        if step_skipped(self._trainer):
            return
        super().lr_scheduler_step(scheduler, metric)

    def configure_optimizers(self) -> Any:
        # The frozen REPA encoder has requires_grad=False; only trainable tensors go to the optimizer.
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
