"""Convert the released DiP weights (NJU-PCALab/DiP, PixNerd-based training code) to this kit and back.

``python -m dip_lightning convert --from official IN.ckpt --out OUT.ckpt``   (released -> kit)
``python -m dip_lightning convert --from kit IN.ckpt --out OUT.ckpt``        (kit -> released layout)

A pure renaming of tensors (the layouts differ in names only) built from the kit's own network and the shipped
experiment, never restated here; why that is exact and what the converted file holds: docs/design.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor, nn

from dip_lightning.checkpoint.compatibility import check_compatible
from dip_lightning.checkpoint.format import CONVERSION_RECORD, RAW_WEIGHTS, STATE_DICT, select_weights
from dip_lightning.checkpoint.io import CheckpointError, read_checkpoint
from dip_lightning.checkpoint.pretrained import read_pretrained_config, read_pretrained_weights
from dip_lightning.core.atomic import atomic_write
from dip_lightning.core.errors import ConfigError, KitError
from dip_lightning.core.recipes import recipe_path
from dip_lightning.training.loading import module_from_hparams

__all__ = [
    "KEY_MAP",
    "RELEASED_EXPERIMENT",
    "ConversionError",
    "OfficialArch",
    "convert_checkpoint",
    "extract_official_state_dict",
    "infer_official_arch",
    "kit_hyperparameters",
    "kit_to_official",
    "kit_weights",
    "official_layout",
    "official_to_kit",
    "released_to_kit",
    "rename",
]

Weights = Literal["auto", "ema", "live"]
Direction = Literal["official_to_kit", "kit_to_official"]
Names = Literal["released", "kit"]

RELEASED_EXPERIMENT = recipe_path("dip_xl16")
"""The experiment whose ``model`` is the released DiP (REPA and compilation aside); its network sizes are
replaced by those read off the file being converted."""

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

# Options of the network that change its function but no tensor name or shape: a kit model has a released
# equivalent only with the values RELEASED_EXPERIMENT gives them.
_FUNCTION_OPTIONS = (
    "placement",
    "rope_theta",
    "rope_scale",
    "qk_norm",
    "pos_embed",
    "time_max_period",
    "head.class_path",
    "head.init_args.token_input",
)


class ConversionError(KitError, ValueError):
    """The input cannot be converted exactly (unknown, missing or mis-shaped tensors, unknown container)."""


# ----------------------------------------------------------------------------------------------------------
# The key map, both ways
# ----------------------------------------------------------------------------------------------------------
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("s_embedder.proj.*", "x_embedder.proj.*"),
    ("blocks.<i>.adaLN_modulation.0.*", "blocks.<i>.adaLN_modulation.*"),
    ("local_decoder.enc<k>.0.*", "head.enc.<k>.0.*"),
    ("local_decoder.bottleneck.0.*", "head.bottleneck.0.*"),
    ("local_decoder.up<k>.*", "head.up.<k>.*"),
    ("local_decoder.dec<k>.0.*", "head.dec.<k>.0.*"),
    ("local_decoder.out_conv.*", "head.out.*"),
)
"""(released name, kit name inside ``net.``) pairs: ``<i>`` is a block index (the same in both), ``<k>`` a head
stage (counted from 1 in the release, from 0 in the kit), ``*`` the rest of the name. Every name not listed is
the same in both (``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``, ``blocks.<i>.{norm1, norm2, attn,
mlp}``)."""

_FIRST_STAGE: dict[str, int] = {"released": 1, "kit": 0}


def _pattern(template: str) -> re.Pattern[str]:
    regex = re.escape(template).replace(r"\*", r"(?P<rest>.+)")
    return re.compile("^" + regex.replace("<i>", r"(?P<i>\d+)").replace("<k>", r"(?P<k>\d+)") + "$")


_RULES = [{"released": (_pattern(r), r), "kit": (_pattern(k), k)} for r, k in KEY_MAP]


def rename(key: str, to: Names) -> str:
    """``key`` in the other layout's name (``to`` says which); names :data:`KEY_MAP` does not list stay."""
    source = "kit" if to == "released" else "released"
    for rule in _RULES:
        match = rule[source][0].match(key)
        if match:
            groups = match.groupdict()
            name = rule[to][1].replace("*", groups["rest"]).replace("<i>", groups.get("i") or "")
            if groups.get("k") is not None:
                name = name.replace("<k>", str(int(groups["k"]) - _FIRST_STAGE[source] + _FIRST_STAGE[to]))
            return name
    return key


