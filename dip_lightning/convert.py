"""Convert the released DiP weights (NJU-PCALab/DiP, PixNerd-based training code) to this kit and back.

``python -m dip_lightning convert --from official IN.ckpt --out OUT.ckpt``   (released -> kit)
``python -m dip_lightning convert --from kit IN.ckpt --out OUT.ckpt``        (kit -> released layout)

Why a pure renaming is exact. The kit's network was written to the released module's math (dip-paper.md 1.2,
1.3), and the two layouts differ only in names, never in tensor layout, so no tensor is permuted, reshaped or
recomputed:

* qkv: one ``Linear(D, 3D, bias=False)`` whose output is read as ``(3, heads, head_dim)`` in both;
* 2D RoPE: ``head_dim/4`` frequencies ``theta**(-4k/head_dim)``, rotation pairs interleaved x, y, x, y over
  adjacent feature pairs, positions ``linspace(0, 16, grid)`` on each axis, applied after QK-RMSNorm;
* adaLN: one ``Linear(D, 6D)`` on ``c = silu(t_emb + y_emb)``, chunks (shift, scale, gate) x (attn, mlp);
  the release wraps it in a one-element ``nn.Sequential`` (hence ``adaLN_modulation.0.``);
* class table: ``num_classes + 1`` rows in both, row ``num_classes`` is the null class of CFG;
* Patch Detailer Head: the release's ``LocalDecoder`` (``enc1..4``, ``bottleneck``, ``up4..1``, ``dec4..1``,
  ``out_conv``) is the kit's ``PatchDetailerHead(depth=4, base_channels=64)`` with lists instead of numbered
  attributes; the head sees ``s = silu(t_emb + h)`` tiled over the bottleneck in both.

``tests/test_convert.py`` checks this claim against an independent re-implementation of the released forward.

Key map (released -> kit ``net.``):

=========================================  ========================================
``s_embedder.proj.*``                      ``x_embedder.proj.*``
``t_embedder.mlp.{0,2}.*``                 same
``y_embedder.embedding_table.weight``      same ((num_classes + 1) x D)
``blocks.i.{norm1,norm2,attn.*,mlp.*}``    same
``blocks.i.adaLN_modulation.0.*``          ``blocks.i.adaLN_modulation.*``
``local_decoder.enc{k}.0.*``               ``head.enc.{k-1}.0.*``
``local_decoder.bottleneck.0.*``           ``head.bottleneck.0.*``
``local_decoder.up{k}.*``                  ``head.up.{k-1}.*``
``local_decoder.dec{k}.0.*``               ``head.dec.{k-1}.0.*``
``local_decoder.out_conv.*``               ``head.out.*``
``diffusion_trainer.proj.0.{0,2,4}.*``     REPA projector ``projector.{0,2,4}.*`` (training only)
=========================================  ========================================

Every tensor must map and every expected tensor must be present, with the expected shape; anything else is a
:class:`ConversionError` that lists the keys. Nothing is dropped silently and nothing is left at its init.

The converted kit checkpoint is a Lightning-style file that ``sample``, ``validate``, ``predict`` and
``DiPModule.load_from_checkpoint`` read without ``--config``: ``state_dict`` holds ``net.*`` (the EMA weights
when the source has them), ``current_model_state`` the live weights (when the source has both, as the kit's
EMA callback writes them), ``hyper_parameters`` what LightningCLI stores for ``experiments/dip_xl16.yaml``
(the paper's sampler: Euler 100 steps on the released time grid, CFG 2.9 on (0.11, 0.97)) but with
``repa: null`` and ``compile: false``: an inference checkpoint must not need the DINOv2 weights file, and the
REPA projector is a training-only part. The projector, when the source has it, is kept in the top-level entry
``repa_projector`` for fine-tuning (:func:`load_pretrained`).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "RELEASED_HEAD_WIDTHS",
    "ConversionError",
    "OfficialArch",
    "convert_checkpoint",
    "extract_official_state_dict",
    "infer_official_arch",
    "kit_hyperparameters",
    "kit_to_official",
    "load_pretrained",
    "main",
    "official_layout",
    "official_to_kit",
]

Weights = Literal["auto", "ema", "live"]
Direction = Literal["official_to_kit", "kit_to_official"]

RELEASED_HEAD_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)
"""Channel widths of the released ``LocalDecoder`` stages; fixed in its code (not constructor arguments)."""

_FREQ_EMBED = 256  # sinusoidal timestep features of the released TimestepEmbedder
_MLP_RATIO = 4.0  # FlattenDiTBlock's default; the released DiP class never passes another one

# Top-level groups of the released LightningModel.state_dict() (PixNerd src/lightning_model.py).
_EMA_PREFIX = "ema_denoiser."
_LIVE_PREFIX = "denoiser."
_PROJ_PREFIX = "diffusion_trainer.proj."
# Groups that hold no denoiser weights: the REPA projector is picked up separately; the others have no
# parameters in the released code but may appear in derived checkpoints.
_TRAINING_ONLY_GROUPS = ("diffusion_trainer.", "vae.", "conditioner.", "diffusion_sampler.")
# Wrappers around the released module: DDP/DeepSpeed (`module.`), torch.compile (`_orig_mod.`).
_WRAPPER_COMPONENTS = ("module", "_orig_mod")

# Released REPA projector nn.Sequential(nn.Sequential(Linear, SiLU, Linear, SiLU, Linear)) <-> kit's flat one.
_PROJ_OFFICIAL_TO_KIT = {f"0.{i}.{p}": f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
_PROJ_KIT_TO_OFFICIAL = {v: k for k, v in _PROJ_OFFICIAL_TO_KIT.items()}


class ConversionError(ValueError):
    """The input cannot be converted exactly (unknown, missing or mis-shaped tensors, unknown container)."""


# ----------------------------------------------------------------------------------------------------------
# Key renaming
# ----------------------------------------------------------------------------------------------------------
_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]

_OFFICIAL_TO_KIT_RULES: list[_Rule] = [
    (re.compile(r"^s_embedder\.proj\.(.*)$"), lambda m: f"x_embedder.proj.{m[1]}"),
    (
        re.compile(r"^blocks\.(\d+)\.adaLN_modulation\.0\.(.*)$"),
        lambda m: f"blocks.{m[1]}.adaLN_modulation.{m[2]}",
    ),
    (re.compile(r"^local_decoder\.enc(\d+)\.0\.(.*)$"), lambda m: f"head.enc.{int(m[1]) - 1}.0.{m[2]}"),
    (re.compile(r"^local_decoder\.bottleneck\.0\.(.*)$"), lambda m: f"head.bottleneck.0.{m[1]}"),
    (re.compile(r"^local_decoder\.up(\d+)\.(.*)$"), lambda m: f"head.up.{int(m[1]) - 1}.{m[2]}"),
    (re.compile(r"^local_decoder\.dec(\d+)\.0\.(.*)$"), lambda m: f"head.dec.{int(m[1]) - 1}.0.{m[2]}"),
    (re.compile(r"^local_decoder\.out_conv\.(.*)$"), lambda m: f"head.out.{m[1]}"),
]
_KIT_TO_OFFICIAL_RULES: list[_Rule] = [
    (re.compile(r"^x_embedder\.proj\.(.*)$"), lambda m: f"s_embedder.proj.{m[1]}"),
    (
        re.compile(r"^blocks\.(\d+)\.adaLN_modulation\.(weight|bias)$"),
        lambda m: f"blocks.{m[1]}.adaLN_modulation.0.{m[2]}",
    ),
    (re.compile(r"^head\.enc\.(\d+)\.0\.(.*)$"), lambda m: f"local_decoder.enc{int(m[1]) + 1}.0.{m[2]}"),
    (re.compile(r"^head\.bottleneck\.0\.(.*)$"), lambda m: f"local_decoder.bottleneck.0.{m[1]}"),
    (re.compile(r"^head\.up\.(\d+)\.(.*)$"), lambda m: f"local_decoder.up{int(m[1]) + 1}.{m[2]}"),
    (re.compile(r"^head\.dec\.(\d+)\.0\.(.*)$"), lambda m: f"local_decoder.dec{int(m[1]) + 1}.0.{m[2]}"),
    (re.compile(r"^head\.out\.(.*)$"), lambda m: f"local_decoder.out_conv.{m[1]}"),
]


def _rename(key: str, rules: list[_Rule]) -> str:
    """Apply the first matching rule; keys no rule matches keep their name (they are the same in both)."""
    for pattern, repl in rules:
        m = pattern.match(key)
        if m:
            return repl(m)
    return key


# ----------------------------------------------------------------------------------------------------------
# The released layout
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OfficialArch:
    """The constructor arguments of the released ``DiP`` that shape its state dict (all inferable from it)."""

    hidden_size: int
    depth: int  # the release's num_cond_blocks (its num_blocks is unused)
    num_heads: int  # the release's num_groups
    patch_size: int
    in_channels: int
    num_classes: int  # real classes; the table has one more row, the null class

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU width of the released FeedForward: int(2/3 * int(D * 4))."""
        return int(2 * int(self.hidden_size * _MLP_RATIO) / 3)

    def describe(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, depth={self.depth}, num_heads={self.num_heads}, "
            f"patch_size={self.patch_size}, in_channels={self.in_channels}, num_classes={self.num_classes}"
        )

    def default_input_size(self) -> int:
        """256 for /16 and 512 for /32 (the paper's resolutions), else 16 patches per side."""
        return {16: 256, 32: 512}.get(self.patch_size, 16 * self.patch_size)

    def dip_kwargs(self, input_size: int | None = None) -> dict[str, Any]:
        """Keyword arguments of :class:`dip_lightning.models.DiP` that compute the released function."""
        from dip_lightning.models.heads import PatchDetailerHead

        return {
            "input_size": input_size or self.default_input_size(),
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "hidden_size": self.hidden_size,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": _MLP_RATIO,
            "num_classes": self.num_classes,
            "head": PatchDetailerHead,  # defaults: depth 4, base 64, max 512 = RELEASED_HEAD_WIDTHS
            "placement": "post_hoc",
            "rope_theta": 10000.0,
            "rope_scale": 16.0,
            "qk_norm": True,
            "time_max_period": 10.0,
        }

    def model_name(self) -> str | None:
        """The registry name (``DiP-XL/16`` ...) of this architecture, if it has one."""
        from dip_lightning.models.registry import MODEL_CONFIGS

        for name, cfg in MODEL_CONFIGS.items():
            if (
                name.startswith("DiP-")
                and cfg["hidden_size"] == self.hidden_size
                and cfg["depth"] == self.depth
                and cfg["num_heads"] == self.num_heads
                and cfg["patch_size"] == self.patch_size
                and self.in_channels == 3
                and self.num_classes == 1000
            ):
                return name
        return None


