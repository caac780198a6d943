"""Load a trained, converted or reconstructed DiP for sampling, evaluation or fine-tuning, with the weights a
:class:`~dip_lightning.checkpoint.format.WeightRequest` names. A stored config is checked before it is rebuilt
(:func:`~dip_lightning.checkpoint.stored_config.check_stored_config`)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dip_lightning.checkpoint.compatibility import check_compatible
from dip_lightning.checkpoint.format import (
    DEFAULT_WEIGHTS,
    STATE_DICT,
    WeightRequest,
    select_weights,
    weights_label,
)
from dip_lightning.checkpoint.io import CheckpointError, read_checkpoint
from dip_lightning.checkpoint.stored_config import check_stored_config
from dip_lightning.core.errors import ConfigError
from dip_lightning.training.pretrained import load_pretrained

if TYPE_CHECKING:
    from dip_lightning.training.module import DiPModule


def module_from_hparams(
    hparams: Mapping[str, Any],
    *,
    trusted: bool = False,
    source: str | os.PathLike = "the checkpoint",
    **overrides: Any,
) -> DiPModule:
    """The :class:`DiPModule` that LightningCLI's stored ``hyper_parameters`` describe, with ``overrides``.

    What ``DiPModule.load_from_checkpoint`` builds, without reading the file again. The names the config would
    import are checked first (:func:`~dip_lightning.checkpoint.stored_config.check_stored_config`) unless
    ``trusted``; ``source`` names the file in errors.
    """
    from lightning.pytorch.cli import instantiate_module

    from dip_lightning.training.module import DiPModule

    known = inspect.signature(DiPModule.__init__).parameters
    config = {k: v for k, v in hparams.items() if k in known} | overrides
    check_stored_config(config, source, trusted)
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


def _load_folder(folder: str | os.PathLike, configs: list[str] | None, request: WeightRequest) -> DiPModule:
    if configs:
        raise ConfigError(
            f"{folder} is a pretrained folder: its config.json describes the network; drop --experiment."
        )
    if request != DEFAULT_WEIGHTS:
        raise ConfigError(
            f"{folder} is a pretrained folder holding one set of weights; --weights {request} chooses among a "
            "checkpoint's: export the weights you want (export --weights ...) and load that folder."
        )
    return load_pretrained(folder)


def load_module(
    ckpt_path: str | os.PathLike,
    configs: list[str] | None = None,
    *,
    weights: WeightRequest | str = DEFAULT_WEIGHTS,
    trust_pickle: bool = False,
) -> DiPModule:
    """A :class:`DiPModule` with the weights of a checkpoint that ``weights`` asks for (``"ema"``, ``"ema:0.9996"``,
    ``"raw"``, ``"phema:0.05"``: :func:`~dip_lightning.checkpoint.format.select_weights`); ``module.loaded_weights``
    says which (:func:`~dip_lightning.checkpoint.format.weights_label`).

    Without ``configs`` the network is rebuilt from the hyperparameters LightningCLI stored in the checkpoint;
    with ``configs`` (YAML files as for ``fit``) it is built from them. REPA is never built: sampling does not
    use it, and its frozen encoder's weights file need not exist on the sampling machine. ``trust_pickle``
    allows pickled Python objects besides tensors in the file, and a stored config that names code outside the
    kit, torch and Lightning (:func:`~dip_lightning.checkpoint.stored_config.check_stored_config`; trusted files only).

    A folder is read as a pretrained folder (``config.json`` + ``model.safetensors``,
    :func:`~dip_lightning.training.pretrained.load_pretrained`): no pickle; it holds one set of weights and its own
    config, so ``weights`` must be the default and ``configs`` empty.
    """
    if os.path.isdir(ckpt_path):
        return _load_folder(ckpt_path, configs, WeightRequest.parse(weights))
    checkpoint = read_checkpoint(ckpt_path, trust_pickle)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    request = WeightRequest.parse(weights)
    # The REPA projector is a training-only part.
    chosen = {
        k: v for k, v in select_weights(checkpoint, ckpt_path, request).items() if not k.startswith("repa.")
    }
    if configs:
        module = _module_from_configs(configs)
        advice = "Drop --experiment (the checkpoint carries its config), or pass the experiment it was trained with."
    elif hparams and "net" in hparams:
        module = module_from_hparams(
            hparams, trusted=trust_pickle, source=ckpt_path, repa=None, compile=False
        )
        advice = (
            "Its stored config does not build its tensors: pass --experiment with the YAML it was trained on."
        )
    else:
        raise CheckpointError(
            f"{ckpt_path} holds no model config (hyper_parameters): pass --experiment with the experiment YAML it "
            "was trained with."
        )
    check_compatible({STATE_DICT: chosen, "hyper_parameters": hparams}, module, ckpt_path, advice=advice)
    module.load_state_dict(chosen, strict=True)
    module.loaded_weights = weights_label(checkpoint, ckpt_path, request)
    return module
