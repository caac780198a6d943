"""The guide network of autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
Itself"): a weaker DiP of the same kind whose conditional prediction replaces the unconditional one,
``v = v_guide + w (v_main - v_guide)``; the formula and the fit check live with CFG in
:mod:`dip_lightning.core.diffusion.guidance`.

A :class:`Guide` is read from a kit checkpoint or an exported pretrained folder: a smaller DiP or an earlier step of
the same run. It holds the guide's network and flow only (no optimizer, no REPA), so a training callback can take
one from YAML::

    guide:
      class_path: dip_lightning.training.autoguidance.Guide
      init_args: {path: runs/tiny/checkpoints/step=500.ckpt, weights: ema}
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from dip_lightning.checkpoint.format import DEFAULT_WEIGHTS, WeightRequest
from dip_lightning.core.diffusion import check_guide
from dip_lightning.core.errors import ConfigError
from dip_lightning.training.loading import load_module

__all__ = ["Guide", "load_guide"]


class Guide(nn.Module):
    """A guide network for autoguidance: the ``net`` and ``flow`` of the DiP at ``path``, in eval mode.

    Args:
        path: kit checkpoint or pretrained folder.
        weights: which weights of a checkpoint (``ema``, ``ema:0.9996``, ``raw``, ``phema:0.05``).
        trust_pickle: allow pickled Python objects in the checkpoint (trusted files only).
    """

    # ``weights`` is a plain string: YAML gives one, and jsonargparse cannot write a WeightRequest default back.
    def __init__(self, path: str, weights: str = "ema", trust_pickle: bool = False) -> None:
        super().__init__()
        if not os.path.exists(path):
            raise ConfigError(f"guide {path}: no such checkpoint or pretrained folder")
        module = load_module(path, weights=weights, trust_pickle=trust_pickle)
        self.path = str(path)
        self.net = module.net
        self.flow = module.flow
        self.loaded_weights = module.loaded_weights
        self.requires_grad_(False)
        self.eval()

    def __repr__(self) -> str:
        return f"Guide({self.path!r}, weights {self.loaded_weights})"


def load_guide(
    path: str | os.PathLike,
    main: Any | None = None,
    *,
    weights: WeightRequest | str = DEFAULT_WEIGHTS,
    trust_pickle: bool = False,
) -> Guide:
    """The :class:`Guide` at ``path``, checked against the ``main`` model when given (a ConfigError before any
    sampling when its image size, patch size, classes or noise scale differ)."""
    guide = Guide(str(path), weights=str(weights), trust_pickle=trust_pickle)
    if main is not None:
        check_guide(main, guide, path)
    return guide
