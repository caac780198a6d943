"""A :class:`~dip_lightning.training.module.DiPModule` to and from a pretrained folder (``config.json`` +
``model.safetensors``, :mod:`dip_lightning.checkpoint.pretrained`): no pickle on either side.

:func:`load_pretrained` rebuilds the module from ``config.json`` (classes checked against the allow-list first)
and loads the weights strictly; the weights come back bit for bit, so samples of the same seeds are identical
to the exported module's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jsonargparse import ArgumentError  # what it raises for a class_path it cannot build
from torch import Tensor

from dip_lightning.checkpoint.compatibility import check_compatible
from dip_lightning.checkpoint.pretrained import (
    CONFIG_FILE,
    MODEL_KEYS,
    PretrainedFolderError,
    read_pretrained_config,
    read_pretrained_weights,
)
from dip_lightning.checkpoint.stored_config import plain_config

if TYPE_CHECKING:
    from dip_lightning.training.module import DiPModule

__all__ = ["build_module", "load_pretrained", "model_entry", "network_weights"]


def model_entry(
    hparams: Mapping[str, Any] | None, source: str | os.PathLike = "the checkpoint"
) -> dict[str, Any]:
    """The ``model`` entry of ``config.json``: the ``net``, ``flow``, ``sampler`` and ``sample_dtype`` of a
    checkpoint's stored ``hyper_parameters`` (as the CLI stores them). A checkpoint without a network config
    (a module built by hand in Python) is a :class:`PretrainedFolderError`."""
    hparams = dict(hparams or {})
    net = hparams.get("net")
    if not isinstance(net, Mapping) or "class_path" not in net:
        raise PretrainedFolderError(
            f"{source} records no network config (hyper_parameters.net with a class_path), so a folder could not "
            "say how to rebuild it: export a checkpoint written by fit or convert."
        )
    return {k: plain_config(hparams[k]) for k in MODEL_KEYS if k in hparams}


def network_weights(module: DiPModule) -> dict[str, Tensor]:
    """The network's weights (``net.state_dict()`` names): what ``model.safetensors`` holds."""
    return dict(module.net.state_dict())


def build_module(model: Mapping[str, Any]) -> DiPModule:
    """The module of a checked ``model`` entry, as the CLI builds it (REPA off, not compiled)."""
    from lightning.pytorch.cli import instantiate_module

    from dip_lightning.training.module import DiPModule

    return instantiate_module(DiPModule, {**model, "repa": None, "compile": False})


def load_pretrained(folder: str | os.PathLike, device: str | torch.device = "cpu") -> DiPModule:
    """The :class:`DiPModule` a pretrained folder describes, with its weights, in eval mode on ``device``.

    Reads ``config.json`` and ``model.safetensors`` only (no pickle); a class outside the kit, torch and
    Lightning is refused before anything is imported. ``module.loaded_weights`` says which weights the folder
    holds (``"ema 0.9999"`` ...); ``module.pretrained_config`` is the whole ``config.json``. Errors name the
    folder, the problem and the fix: a missing or damaged file, an unknown class, weights that do not fit.
    """
    folder = Path(folder)
    config = read_pretrained_config(folder)
    weights = read_pretrained_weights(folder)
    try:
        module = build_module(config["model"])
    except (ValueError, TypeError, ImportError, AttributeError, ArgumentError) as err:
        # jsonargparse nests the cause in indented lines under "Parser key ...": the innermost says it.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = lines[-1] if lines else type(err).__name__
        raise PretrainedFolderError(
            f"{folder / CONFIG_FILE}: its model entry does not build a DiP module ({why}); "
            "export it again with this kit's version, or fix the class_path it names."
        ) from err
    state = {f"net.{k}": v for k, v in weights.items()}
    check_compatible(
        {"state_dict": state},
        module,
        folder / "model.safetensors",
        config_keys=(),
        objective_keys=(),
        advice=f"The weights and {CONFIG_FILE} are of different networks: export the run again.",
    )
    module.net.load_state_dict(weights, strict=True)
    module.loaded_weights = str(config.get("weights") or "pretrained")
    module.pretrained_config = config
    return module.to(device).eval()
