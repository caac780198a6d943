"""``fit --init_from CKPT``: start a run from another run's weights (e.g. DiP-XL/16 at 256 px -> DiP-XL/32 at 512).

Only weights are taken, not the trainer state: the step counter, optimizer moments, EMA history, data position
and LR schedule start fresh (use ``--ckpt_path`` to continue a run). The weights are the checkpoint's EMA
weights (its ``state_dict``) unless ``--init_from_raw`` asks for the raw ones (``current_model_state``).

What transfers (docs/design.md §10): every tensor whose name and shape match the new model: the transformer
blocks, the timestep and class embeddings, the final adaLN and the Patch Detailer Head (its parameters do not
depend on the patch size; at P = 32 the bottleneck is 2x2 and the token is tiled over it, as released), the
REPA projector. RoPE positions are recomputed from the token grid, so there is no position table to resize.

The patch embedding ``net.x_embedder.proj.weight`` changes shape with the patch size (``D x 3*16*16 = 768``
inputs at P = 16, ``D x 3072`` at P = 32); ``--init_patch_embed`` says what happens to it:

* ``reinit`` (default): the new model's own initialisation (xavier-uniform, zero bias); the bias transfers.
* ``upsample``: every weight of the P x P kernel is spread over the (P'/P) x (P'/P) block of pixels it covers at
  P' and divided by (P'/P)^2 (nearest-neighbour upsampling of the kernel, mass-preserving). A 512 image that is a
  nearest-neighbour 2x enlargement of a 256 image then gets exactly the 256 model's token embeddings.

Any other tensor that exists on both sides with another shape, or a tensor of the new model with no counterpart
(other width or depth, another head), is an error that lists them, unless ``--init_from_strict false``, which
keeps the new model's initialisation for them and lists them in the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dip_lightning.checkpoint.compatibility import CheckpointMismatchError
from dip_lightning.checkpoint.io import peek_checkpoint

__all__ = ["InitReport", "PatchEmbedInit", "init_from_checkpoint", "upsample_patch_embed"]

PatchEmbedInit = Literal["reinit", "upsample"]
PATCH_EMBED_KEY = "net.x_embedder.proj.weight"


@dataclass
class InitReport:
    """What :func:`init_from_checkpoint` did."""

    source: str
    transferred: list[str] = field(default_factory=list)
    patch_embed: str | None = None  # "reinit" / "upsample 16 -> 32", None when it transferred unchanged
    kept_init: list[str] = field(default_factory=list)  # new tensors without a counterpart (non-strict only)

    def message(self) -> str:
        text = (
            f"Init from {self.source}: {len(self.transferred)} tensors transferred (weights only, fresh "
            "trainer state)"
        )
        if self.patch_embed:
            text += f"; patch embedding: {self.patch_embed}"
        if self.kept_init:
            text += f"; kept their initialisation: {', '.join(self.kept_init[:8])}"
            text += f" and {len(self.kept_init) - 8} more" if len(self.kept_init) > 8 else ""
        return text + "."


def upsample_patch_embed(weight: Tensor, channels: int, old_patch: int, new_patch: int) -> Tensor:
    """``(D, C*p*p)`` -> ``(D, C*P*P)`` by nearest-neighbour upsampling of each kernel, divided by ``(P/p)^2``.

    Feature order is ``(C, kh, kw)`` (:func:`dip_lightning.core.models.backbone.patchify`).
    """
    if new_patch % old_patch:
        raise ValueError(
            f"--init_patch_embed upsample needs the new patch size ({new_patch}) to be a multiple of "
            f"the checkpoint's ({old_patch})"
        )
    factor = new_patch // old_patch
    dim = weight.shape[0]
    kernel = weight.reshape(dim, channels, old_patch, old_patch)
    kernel = F.interpolate(kernel.float(), scale_factor=factor, mode="nearest") / factor**2
    return kernel.reshape(dim, channels * new_patch * new_patch).to(weight.dtype)


def _source_weights(checkpoint: Mapping, path: str, raw: bool) -> Mapping[str, Tensor]:
    key = "current_model_state" if raw else "state_dict"
    weights = checkpoint.get(key)
    if weights is None and not raw:
        weights = checkpoint.get("current_model_state")
    if weights is None:
        raise CheckpointMismatchError(
            f"--init_from {path}: the file has no {key!r} entry (not a fit checkpoint?)"
        )
    return weights


def init_from_checkpoint(
    module: nn.Module,
    path: str | Path,
    patch_embed: PatchEmbedInit = "reinit",
    strict: bool = True,
    raw: bool = False,
    weights_only: bool = True,
) -> InitReport:
    """Copy matching weights of checkpoint ``path`` into ``module`` (a DiPModule) in place; see the module docstring."""
    if patch_embed not in ("reinit", "upsample"):
        raise ValueError(f"--init_patch_embed must be reinit or upsample, got {patch_embed!r}")
    checkpoint = peek_checkpoint(path, weights_only)
    source = _source_weights(checkpoint, str(path), raw)
    target = module.state_dict()
    report = InitReport(str(path))
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
    problems = wrong_shape + [f"{name}: not in the checkpoint" for name in missing]
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
