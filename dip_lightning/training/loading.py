"""Load a trained or converted DiP for sampling, evaluation or fine-tuning."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dip_lightning.checkpoint.format import select_weights, weights_label
from dip_lightning.checkpoint.io import read_checkpoint

if TYPE_CHECKING:
    from dip_lightning.training.module import DiPModule

import inspect
import os
from collections.abc import Mapping
from typing import Any

from dip_lightning.checkpoint.compatibility import check_compatible
from dip_lightning.checkpoint.io import CheckpointError


def module_from_hparams(hparams: Mapping[str, Any], **overrides: Any) -> DiPModule:
    """The :class:`DiPModule` that LightningCLI's stored ``hyper_parameters`` describe, with ``overrides``.

    What ``DiPModule.load_from_checkpoint`` builds, without reading the file again.
    """
    from lightning.pytorch.cli import instantiate_module

    from dip_lightning.training.module import DiPModule

    known = inspect.signature(DiPModule.__init__).parameters
    config = {k: v for k, v in hparams.items() if k in known} | overrides
    return instantiate_module(DiPModule, config)


def _module_from_configs(configs: list[str]) -> DiPModule:
    """The module ``fit`` would build from these YAML files, on a bare CPU trainer (no GPUs, callbacks, logger)."""
    from dip_lightning.training.cli import DiPCLI

    args: list[str] = []
    for config in configs:
        args += ["--config", config]
    args += [
        "--model.repa=null",
        "--model.compile=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        "--trainer.callbacks=null",
        "--trainer.logger=false",
    ]
    return DiPCLI(args=args, run=False).model


def load_module(
    ckpt_path: str | os.PathLike,
    configs: list[str] | None = None,
    raw_weights: bool = False,
    trust_pickle: bool = False,
    ema: float | None = None,
) -> DiPModule:
    """A :class:`DiPModule` with a checkpoint's weights (:func:`select_weights`: the first EMA decay by default,
    ``ema`` another tracked one, ``raw_weights`` the raw ones); ``module.loaded_weights`` says which
    (:func:`weights_label`).

    Without ``configs`` the network is rebuilt from the hyperparameters LightningCLI stored in the checkpoint;
    with ``configs`` (YAML files as for ``fit``) it is built from them. REPA is never built: sampling does not
    use it, and its frozen encoder's weights file need not exist on the sampling machine.
    """
    checkpoint = read_checkpoint(ckpt_path, trust_pickle)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    # The REPA projector is a training-only part.
    weights = {
        k: v
        for k, v in select_weights(checkpoint, ckpt_path, ema, raw_weights).items()
        if not k.startswith("repa.")
    }
    if configs:
        module = _module_from_configs(configs)
        advice = "Drop --config (the checkpoint carries its config), or pass the config it was trained with."
    elif hparams and "net" in hparams:
        module = module_from_hparams(hparams, repa=None, compile=False)
        advice = "Its stored config does not build its own tensors: pass --config with the YAML it was trained with."
    else:
        raise CheckpointError(
            f"{ckpt_path} holds no model config (hyper_parameters): pass --config with the experiment YAML it "
            "was trained with."
        )
    check_compatible({"state_dict": weights, "hyper_parameters": hparams}, module, ckpt_path, advice=advice)
    module.load_state_dict(weights, strict=True)
    module.loaded_weights = weights_label(checkpoint, ema, raw_weights)
    return module