# ----------------------------------------------------------------------------------------------------------
# The released model: sizes read off the shapes, everything else from RELEASED_EXPERIMENT
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

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items())

    def model_name(self) -> str | None:
        """The registry name (``DiP-XL/16`` ...) of this architecture, if it has one."""
        from dip_lightning.core.models.registry import MODEL_CONFIGS

        for name, cfg in MODEL_CONFIGS.items():
            sizes = {k: cfg[k] for k in ("hidden_size", "depth", "num_heads", "patch_size")}
            if name.startswith("DiP-") and vars(self) == {**sizes, "in_channels": 3, "num_classes": 1000}:
                return name
        return None


_ANCHORS = (
    "s_embedder.proj.weight",
    "y_embedder.embedding_table.weight",
    "blocks.0.attn.q_norm.weight",
    "local_decoder.out_conv.weight",
)


def _preview(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def infer_official_arch(state_dict: Mapping[str, Tensor], names: Names = "released") -> OfficialArch:
    """Read the released constructor arguments off the shapes of a released-layout state dict.

    ``names`` only words the error (the layout the caller was given) when the anchor tensors are missing.
    """
    missing = [k for k in _ANCHORS if k not in state_dict]
    if missing:
        shown = [rename(k, "kit") for k in missing] if names == "kit" else missing
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


def kit_hyperparameters(arch: OfficialArch, input_size: int | None = None) -> dict[str, Any]:
    """``hyper_parameters`` as LightningCLI stores them for :data:`RELEASED_EXPERIMENT` at this arch's sizes, with
    ``repa: null`` and ``compile: false`` (docs/design.md). ``input_size`` is bookkeeping only (RoPE follows
    the input); default: the experiment's 16 patches per side at this patch size.
    """
    from jsonargparse import ArgumentParser

    from dip_lightning.training.module import DiPModule

    model = yaml.safe_load(RELEASED_EXPERIMENT.read_text())["model"]
    net_args = model["net"]["init_args"]
    patches_per_side = net_args["input_size"] // net_args["patch_size"]
    net_args |= vars(arch) | {"input_size": input_size or patches_per_side * arch.patch_size}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DiPModule, "model", fail_untyped=False)
    config = parser.parse_object({"model": model | {"repa": None, "compile": False}})
    return yaml.safe_load(parser.dump(config, skip_none=False))["model"] | {
        "_instantiator": "lightning.pytorch.cli.instantiate_module"
    }


@functools.lru_cache(maxsize=8)
def official_layout(arch: OfficialArch) -> dict[str, tuple[int, ...]]:
    """Every tensor of the released ``DiP`` module (``src/models/transformer/dip.py``) with its shape: the
    kit's network for :func:`kit_hyperparameters`, built on the meta device, in released names."""
    try:
        with torch.device("meta"):
            net = module_from_hparams(kit_hyperparameters(arch)).net
    except (ValueError, TypeError) as err:
        raise ConversionError(f"no released DiP has {arch.describe()}: {err}") from err
    return {rename(k, "released"): tuple(v.shape) for k, v in net.state_dict().items()}


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
        "(dip_lightning.training.released.KEY_MAP); a missing one means the file is incomplete or not a DiP denoiser; "
        "the released head and blocks have the sizes of experiments/dip_xl16.yaml (Patch Detailer Head of 4 "
        "stages from 64 channels, SwiGLU ratio 4)."
    )
    raise ConversionError("\n".join(lines))


def official_to_kit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released denoiser state dict (bare keys, e.g. ``s_embedder.proj.weight``) -> kit ``DiP`` state dict.

    The tensors are the same objects (a renaming, docs/design.md says why that is exact). Raises
    :class:`ConversionError` listing the keys when the input is not exactly the released layout.
    """
    arch = infer_official_arch(state_dict)
    _check_layout(state_dict, official_layout(arch), "the released state dict", arch)
    return {rename(k, "kit"): v for k, v in state_dict.items()}


def kit_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Kit ``DiP`` state dict (``model.net.state_dict()``, no ``net.`` prefix) -> released denoiser layout.

    Only models the released module can compute convert (the network of :data:`RELEASED_EXPERIMENT` at any
    size). Errors name the offending keys in the kit's names.
    """
    as_official = {rename(k, "released"): v for k, v in state_dict.items()}
    arch = infer_official_arch(as_official, names="kit")
    expected = {rename(k, "kit"): s for k, s in official_layout(arch).items()}
    _check_layout(state_dict, expected, "the kit state dict", arch)
    return as_official