def official_layout(arch: OfficialArch) -> dict[str, tuple[int, ...]]:
    """Every tensor of the released ``DiP`` module (``src/models/transformer/dip.py``) with its shape."""
    d, c, p, hd, hm = arch.hidden_size, arch.in_channels, arch.patch_size, arch.head_dim, arch.mlp_hidden
    layout: dict[str, tuple[int, ...]] = {
        "s_embedder.proj.weight": (d, c * p * p),
        "s_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, _FREQ_EMBED),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (arch.num_classes + 1, d),
    }
    for i in range(arch.depth):
        b = f"blocks.{i}."
        layout |= {
            b + "norm1.weight": (d,),
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.q_norm.weight": (hd,),
            b + "attn.k_norm.weight": (hd,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,),
            b + "mlp.w1.weight": (hm, d),
            b + "mlp.w3.weight": (hm, d),
            b + "mlp.w2.weight": (d, hm),
            b + "adaLN_modulation.0.weight": (6 * d, d),
            b + "adaLN_modulation.0.bias": (6 * d,),
        }
    w = RELEASED_HEAD_WIDTHS
    above = (w[0], *w[:-1])  # each decoder stage maps to the width of the stage above (64 on top)
    for k, (c_in, c_out) in enumerate(zip((c, *w[:-1]), w), start=1):
        layout |= {
            f"local_decoder.enc{k}.0.weight": (c_out, c_in, 3, 3),
            f"local_decoder.enc{k}.0.bias": (c_out,),
        }
    layout |= {
        "local_decoder.bottleneck.0.weight": (w[-1], w[-1] + d, 1, 1),
        "local_decoder.bottleneck.0.bias": (w[-1],),
    }
    for k, (width, a) in enumerate(zip(w, above), start=1):
        layout |= {
            f"local_decoder.up{k}.weight": (width, width, 2, 2),
            f"local_decoder.up{k}.bias": (width,),
            f"local_decoder.dec{k}.0.weight": (a, 2 * width, 3, 3),
            f"local_decoder.dec{k}.0.bias": (a,),
        }
    layout |= {"local_decoder.out_conv.weight": (c, w[0], 1, 1), "local_decoder.out_conv.bias": (c,)}
    return layout


