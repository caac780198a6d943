"""``fit --init_from CKPT``: start a run from another run's weights (e.g. DiP-XL/16 at 256 px -> DiP-XL/32 at 512).

Weights only (which: ``--init_from_weights``, chosen by :func:`~dip_lightning.checkpoint.format.select_weights` as
everywhere): step, optimizer, EMA history, data position and LR schedule start fresh; ``--ckpt_path`` continues a
run instead. Every tensor whose name and shape match transfers (RoPE follows the token grid, so there is no
position table to resize); the patch embedding, whose shape follows the patch size, is re-initialised or
upsampled (``--init_patch_embed``); any other mismatch is an error listing the tensors unless
``--init_from_strict false`` keeps this model's initialisation for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dip_lightning.checkpoint.compatibility import CheckpointMismatchError
from dip_lightning.checkpoint.format import DEFAULT_WEIGHTS, WeightRequest, select_weights, weights_label
from dip_lightning.checkpoint.io import peek_checkpoint
from dip_lightning.core.errors import ConfigError

__all__ = ["InitReport", "PatchEmbedInit", "init_from_checkpoint", "upsample_patch_embed"]

#: reinit: the new model's own initialisation (xavier-uniform; the bias transfers); upsample: upsample_patch_embed.
PatchEmbedInit = Literal["reinit", "upsample"]
PATCH_EMBED_KEY = "net.x_embedder.proj.weight"


@dataclass
class InitReport:
    """What :func:`init_from_checkpoint` did."""

    source: str
    weights: str = ""  # which weights of the source (weights_label)
    transferred: list[str] = field(default_factory=list)
    patch_embed: str | None = None  # "reinit" / "upsample 16 -> 32", None when it transferred unchanged
    kept_init: list[str] = field(default_factory=list)  # new tensors without a counterpart (non-strict only)

    def message(self) -> str:
        text = (
            f"Init from {self.source} ({self.weights}): {len(self.transferred)} tensors transferred (weights "
            "only, fresh trainer state)"
        )
        if self.patch_embed:
            text += f"; patch embedding: {self.patch_embed}"
        if self.kept_init:
            text += f"; kept their initialisation: {', '.join(self.kept_init[:8])}"
            text += f" and {len(self.kept_init) - 8} more" if len(self.kept_init) > 8 else ""
        return text + "."


def upsample_patch_embed(weight: Tensor, channels: int, old_patch: int, new_patch: int) -> Tensor:
    """``(D, C*p*p)`` -> ``(D, C*P*P)`` by nearest-neighbour upsampling of each kernel, divided by ``(P/p)^2``:
    mass-preserving, so an image enlarged 2x by nearest neighbours gets exactly the old model's token embeddings.

    Feature order is ``(C, kh, kw)`` (:func:`dip_lightning.core.models.backbone.patchify`).
    """
    if new_patch % old_patch:
        raise ConfigError(
            f"--init_patch_embed upsample needs the new patch size ({new_patch}) to be a multiple of "
            f"the checkpoint's ({old_patch})"
        )
    factor = new_patch // old_patch
    dim = weight.shape[0]
    kernel = weight.reshape(dim, channels, old_patch, old_patch)
    kernel = F.interpolate(kernel.float(), scale_factor=factor, mode="nearest") / factor**2
    return kernel.reshape(dim, channels * new_patch * new_patch).to(weight.dtype)


def init_from_checkpoint(
    module: nn.Module,  # the DiPModule to start, changed in place
    path: str | Path,  # the checkpoint to take weights from
    patch_embed: PatchEmbedInit = "reinit",  # the patch embedding when the patch size changed
    strict: bool = True,  # any other mismatch is an error (False: this model's initialisation, reported)
    weights: WeightRequest | str = DEFAULT_WEIGHTS,  # which weights of the checkpoint
    weights_only: bool = True,  # torch.load's: tensors and plain data only
) -> InitReport:
    """Copy the matching weights of checkpoint ``path`` into ``module``; see the module docstring."""
    if patch_embed not in ("reinit", "upsample"):
        raise ConfigError(f"--init_patch_embed must be reinit or upsample, got {patch_embed!r}")
    checkpoint = peek_checkpoint(path, weights_only)
    source = select_weights(checkpoint, path, weights)
    target = module.state_dict()
    report = InitReport(str(path), weights_label(checkpoint, path, weights))
    updates, problems = _transferable(module, source, target, patch_embed, report)
    if problems and strict:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise CheckpointMismatchError(
            f"--init_from {path}: {len(problems)} tensor(s) of this model do not match the checkpoint ({shown}). "
            "Only the patch embedding may change shape (--init_patch_embed); for another width, depth or head "
            "start fresh, or pass --init_from_strict false to keep this model's initialisation for these."
        )
    report.kept_init = [p.split(":")[0] for p in problems]
    with torch.no_grad():
        for name, value in updates.items():
            target[name].copy_(value.to(target[name].device, target[name].dtype))
    report.transferred = sorted(updates)
    return report


def _transferable(
    module: nn.Module,
    source: dict[str, Tensor],
    target: dict[str, Tensor],
    patch_embed: PatchEmbedInit,
    report: InitReport,
) -> tuple[dict[str, Tensor], list[str]]:
    """The checkpoint tensors to copy into ``target`` (the patch embedding as ``patch_embed`` says, noted in
    ``report``), and the tensors of ``target`` that have no counterpart: another shape, or not in the checkpoint."""
    wrong_shape, missing = [], []
    updates: dict[str, Tensor] = {}
    for name, tensor in target.items():
        if name.startswith("repa.encoder."):
            continue  # the frozen encoder loads its own weights file
        if name not in source:
            missing.append(name)
            continue
        src = source[name]
        if tuple(src.shape) == tuple(tensor.shape):
            updates[name] = src
        elif name == PATCH_EMBED_KEY:
            net = module.net
            old_patch = round((src.shape[1] // net.in_channels) ** 0.5)
            if patch_embed == "upsample":
                updates[name] = upsample_patch_embed(src, net.in_channels, old_patch, net.patch_size)
                report.patch_embed = f"upsample {old_patch} -> {net.patch_size}"
            else:
                report.patch_embed = f"reinit ({old_patch} -> {net.patch_size}: new xavier-uniform weights)"
        else:
            wrong_shape.append(f"{name}: checkpoint {tuple(src.shape)}, model {tuple(tensor.shape)}")
    return updates, wrong_shape + [f"{name}: not in the checkpoint" for name in missing]