_ABSENT = object()


def _option(config: Any, dotted: str) -> Any:
    """The value at ``dotted`` in a nested config (the class name only for ``class_path``), or ``_ABSENT``."""
    for part in dotted.split("."):
        if not isinstance(config, Mapping) or part not in config:
            return _ABSENT
        config = config[part]
    return config.rsplit(".", 1)[-1] if dotted.endswith("class_path") and isinstance(config, str) else config


def _unreleasable_options(hparams: Any, arch: OfficialArch) -> list[str]:
    """Net options of a kit checkpoint's config that the released module cannot compute (:data:`_FUNCTION_OPTIONS`)."""
    net = hparams.get("net") if isinstance(hparams, Mapping) else None
    if not isinstance(net, Mapping):
        return []
    released_net = kit_hyperparameters(arch)["net"]
    problems = []
    for option in _FUNCTION_OPTIONS:
        ours, released = _option(net, f"init_args.{option}"), _option(released_net, f"init_args.{option}")
        if ours is not _ABSENT and ours != released:
            problems.append(f"{option}={ours!r} (released: {released!r})")
    return problems


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


def _group(weights: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _strip_wrappers(key: str) -> str:
    """Drop DDP (``module.``) and torch.compile (``_orig_mod.``) path components (no DiP module has these)."""
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_COMPONENTS)


def _find_state_dict(obj: Any) -> tuple[Mapping[str, Tensor], str]:
    """The tensors of a loaded file (a bare state dict, or a Lightning checkpoint's ``state_dict``) and which."""
    if isinstance(obj, Mapping) and "state_dict" in obj and _is_tensor_dict(obj["state_dict"]):
        return obj["state_dict"], "Lightning checkpoint ('state_dict')"
    if _is_tensor_dict(obj):
        return obj, "bare state dict"
    top = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(
        f"cannot find a state dict in this file (top level: {top}). Expected a bare state dict of "
        "tensors or a Lightning checkpoint whose 'state_dict' holds the released module under "
        "'denoiser.' / 'ema_denoiser.'."
    )