_ANCHORS = (
    "s_embedder.proj.weight",
    "y_embedder.embedding_table.weight",
    "blocks.0.attn.q_norm.weight",
    "local_decoder.out_conv.weight",
)


def _preview(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def infer_official_arch(state_dict: Mapping[str, Tensor], names: str = "released") -> OfficialArch:
    """Read the released constructor arguments off the shapes of a released-layout state dict.

    ``names`` only words the error (``"released"`` or ``"kit"``) when the anchor tensors are missing.
    """
    missing = [k for k in _ANCHORS if k not in state_dict]
    if missing:
        shown = [_rename(k, _OFFICIAL_TO_KIT_RULES) for k in missing] if names == "kit" else missing
        looks_kit = any(k.startswith(("x_embedder.", "net.x_embedder.")) for k in state_dict)
        hint = (
            " It looks like a kit checkpoint: convert it with --from kit."
            if names != "kit" and looks_kit
            else ""
        )
        raise ConversionError(
            f"this is not a {'kit DiP' if names == 'kit' else 'released DiP'} state dict: it lacks {shown}, "
            f"which give its size. Its keys look like [{_preview(sorted(state_dict), 6)}]. If they carry a "
            "prefix this converter does not strip, remove it first (known: 'denoiser.', 'ema_denoiser.', "
            "'module.', '_orig_mod.')." + hint
        )
    d, in_feat = state_dict["s_embedder.proj.weight"].shape
    c = state_dict["local_decoder.out_conv.weight"].shape[0]
    head_dim = state_dict["blocks.0.attn.q_norm.weight"].shape[0]
    patch = round((in_feat / c) ** 0.5) if c else 0
    if c == 0 or c * patch * patch != in_feat or head_dim == 0 or d % head_dim:
        raise ConversionError(
            f"inconsistent shapes: patch embedding {tuple(state_dict['s_embedder.proj.weight'].shape)}, "
            f"output conv {tuple(state_dict['local_decoder.out_conv.weight'].shape)}, q_norm ({head_dim},): "
            "no (in_channels, patch_size, num_heads) fits them."
        )
    blocks = [int(m[1]) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))]
    return OfficialArch(
        hidden_size=int(d),
        depth=max(blocks) + 1,
        num_heads=int(d // head_dim),
        patch_size=int(patch),
        in_channels=int(c),
        num_classes=int(state_dict["y_embedder.embedding_table.weight"].shape[0]) - 1,
    )


def _check_layout(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], what: str, arch: OfficialArch
) -> None:
    """Raise a :class:`ConversionError` naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {expected[k]})"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{what} does not match the released DiP layout for {arch.describe()} (read off its shapes):"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {_preview(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_preview(unexpected)}")
    if wrong:
        lines.append(f"  wrong shape ({len(wrong)}): {_preview(wrong)}")
    lines.append(
        "Nothing was converted: every tensor must map exactly. A renamed key must get its released name back "
        "(see the key map in dip_lightning/convert.py); a missing one means the file is incomplete or not a "
        "DiP denoiser; the released head (LocalDecoder) has fixed widths 64-128-256-512 and the released "
        "blocks a SwiGLU of ratio 4."
    )
    raise ConversionError("\n".join(lines))


def official_to_kit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released denoiser state dict (bare keys, e.g. ``s_embedder.proj.weight``) -> kit ``DiP`` state dict.

    The tensors are the same objects (a renaming, see the module docstring for why that is exact). Raises
    :class:`ConversionError` listing the keys when the input is not exactly the released layout.
    """
    arch = infer_official_arch(state_dict)
    _check_layout(state_dict, official_layout(arch), "the released state dict", arch)
    return {_rename(k, _OFFICIAL_TO_KIT_RULES): v for k, v in state_dict.items()}


