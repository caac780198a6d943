"""A tiny pretrained folder written without a training run: the model entry of a small DiP and its init weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

TINY_MODEL: dict[str, Any] = {
    "net": {
        "class_path": "dip_lightning.core.models.DiP",
        "init_args": {
            "input_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "depth": 1,
            "num_heads": 2,
            "num_classes": 4,
            "init": "adaln_zero",
            "head": {
                "class_path": "dip_lightning.core.models.PatchDetailerHead",
                "init_args": {"depth": 2, "base_channels": 4},
            },
        },
    },
    "sampler": {"class_path": "dip_lightning.core.diffusion.EulerSampler", "init_args": {"num_steps": 2}},
}


def tiny_model(**net_args: Any) -> dict[str, Any]:
    """:data:`TINY_MODEL` with ``net_args`` replacing its network's arguments."""
    model = copy.deepcopy(TINY_MODEL)
    model["net"]["init_args"].update(net_args)
    return model


def write_tiny_folder(folder: Path, model: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A pretrained folder of ``model`` (default :data:`TINY_MODEL`) with seeded random weights (not an init:
    every tensor differs from the freshly built module's, so a load that skipped one would show)."""
    from dip_lightning.checkpoint.pretrained import write_pretrained
    from dip_lightning.training.pretrained import build_module, network_weights

    model = model or TINY_MODEL
    module = build_module(model)
    generator = torch.Generator().manual_seed(seed)
    weights = {
        k: (torch.randn(v.shape, generator=generator) * 0.1).to(v.dtype)
        if v.is_floating_point()
        else v.clone()
        for k, v in network_weights(module).items()
    }
    config = {
        "model": model,
        "patch_size": model["net"]["init_args"]["patch_size"],
        "weights": "test weights",
    }
    return write_pretrained(folder, config, weights, "# tiny\n")