def _strip_wrapper_prefixes(raw: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The tensors without DDP / torch.compile prefixes in their keys, and a note when some had them."""
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
    return sd, notes


def _split_official(obj: Any) -> _OfficialParts:
    """Find the released denoiser weights (EMA and live) and the REPA projector in a loaded file."""
    raw, container = _find_state_dict(obj)
    sd, notes = _strip_wrapper_prefixes(raw)
    grouped = any(k.startswith((_EMA_PREFIX, _LIVE_PREFIX)) for k in sd)
    if not grouped:
        return _OfficialParts(None, sd, None, container, grouped=False, notes=notes)

    ema, live, projector = (_group(sd, prefix) for prefix in (_EMA_PREFIX, _LIVE_PREFIX, _PROJ_PREFIX))
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
    if projector and set(projector) != set(_PROJ_OFFICIAL_TO_KIT):
        raise ConversionError(
            f"the REPA projector '{_PROJ_PREFIX}' has {_preview(sorted(projector))} (expected "
            f"{sorted(_PROJ_OFFICIAL_TO_KIT)})"
        )
    return _OfficialParts(ema or None, live or None, projector or None, container, grouped=True, notes=notes)


def _choose(parts: _OfficialParts, weights: Weights) -> tuple[dict[str, Tensor], str]:
    """The weights to convert and a sentence saying which they are."""
    if weights not in ("auto", "ema", "live"):
        raise ConfigError(f"weights must be 'auto', 'ema' or 'live', got {weights!r}")
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


def _kit_projector(parts: _OfficialParts) -> dict[str, Tensor] | None:
    return {_PROJ_OFFICIAL_TO_KIT[k]: v for k, v in parts.projector.items()} if parts.projector else None


def _kit_parts(
    obj: Any, path: Path
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, Tensor] | None, str]:
    """(sampling weights, raw weights or None, projector (kit names) or None, text) of a kit file."""
    if _is_tensor_dict(obj):
        return {k.removeprefix("net."): v for k, v in obj.items()}, None, None, "bare kit state dict"
    if not (isinstance(obj, Mapping) and STATE_DICT in obj):
        raise ConversionError(
            "cannot find a kit state dict: expected a Lightning checkpoint or a DiP state dict"
        )
    sd = select_weights(obj, path)
    proj = _group(sd, "repa.projector.")
    rest = [k for k in sd if not k.startswith(("net.", "repa.projector.", "repa.encoder."))]
    if rest:
        raise ConversionError(
            f"the kit checkpoint has tensors this converter does not know: {_preview(sorted(rest))}"
        )
    if not proj and isinstance(obj.get("repa_projector"), Mapping):
        proj = dict(obj["repa_projector"])
    raw = _group(select_weights(obj, path, "raw"), "net.") if RAW_WEIGHTS in obj else None
    text = "kit checkpoint: 'state_dict' net.* (EMA when trained with the EMA callback)"
    conversion = obj.get(CONVERSION_RECORD)
    if isinstance(conversion, Mapping):
        text = f"kit checkpoint converted from {conversion.get('source')}: {conversion.get('weights')}"
    if raw:
        text += f"; '{RAW_WEIGHTS}' net.* (raw weights)"
    return _group(sd, "net."), raw or None, proj or None, text


def _is_kit(obj: Any) -> bool:
    sd = obj.get(STATE_DICT) if isinstance(obj, Mapping) else None
    return isinstance(sd, Mapping) and any(k.startswith("net.") for k in sd)


@contextlib.contextmanager
def _naming(failure: str) -> Iterator[None]:
    """Errors about a file's content start with ``failure`` (``cannot convert <file>``): they name the file."""
    try:
        yield
    except (ConversionError, CheckpointError) as err:
        raise type(err)(f"{failure}: {err}") from err


def kit_weights(
    obj: Any, path: str | os.PathLike, weights: Weights = "auto"
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, str]:
    """(kit ``net`` weights, REPA projector in kit names or None, text) of a loaded released or kit file.

    Released files are converted in memory (``weights`` picks EMA or live); kit files give ``state_dict``,
    or their raw weights for ``weights="live"``.
    """
    path = Path(path)
    with _naming(f"cannot load {path}"):
        if _is_kit(obj):
            net, _, proj, text = _kit_parts(obj, path)
            if weights == "live":
                net = _group(select_weights(obj, path, "raw"), "net.")
                text += "; took the raw weights"
            return net, proj, text
        parts = _split_official(obj)
        chosen, text = _choose(parts, weights)
        return official_to_kit(chosen), _kit_projector(parts), text


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def _to_kit_checkpoint(
    obj: Any, in_path: Path, weights: Weights, input_size: int | None
) -> tuple[dict[str, Any], list[str]]:
    from lightning import __version__ as lightning_version

    parts = _split_official(obj)
    chosen, which = _choose(parts, weights)
    net, arch, proj = official_to_kit(chosen), infer_official_arch(chosen), _kit_projector(parts)
    checkpoint: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning_version,
        STATE_DICT: {f"net.{k}": v for k, v in net.items()},
        "hparams_name": "kwargs",
        "hyper_parameters": kit_hyperparameters(arch, input_size),
    }
    lines = [f"read {in_path}: {parts.container}: {which}", *parts.notes]
    if chosen is parts.ema and parts.live is not None:
        checkpoint[RAW_WEIGHTS] = {f"net.{k}": v for k, v in official_to_kit(parts.live).items()}
        lines.append(f"live weights -> '{RAW_WEIGHTS}' (--weights raw)")
    if proj is not None:
        checkpoint["repa_projector"] = proj
        lines.append("REPA projector -> 'repa_projector' (training only; used by load_weights_into)")
    name = arch.model_name() or f"DiP ({arch.describe()})"
    checkpoint[CONVERSION_RECORD] = {
        "from": "official",
        "source": str(in_path),
        "weights": which,
        "model": name,
    }
    lines.append(f"model: {name}, {sum(v.numel() for v in net.values()) / 1e6:.1f}M parameters")
    return checkpoint, lines


def _to_released_checkpoint(obj: Any, in_path: Path) -> tuple[dict[str, Any], list[str]]:
    net, raw, proj, text = _kit_parts(obj, in_path)
    ema_official = kit_to_official(net)
    arch = infer_official_arch(ema_official)
    problems = _unreleasable_options(obj.get("hyper_parameters") if isinstance(obj, Mapping) else None, arch)
    if problems:
        raise ConversionError(
            "this kit model computes a function the released module cannot: " + ", ".join(problems)
        )
    live_official = kit_to_official(raw) if raw is not None else ema_official
    state = {f"{_EMA_PREFIX}{k}": v for k, v in ema_official.items()}
    state |= {f"{_LIVE_PREFIX}{k}": v for k, v in live_official.items()}
    lines = [f"read {in_path}: {text}", "'state_dict' weights -> 'ema_denoiser.*'"]
    lines.append(
        "raw weights -> 'denoiser.*'" if raw is not None else "no raw weights: 'denoiser.*' = same weights"
    )
    if proj is not None:
        if set(proj) != set(_PROJ_KIT_TO_OFFICIAL):
            raise ConversionError(f"unexpected REPA projector layout: {sorted(proj)}")
        state |= {_PROJ_PREFIX + _PROJ_KIT_TO_OFFICIAL[k]: v for k, v in proj.items()}
        lines.append("REPA projector -> 'diffusion_trainer.proj.*'")
    return {"state_dict": state, CONVERSION_RECORD: {"from": "kit", "source": str(in_path)}}, lines