def kit_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Kit ``DiP`` state dict (``model.net.state_dict()``, no ``net.`` prefix) -> released denoiser layout.

    Only models the released module can compute convert: post-hoc ``PatchDetailerHead`` of depth 4 and base
    width 64, SwiGLU ratio 4, QK-norm on. Errors name the offending keys in the kit's names.
    """
    as_official = {_rename(k, _KIT_TO_OFFICIAL_RULES): v for k, v in state_dict.items()}
    arch = infer_official_arch(as_official, names="kit")
    expected = {_rename(k, _OFFICIAL_TO_KIT_RULES): s for k, s in official_layout(arch).items()}
    _check_layout(state_dict, expected, "the kit state dict", arch)
    return as_official


# ----------------------------------------------------------------------------------------------------------
# Containers: bare / Lightning / prefixes / EMA
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _OfficialParts:
    ema: dict[str, Tensor] | None
    live: dict[str, Tensor] | None
    projector: dict[str, Tensor] | None  # released names inside the projector (0.0.weight ...)
    container: str
    grouped: bool  # the released training code's 'denoiser.'/'ema_denoiser.' groups were found
    notes: list[str] = field(default_factory=list)


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _strip_wrappers(key: str) -> str:
    """Drop DDP (``module.``) and torch.compile (``_orig_mod.``) path components (no DiP module has these)."""
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_COMPONENTS)


def _split_official(obj: Any) -> _OfficialParts:
    """Find the released denoiser weights (EMA and live) and the REPA projector in a loaded file."""
    if isinstance(obj, Mapping) and "state_dict" in obj and _is_tensor_dict(obj["state_dict"]):
        raw, container = obj["state_dict"], "Lightning checkpoint ('state_dict')"
    elif _is_tensor_dict(obj):
        raw, container = obj, "bare state dict"
    else:
        top = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConversionError(
            f"cannot find a state dict in this file (top level: {top}). Expected a bare state dict of "
            "tensors or a Lightning checkpoint whose 'state_dict' holds the released module under "
            "'denoiser.' / 'ema_denoiser.'."
        )
    sd: dict[str, Tensor] = {}
    for key, value in raw.items():
        new = _strip_wrappers(key)
        if new in sd:
            raise ConversionError(
                f"two tensors map to {new!r} once wrapper prefixes are removed (e.g. {key!r})"
            )
        sd[new] = value
    stripped = sorted({k for k in raw if _strip_wrappers(k) != k})
    notes = (
        [f"removed wrapper prefixes ('module.', '_orig_mod.') from {len(stripped)} keys"] if stripped else []
    )

    grouped = any(k.startswith((_EMA_PREFIX, _LIVE_PREFIX)) for k in sd)
    if not grouped:
        return _OfficialParts(
            ema=None, live=sd, projector=None, container=container, grouped=False, notes=notes
        )

    ema = {k[len(_EMA_PREFIX) :]: v for k, v in sd.items() if k.startswith(_EMA_PREFIX)}
    live = {k[len(_LIVE_PREFIX) :]: v for k, v in sd.items() if k.startswith(_LIVE_PREFIX)}
    projector = {k[len(_PROJ_PREFIX) :]: v for k, v in sd.items() if k.startswith(_PROJ_PREFIX)}
    rest = [k for k in sd if not k.startswith((_EMA_PREFIX, _LIVE_PREFIX, _PROJ_PREFIX))]
    unknown = [k for k in rest if not k.startswith(_TRAINING_ONLY_GROUPS)]
    if unknown:
        raise ConversionError(
            f"the {container} has tensors outside the released groups 'denoiser.', 'ema_denoiser.' and "
            f"'diffusion_trainer.': {_preview(sorted(unknown))}. They are not part of the released layout; "
            "remove them (or strip their prefix if they are the denoiser) and convert again."
        )
    if rest:
        notes.append(f"ignored {len(rest)} training-only tensors ({_preview(sorted(rest), 4)})")
    if ema and live and set(ema) != set(live):
        diff = sorted(set(ema) ^ set(live))
        raise ConversionError(f"'denoiser.' and 'ema_denoiser.' hold different keys: {_preview(diff)}")
    bad_proj = sorted(set(projector) - set(_PROJ_OFFICIAL_TO_KIT))
    if bad_proj:
        raise ConversionError(
            f"unexpected tensors in the REPA projector '{_PROJ_PREFIX}': {_preview(bad_proj)} (expected "
            f"{sorted(_PROJ_OFFICIAL_TO_KIT)})"
        )
    if projector and set(projector) != set(_PROJ_OFFICIAL_TO_KIT):
        missing = sorted(set(_PROJ_OFFICIAL_TO_KIT) - set(projector))
        raise ConversionError(f"the REPA projector '{_PROJ_PREFIX}' is incomplete: missing {missing}")
    return _OfficialParts(
        ema=ema or None,
        live=live or None,
        projector=projector or None,
        container=container,
        grouped=True,
        notes=notes,
    )


def _choose(parts: _OfficialParts, weights: Weights) -> tuple[dict[str, Tensor], str]:
    """The weights to convert and a sentence saying which they are."""
    if weights not in ("auto", "ema", "live"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'live', got {weights!r}")
    if not parts.grouped:
        assert parts.live is not None
        return parts.live, (
            "unprefixed weights, taken as they are (whether they are the EMA copy, which the release samples "
            "with, cannot be told from the file)"
        )
    if weights in ("auto", "ema") and parts.ema is not None:
        also = " (the live 'denoiser.*' weights are also present)" if parts.live is not None else ""
        return parts.ema, f"EMA weights 'ema_denoiser.*'{also}"
    if weights == "ema":
        raise ConversionError(
            "no EMA weights ('ema_denoiser.*') in this file; pass weights='live' (--weights live) to convert "
            "the live weights it has."
        )
    if parts.live is None:
        raise ConversionError(
            "no live weights ('denoiser.*') in this file; use weights='ema' (--weights ema)."
        )
    return parts.live, "live weights 'denoiser.*'" + (
        " (no EMA copy in the file)" if parts.ema is None else ""
    )


def extract_official_state_dict(obj: Any, weights: Weights = "auto") -> tuple[dict[str, Tensor], str]:
    """The released denoiser state dict (bare keys) inside what ``torch.load`` returned, and its origin.

    Accepts a bare state dict, a Lightning checkpoint (``state_dict``), the released training code's groups
    ``denoiser.`` (live) and ``ema_denoiser.`` (EMA), and the wrappers ``module.`` (DDP) and ``_orig_mod.``
    (torch.compile). ``weights="auto"`` takes the EMA copy when there is one (the release samples with it),
    else the live one; ``"ema"``/``"live"`` insist. The returned text says which was taken.
    """
    parts = _split_official(obj)
    sd, which = _choose(parts, weights)
    return sd, "; ".join([f"{parts.container}: {which}", *parts.notes])


# ----------------------------------------------------------------------------------------------------------
# Hyper-parameters of the converted checkpoint
# ----------------------------------------------------------------------------------------------------------
def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def kit_hyperparameters(arch: OfficialArch, input_size: int | None = None) -> dict[str, Any]:
    """``hyper_parameters`` as LightningCLI stores them for ``experiments/dip_xl16.yaml``, for this arch.

    The recipe is the paper's (sampler: Euler, 100 steps, released time grid, CFG 2.9 on (0.11, 0.97); flow
    and optimizer of dip_xl16.yaml) with ``repa: null`` and ``compile: false`` (see the module docstring). The
    dict goes through the same jsonargparse normalisation as the CLI's, so ``DiPModule.load_from_checkpoint``
    and ``validate``/``predict --ckpt_path`` rebuild the module from it.
    """
    from jsonargparse import ArgumentParser

    from dip_lightning.module import DiPModule  # also enables sampler subclasses in jsonargparse

    kwargs = arch.dip_kwargs(input_size)
    net_args = {k: v for k, v in kwargs.items() if k != "head"}
    raw = {
        "net": {
            "class_path": "dip_lightning.models.DiP",
            "init_args": {
                **net_args,
                "init": "official",
                "head": {
                    "class_path": "dip_lightning.models.heads.PatchDetailerHead",
                    "init_args": {"depth": 4, "base_channels": RELEASED_HEAD_WIDTHS[0]},
                },
            },
        },
        "flow": {"t_mean": 0.0, "t_std": 1.0, "time_shift": 1.0, "label_dropout": 0.1},
        "sampler": {
            "class_path": "dip_lightning.diffusion.EulerSampler",
            "init_args": {
                "num_steps": 100,
                "cfg_scale": 2.9,
                "cfg_interval": [0.11, 0.97],
                "time_grid": "released",
            },
        },
        "repa": None,
        "optimizer": {
            "class_path": "torch.optim.AdamW",
            "init_args": {
                "lr": 1.0e-4,
                "betas": [0.9, 0.999],
                "eps": 1.0e-8,
                "weight_decay": 0.0,
                "fused": True,
            },
        },
        "compile": False,
    }
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DiPModule, "model", fail_untyped=False)
    cfg = parser.parse_object({"model": raw})
    hparams = _lists(cfg.as_dict()["model"])
    hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    return hparams


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def _load(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """torch.load on CPU, memory-mapped when possible (a 632M checkpoint with optimizer states is ~10 GB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise ConversionError(
                f"{path} holds Python objects besides tensors, which torch.load(weights_only=True) refuses "
                f"({str(err).splitlines()[0]}). If you trust the file, pass --trust_pickle "
                "(trust_pickle=True)."
            ) from err
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def _save_atomic(obj: Any, path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it (nothing was written).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _kit_parts(obj: Any) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, Tensor] | None, str]:
    """(sampling weights, raw weights or None, projector (kit names) or None, text) of a kit file."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        sd = obj["state_dict"]
        net = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
        proj = {k[len("repa.projector.") :]: v for k, v in sd.items() if k.startswith("repa.projector.")}
        rest = [k for k in sd if not k.startswith(("net.", "repa.projector.", "repa.encoder."))]
        if rest:
            raise ConversionError(
                f"the kit checkpoint has tensors this converter does not know: {_preview(sorted(rest))}"
            )
        if not proj and isinstance(obj.get("repa_projector"), Mapping):
            proj = dict(obj["repa_projector"])
        raw = obj.get("current_model_state")
        raw_net = (
            {k[4:]: v for k, v in raw.items() if k.startswith("net.")} if isinstance(raw, Mapping) else None
        )
        text = "kit checkpoint: 'state_dict' net.* (EMA when trained with the EMA callback)"
        conversion = obj.get("dip_conversion")
        if isinstance(conversion, Mapping):
            text = f"kit checkpoint converted from {conversion.get('source')}: {conversion.get('weights')}"
        if raw_net:
            text += "; 'current_model_state' net.* (raw weights)"
        return net, raw_net or None, proj or None, text
    if _is_tensor_dict(obj):
        sd = {k[4:] if k.startswith("net.") else k: v for k, v in obj.items()}
        return sd, None, None, "bare kit state dict"
    raise ConversionError("cannot find a kit state dict: expected a Lightning checkpoint or a DiP state dict")


def _check_released_options(hparams: Mapping[str, Any] | None) -> list[str]:
    """Net options that change the function but no tensor name; the release has fixed values for them."""
    if not hparams:
        return []
    net = hparams.get("net") or {}
    args = net.get("init_args", {}) if isinstance(net, Mapping) else {}
    released = {
        "rope_theta": 10000.0,
        "rope_scale": 16.0,
        "qk_norm": True,
        "time_max_period": 10.0,
        "placement": "post_hoc",
    }
    problems = [
        f"{k}={args[k]!r} (released: {v!r})" for k, v in released.items() if k in args and args[k] != v
    ]
    head = args.get("head") or {}
    if isinstance(head, Mapping):
        if head.get("class_path", "").rsplit(".", 1)[-1] not in ("PatchDetailerHead", ""):
            problems.append(f"head={head.get('class_path')} (released: PatchDetailerHead)")
        token_input = (head.get("init_args") or {}).get("token_input", "silu_temb")
        if token_input != "silu_temb":
            problems.append(f"head token_input={token_input!r} (released: 'silu_temb')")
    return problems


def convert_checkpoint(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    direction: Direction = "official_to_kit",
    weights: Weights = "auto",
    input_size: int | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
) -> str:
    """Convert a checkpoint file; returns a summary of what was read and written.

    ``official_to_kit``: a released file (any container :func:`extract_official_state_dict` accepts) -> a kit
    checkpoint for ``sample``/``validate``/``predict``/``load_from_checkpoint`` (see the module docstring).
    ``weights`` picks EMA or live weights for ``state_dict``; when the source has both, the other copy goes
    to ``current_model_state`` only if ``state_dict`` holds the EMA (the kit's convention).
    ``input_size`` is bookkeeping only (RoPE follows the input); default 256 for /16, 512 for /32.

    ``kit_to_official``: a kit checkpoint (or ``net`` state dict) -> ``{"state_dict": {"ema_denoiser.*",
    "denoiser.*", "diffusion_trainer.proj.*"}}``, the layout the released code loads (its ``ModelLoader``
    reads ``state_dict['ema_denoiser.' + name]``). ``ema_denoiser.`` gets the kit's ``state_dict`` weights
    (EMA when trained with the EMA callback), ``denoiser.`` the raw ones when present, else the same weights.
    """
    from lightning import __version__ as lightning_version

    in_path, out_path = Path(in_path), Path(out_path)
    obj = _load(in_path, trust_pickle=trust_pickle)
    if direction == "official_to_kit":
        parts = _split_official(obj)
        chosen, which = _choose(parts, weights)
        net = official_to_kit(chosen)
        arch = infer_official_arch(chosen)
        checkpoint: dict[str, Any] = {
            "epoch": 0,
            "global_step": 0,
            "pytorch-lightning_version": lightning_version,
            "state_dict": {f"net.{k}": v for k, v in net.items()},
            "hparams_name": "kwargs",
            "hyper_parameters": kit_hyperparameters(arch, input_size),
        }
        lines = [f"read {in_path}: {parts.container}: {which}", *parts.notes]
        if chosen is parts.ema and parts.live is not None:
            checkpoint["current_model_state"] = {
                f"net.{k}": v for k, v in official_to_kit(parts.live).items()
            }
            lines.append("live weights -> 'current_model_state' (sample --raw_weights)")
        if parts.projector is not None:
            checkpoint["repa_projector"] = {_PROJ_OFFICIAL_TO_KIT[k]: v for k, v in parts.projector.items()}
            lines.append("REPA projector -> 'repa_projector' (training only; used by load_pretrained)")
        name = arch.model_name() or f"DiP ({arch.describe()})"
        checkpoint["dip_conversion"] = {
            "from": "official",
            "source": str(in_path),
            "weights": which,
            "model": name,
        }
        lines.append(f"model: {name}, {sum(v.numel() for v in net.values()) / 1e6:.1f}M parameters")
    elif direction == "kit_to_official":
        net, raw, proj, text = _kit_parts(obj)
        problems = _check_released_options(obj.get("hyper_parameters") if isinstance(obj, Mapping) else None)
        if problems:
            raise ConversionError(
                "this kit model computes a function the released module cannot: " + ", ".join(problems)
            )
        ema_official = kit_to_official(net)
        live_official = kit_to_official(raw) if raw is not None else ema_official
        state = {f"{_EMA_PREFIX}{k}": v for k, v in ema_official.items()}
        state |= {f"{_LIVE_PREFIX}{k}": v for k, v in live_official.items()}
        lines = [f"read {in_path}: {text}", "'state_dict' weights -> 'ema_denoiser.*'"]
        lines.append(
            "raw weights -> 'denoiser.*'"
            if raw is not None
            else "no raw weights: 'denoiser.*' = same weights"
        )
        if proj is not None:
            unknown = sorted(set(proj) - set(_PROJ_KIT_TO_OFFICIAL))
            if unknown or len(proj) != len(_PROJ_KIT_TO_OFFICIAL):
                raise ConversionError(f"unexpected REPA projector layout: {sorted(proj)}")
            state |= {_PROJ_PREFIX + _PROJ_KIT_TO_OFFICIAL[k]: v for k, v in proj.items()}
            lines.append("REPA projector -> 'diffusion_trainer.proj.*'")
        checkpoint = {"state_dict": state, "dip_conversion": {"from": "kit", "source": str(in_path)}}
    else:
        raise ValueError(f"direction must be 'official_to_kit' or 'kit_to_official', got {direction!r}")
    _save_atomic(checkpoint, out_path, overwrite)
    lines.append(f"wrote {out_path}")
    return "\n".join(lines)


def load_pretrained(
    target: nn.Module, path: str | os.PathLike, weights: Weights = "auto", trust_pickle: bool = False
) -> str:
    """Load released or converted DiP weights into a ``DiPModule`` (or a bare ``DiP``), strictly: fine-tuning.

    ``path`` may be a released file (converted on the fly) or a kit checkpoint (``convert`` output or a kit
    training checkpoint). The network must have the file's architecture (build it from
    ``experiments/dip_xl16.yaml``). When ``target`` has REPA and the file has the projector, the projector is
    loaded too; otherwise the projector keeps its init, which the returned text says.
    """
    obj = _load(path, trust_pickle=trust_pickle)
    sd_obj = obj.get("state_dict") if isinstance(obj, Mapping) else None
    is_kit = isinstance(sd_obj, Mapping) and any(k.startswith("net.") for k in sd_obj)
    if is_kit:
        net_sd, raw, proj, text = _kit_parts(obj)
        if weights == "live":
            if raw is None:
                raise ConversionError(f"{path} has no raw weights ('current_model_state')")
            net_sd, text = raw, text + "; took the raw weights"
    else:
        parts = _split_official(obj)
        chosen, text = _choose(parts, weights)
        net_sd = official_to_kit(chosen)
        proj = {_PROJ_OFFICIAL_TO_KIT[k]: v for k, v in parts.projector.items()} if parts.projector else None
    net = getattr(target, "net", target)
    missing, unexpected = net.load_state_dict(net_sd, strict=False)
    if missing or unexpected:
        raise ConversionError(
            f"{path} does not fit this network: missing {_preview(sorted(missing))}; unexpected "
            f"{_preview(sorted(unexpected))}. Build the network with the file's architecture."
        )
    lines = [f"loaded the network from {path} ({text})"]
    repa = getattr(target, "repa", None)
    projector = getattr(repa, "projector", None)
    if projector is not None and proj is not None:
        projector.load_state_dict(proj, strict=True)
        lines.append("loaded the REPA projector")
    elif projector is not None:
        lines.append("the file has no REPA projector: it starts from its init")
    elif proj is not None:
        lines.append("the module has no REPA: the file's projector was not used")
    return "; ".join(lines)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dip_lightning convert",
        description="Convert released DiP weights (NJU-PCALab/DiP) to this kit's checkpoint, or back.",
    )
    p.add_argument("input", help="checkpoint to read")
    p.add_argument(
        "--from",
        dest="source",
        choices=["official", "kit"],
        required=True,
        help="layout of the input: 'official' (released code) -> kit checkpoint; 'kit' -> released layout",
    )
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument(
        "--weights",
        choices=["auto", "ema", "live"],
        default="auto",
        help="official input: which copy goes to state_dict (auto = EMA when present)",
    )
    p.add_argument("--input_size", type=int, default=None, help="image size recorded in the kit config")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--trust_pickle",
        action="store_true",
        help="allow a file with pickled Python objects (trusted files only)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    direction: Direction = "official_to_kit" if args.source == "official" else "kit_to_official"
    try:
        summary = convert_checkpoint(
            args.input,
            args.out,
            direction=direction,
            weights=args.weights,
            input_size=args.input_size,
            overwrite=args.overwrite,
            trust_pickle=args.trust_pickle,
        )
    except (ConversionError, FileNotFoundError, FileExistsError) as err:
        print(f"convert: error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
