"""Every use of a library internal (a private name, or a structure the library does not document), in one place.

Lightning and torchmetrics do not promise these across releases; ``pyproject.toml`` bounds both below their
next minor release, and ``tests/core/test_compat.py`` has one test per entry here that fails loudly when an
upgrade removes or reshapes it. Code elsewhere calls the functions below instead of touching the internals.

==========================================  ================================================================
internal                                    why the kit needs it
==========================================  ================================================================
``hparams_mixin._given_hyperparameters``    tell a LightningCLI-built module (config hparams) from one built
                                            by hand (live objects that must not be pickled)
``Trainer._accelerator_connector``          the cluster environment (SLURM requeue signal) at ``setup``
``epoch_loop._broadcast_sigterm_tensor``    skip Lightning's per-step SIGTERM broadcast (a collective and a
                                            GPU sync) while the preemption guard owns SIGTERM
``epoch_loop.batch_progress.current``       batches of an unfinished step, for the data position on save
``WeightAveraging._average_model`` /        Lightning's EMA callback keeps its averaged copy and swaps it
``._swap_models``                           in for validation through these
``LightningCLI._parse_ckpt_path``           (overridden) ``fit --ckpt_path`` must keep this run's settings
``RichProgressBar._get_train_description``  (overridden) the epoch label of step-limited runs
``NoTrainInceptionV3._torch_fidelity_forward``  features and logits in one pass (torchmetrics' Inception)
``Optimizer._step_supports_amp_scaling`` /      the non-finite guard skips an update on the device through
``.found_inf`` / ``.grad_scale``                torch's fused kernels (GradScaler's protocol)
``fit_loop._combined_loader``               forgotten after a loss-spike rollback, so the next ``fit`` builds
                                            the training loader again at the restored data position
``_SubprocessScriptLauncher.procs``         the ranks Lightning's launcher started, ended when rank 0 fails;
(the list its child observer watches)       emptied first, so the observer does not SIGKILL rank 0 as well
==========================================  ================================================================
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = [
    "OVERRIDDEN_PRIVATE_METHODS",
    "average_model",
    "batches_in_flight",
    "cluster_environment",
    "forget_training_loader",
    "given_hyperparameters",
    "skip_sigterm_broadcast",
    "sigterm_broadcast_skipped",
    "restore_sigterm_broadcast",
    "swap_averaged_models",
    "clear_device_skip",
    "set_device_skip",
    "stop_launched_processes",
    "supports_device_skip",
    "torch_fidelity_forward",
]

#: Private methods the kit overrides in subclasses: ``(module, class name, method name)``.
OVERRIDDEN_PRIVATE_METHODS: tuple[tuple[str, str, str], ...] = (
    ("lightning.pytorch.cli", "LightningCLI", "_parse_ckpt_path"),
    ("lightning.pytorch.callbacks.progress.rich_progress", "RichProgressBar", "_get_train_description"),
)


# ---------------------------------------------------------------------------------------------- lightning
def given_hyperparameters() -> Any:
    """The hyperparameters LightningCLI is instantiating the current module with (None outside the CLI)."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get()


def cluster_environment(trainer: Any) -> Any:
    """The trainer's cluster environment (e.g. ``SLURMEnvironment``), or None."""
    return getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)


def _no_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast."""


def skip_sigterm_broadcast(trainer: Any) -> bool:
    """Replace Lightning's per-step SIGTERM broadcast of this fit by a no-op; False if there is none."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if not hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
        return False
    epoch_loop._broadcast_sigterm_tensor = _no_sigterm_broadcast
    return True


def sigterm_broadcast_skipped(trainer: Any) -> bool:
    return trainer.fit_loop.epoch_loop.__dict__.get("_broadcast_sigterm_tensor") is _no_sigterm_broadcast


def restore_sigterm_broadcast(trainer: Any) -> None:
    """Undo :func:`skip_sigterm_broadcast` (the class's method again)."""
    if sigterm_broadcast_skipped(trainer):
        del trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor


def batches_in_flight(trainer: Any) -> int:
    """Training batches fetched whose step has not finished (0 or 1)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return max(0, progress.ready - progress.processed)


def forget_training_loader(trainer: Any) -> None:
    """Drop the training loader a finished ``fit`` keeps: otherwise the next ``fit`` on this Trainer reuses it and
    skips restoring the data position of the checkpoint it resumes from."""
    trainer.fit_loop._combined_loader = None


def stop_launched_processes(trainer: Any) -> bool:
    """Kill (SIGKILL) the ranks Lightning's launcher started from this process (``devices=N`` without
    torchrun/srun) and wait for them; False when it started none (another rank, another launcher).

    The launcher's observer thread kills this process too once a child has exited with a non-zero code; it
    watches the launcher's own ``procs`` list, so the list is emptied before the kill.
    """
    procs = getattr(trainer.strategy.launcher, "procs", None)
    if not procs:
        return False
    children = list(procs)
    procs.clear()
    for child in children:
        child.kill()
    for child in children:
        child.wait()
    return True


def average_model(callback: Any) -> Any:
    """The ``AveragedModel`` of Lightning's weight-averaging callback (None before ``setup``)."""
    return getattr(callback, "_average_model", None)


def swap_averaged_models(callback: Any, pl_module: Any) -> None:
    """Swap the live and the averaged weights (Lightning's own swap, used around validation)."""
    callback._swap_models(pl_module)


# ---------------------------------------------------------------------------------------------- torch.optim
# torch's fused Adam/AdamW/SGD kernels skip their update (and undo their step-count increment) where a `found_inf`
# tensor attribute of the optimizer is 1; `torch.amp.GradScaler` sets it (with `grad_scale`) for optimizers whose
# `_step_supports_amp_scaling` is True. The non-finite guard uses the same protocol to skip on the device.
def supports_device_skip(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` flag on the device (torch's fused optimizers)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(
        getattr(optimizer, "defaults", {}).get("fused")
    )


def set_device_skip(optimizer: Any, found_inf: Tensor) -> None:
    """Make the next ``optimizer.step`` a no-op where ``found_inf`` (a 0-d float tensor on the device) is 1."""
    optimizer.found_inf = found_inf
    optimizer.grad_scale = None


def clear_device_skip(optimizer: Any) -> None:
    """Undo :func:`set_device_skip`."""
    for name in ("found_inf", "grad_scale"):
        optimizer.__dict__.pop(name, None)


# ---------------------------------------------------------------------------------------------- torchmetrics
def torch_fidelity_forward(net: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(pool features, unbiased logits)`` of torchmetrics' ``NoTrainInceptionV3`` in one forward."""
    features, logits = net._torch_fidelity_forward(images)
    return features, logits