def released_to_kit(
    in_path: str | os.PathLike,
    weights: Weights = "auto",
    input_size: int | None = None,
    trust_pickle: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """The kit checkpoint (in memory) that ``convert --from official`` writes for a released file, and the lines
    saying what was taken; errors name the file."""
    in_path = Path(in_path)
    obj = read_checkpoint(in_path, trust_pickle=trust_pickle)
    with _naming(f"cannot convert {in_path}"):
        return _to_kit_checkpoint(obj, in_path, weights, input_size)


def convert_checkpoint(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    direction: Direction = "official_to_kit",
    weights: Weights = "auto",
    input_size: int | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
) -> str:
    """Convert a checkpoint file (either ``direction``; the layouts are in docs/design.md); returns a summary.

    ``weights`` picks the released EMA or live copy for ``state_dict``; ``input_size``: see
    :func:`kit_hyperparameters`. Errors name the input file and write nothing; the output appears only complete.
    """
    if direction not in ("official_to_kit", "kit_to_official"):
        raise ConfigError(f"direction must be 'official_to_kit' or 'kit_to_official', got {direction!r}")
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.exists() and not overwrite:  # before reading a possibly large input
        raise FileExistsError(f"{out_path} exists; pass --overwrite to replace it (nothing was written).")
    obj = read_checkpoint(in_path, trust_pickle=trust_pickle)
    with _naming(f"cannot convert {in_path}"):
        if direction == "official_to_kit":
            checkpoint, lines = _to_kit_checkpoint(obj, in_path, weights, input_size)
        else:
            checkpoint, lines = _to_released_checkpoint(obj, in_path)
    with atomic_write(out_path, overwrite=overwrite) as fh:
        torch.save(checkpoint, fh)
    lines.append(f"wrote {out_path}")
    return "\n".join(lines)


def load_weights_into(
    target: nn.Module,
    path: str | os.PathLike,
    weights: Literal["auto", "ema", "live"] = "auto",
    trust_pickle: bool = False,
) -> str:
    """Load released or converted DiP weights into a ``DiPModule`` (or a bare ``DiP``), strictly: fine-tuning.

    ``path`` may be a released file (converted on the fly), a kit checkpoint (``convert`` output or a kit
    training checkpoint) or a pretrained folder (``export``, read without pickle); ``weights`` as
    ``convert --weights`` (``live``: the raw weights of a kit file). The network must have the file's
    architecture (build it from ``experiments/dip_xl16.yaml``). When ``target``
    has REPA and the file has the projector, the projector is loaded too; otherwise the projector keeps its
    init, which the returned text says.
    """
    if Path(path).is_dir():  # a pretrained folder (export): the network's weights only, no pickle
        net_weights, projector_weights = read_pretrained_weights(path), None
        text = f"pretrained folder, {read_pretrained_config(path).get('weights')}"
    else:
        net_weights, projector_weights, text = kit_weights(read_checkpoint(path, trust_pickle), path, weights)
    net = getattr(target, "net", target)
    check_compatible(
        {STATE_DICT: net_weights},
        net,
        path,
        config_keys=(),
        advice="Build the network with the file's architecture (the released one: experiments/dip_xl16.yaml).",
    )
    net.load_state_dict(net_weights, strict=True)
    lines = [f"loaded the network from {path} ({text})"]
    projector = getattr(getattr(target, "repa", None), "projector", None)
    if projector is not None and projector_weights is not None:
        projector.load_state_dict(projector_weights, strict=True)
        lines.append("loaded the REPA projector")
    elif projector is not None:
        lines.append("the file has no REPA projector: it starts from its init")
    elif projector_weights is not None:
        lines.append("the module has no REPA: the file's projector was not used")
    return "; ".join(lines)
