"""What a kit checkpoint holds, and which of its weights a command uses.

A ``fit`` checkpoint holds Lightning's ``state_dict`` (the first EMA decay's weights when training used the EMA
callback), the raw weights, a record of every tracked EMA decay and, with PowerFunctionEMA, the post-hoc records
(:mod:`dip_lightning.checkpoint.posthoc`). The keys are named here; writers and readers use these names. Every
command asks for weights in one syntax (:class:`WeightRequest`: ``ema``, ``ema:0.9996``, ``raw``, ``phema:0.05``)
and :func:`select_weights` answers it with one set of rules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from jsonargparse.typing import register_type
from torch import Tensor

from dip_lightning.checkpoint.io import CheckpointError
from dip_lightning.checkpoint.posthoc import (
    PROFILES_RECORD,
    RECONSTRUCTION_RECORD,
    Reconstruction,
    find_snapshots,
    reconstruct,
    reconstruction_of,
    recorded_profiles,
    run_snapshot_folder,
)
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.phema import MAX_STD

STATE_DICT = "state_dict"
"""Lightning's module weights: the first EMA decay's when training used the EMA callback, else the trained ones."""

RAW_WEIGHTS = "current_model_state"
"""The raw (non-averaged) weights, beside the EMA ones in ``state_dict`` (Lightning's ``EMAWeightAveraging`` key)."""

EMA_RECORD = "ema"
"""Every tracked EMA decay (``decays``, in order; the first one's weights are ``state_dict``) and the weights of the
others (``weights``, keyed by :func:`decay_key`): :func:`ema_record`, written by the EMA callback."""

CONVERSION_RECORD = "dip_conversion"
"""What ``convert`` made a checkpoint from (``from``, ``source``, ``weights``: which released copy)."""

IMAGES_SEEN = "images_seen"
"""Training images seen up to the checkpoint's step, over all ranks and micro-batches (an int; written by
:class:`~dip_lightning.training.callbacks.monitor.TrainingMonitor`; absent from checkpoints written before it)."""


def decay_key(decay: float) -> str:
    """The key of a decay in the EMA record's ``weights``: its shortest round-tripping text (``"0.9996"``)."""
    return repr(float(decay))


def ema_record(decays: list[float], others: Mapping[float, Mapping[str, Tensor]]) -> dict[str, Any]:
    """The :data:`EMA_RECORD` entry: every tracked decay, and the weights of all but the first (``state_dict``)."""
    return {"decays": [float(d) for d in decays], "weights": {decay_key(d): w for d, w in others.items()}}


def ema_weights(checkpoint: Any) -> dict[float, Mapping[str, Tensor]]:
    """Every EMA a checkpoint records, by decay, in the order trained (the first is ``state_dict``); empty
    without the record. A record that lists a decay without weights is a :class:`CheckpointError`."""
    record = checkpoint.get(EMA_RECORD) if isinstance(checkpoint, Mapping) else None
    if not isinstance(record, Mapping):
        return {}
    others = record.get("weights") or {}
    found: dict[float, Mapping[str, Tensor]] = {}
    for i, decay in enumerate(record.get("decays") or ()):
        weights = checkpoint.get(STATE_DICT) if i == 0 else others.get(decay_key(decay))
        if not isinstance(weights, Mapping):
            raise CheckpointError(
                f"the checkpoint's '{EMA_RECORD}' record lists decay {decay} without weights"
            )
        found[float(decay)] = weights
    return found


def reconstruction_checkpoint(rebuilt: Reconstruction) -> dict[str, Any]:
    """The checkpoint ``ema-reconstruct`` writes: the reconstruction as ``state_dict``, the hyperparameters and
    the reconstruction record; it loads as itself with the default request."""
    return {
        STATE_DICT: rebuilt.weights,
        "hyper_parameters": rebuilt.hyper_parameters,
        RECONSTRUCTION_RECORD: rebuilt.record(),
    }


# ---------------------------------------------------------------------------------------------- weight requests
WeightKind = Literal["ema", "raw", "phema"]

ACCEPTED_FORMS = (
    "ema (the first tracked EMA decay), ema:DECAY (e.g. ema:0.9996), raw, or phema:STD (e.g. phema:0.05)"
)


@dataclass(frozen=True)
class WeightRequest:
    """Which weights of a checkpoint to use, in the syntax every command takes (``--weights``): ``ema`` (the
    default: the first tracked EMA decay, or the checkpoint's only weights), ``ema:0.9996`` (that tracked decay),
    ``raw`` (the non-averaged weights) or ``phema:0.05`` (a post-hoc EMA of that std, :func:`select_weights`)."""

    kind: WeightKind = "ema"
    decay: float | None = None  # ema only; None: the first tracked decay
    std: float | None = None  # phema only

    def __post_init__(self) -> None:
        if self.kind not in ("ema", "raw", "phema"):
            raise ConfigError(f"weights of kind {self.kind!r}: expected {ACCEPTED_FORMS}")
        if (self.decay is not None and self.kind != "ema") or (self.std is None) != (self.kind != "phema"):
            raise ConfigError(
                f"weights {self.kind}: a decay goes with ema, a std with phema (and phema needs one)"
            )
        if self.decay is not None and not 0.0 <= self.decay <= 1.0:
            raise ConfigError(f"an EMA decay lies in [0, 1], got {self.decay}")
        if self.std is not None and not 0.0 < self.std < MAX_STD:
            raise ConfigError(f"a power-function EMA's std lies in (0, {MAX_STD:.4f}), got {self.std}")

    @classmethod
    def parse(cls, text: str | WeightRequest) -> WeightRequest:
        """The request ``text`` writes; ``ValueError`` naming the accepted forms for anything else."""
        if isinstance(text, WeightRequest):
            return text
        kind, colon, number = str(text).strip().lower().partition(":")
        if kind in ("ema", "raw") and not colon:
            return cls(kind)  # type: ignore[arg-type]
        if kind in ("ema", "phema") and colon:
            try:
                value = float(number)
            except ValueError:
                raise ConfigError(
                    f"weights {text!r}: {number!r} is not a number; expected {ACCEPTED_FORMS}"
                ) from None
            try:
                return cls(kind, **{"decay" if kind == "ema" else "std": value})  # type: ignore[arg-type]
            except ValueError as err:
                raise ConfigError(f"weights {text!r}: {err}") from None
        raise ConfigError(f"weights {text!r}: expected {ACCEPTED_FORMS}")

    def __str__(self) -> str:
        number = self.decay if self.kind == "ema" else self.std
        return self.kind if number is None else f"{self.kind}:{float(number)!r}"


DEFAULT_WEIGHTS = WeightRequest()

# `--weights ema:0.9996` parses by this one syntax in LightningCLI, in the kit's commands and in their YAML files.
register_type(WeightRequest, serializer=str, deserializer=WeightRequest.parse)


def select_weights(
    checkpoint: Any, path: str | os.PathLike, request: WeightRequest | str = DEFAULT_WEIGHTS
) -> dict[str, Tensor]:
    """The module weights of ``checkpoint`` (read from ``path``) that ``request`` asks for; the one place that
    makes this choice.

    * ``ema``: ``state_dict``: the first tracked EMA decay, or the only weights of a checkpoint without EMA
      (trained without the callback, converted, or written by ``ema-reconstruct``, which thereby loads as itself).
    * ``ema:D``: the weights of tracked decay ``D``.
    * ``raw``: the raw weights the EMA callback keeps beside the averages.
    * ``phema:S``: the power-function EMA of std ``S`` reconstructed from the run's snapshots (``<run>/phema``,
      beside ``<run>/checkpoints``) at the latest snapshot step at or before the checkpoint's step (the
      checkpoint's own step when a snapshot was written there); a reconstruction of ``S`` loads as itself.

    Raises :class:`CheckpointError` naming ``path``, what it holds and the fix when it lacks these weights.
    """
    request = WeightRequest.parse(request)
    if request.kind == "phema":
        return _posthoc(checkpoint, path, request)[0]
    if request.kind == "raw":
        weights = _entry(checkpoint, RAW_WEIGHTS)
        if weights is None:
            raise CheckpointError(
                f"{path} has no raw weights ('{RAW_WEIGHTS}'); it {_holdings(checkpoint)}. Runs trained with the "
                "EMA callback keep them; --weights ema gives this one's weights."
            )
    elif request.decay is None:
        weights = _entry(checkpoint, STATE_DICT)
        if weights is None:
            raise CheckpointError(f"{path} has no '{STATE_DICT}'; it {_holdings(checkpoint)}.")
    else:
        tracked = ema_weights(checkpoint)
        weights = tracked.get(float(request.decay))
        if weights is None:
            choose = (
                "choose one of --weights " + ", ".join(str(WeightRequest("ema", decay=d)) for d in tracked)
                if tracked
                else "--weights ema gives its weights"
            )
            raise CheckpointError(
                f"{path} has no EMA of decay {request.decay}; it {_holdings(checkpoint)}: {choose}."
            )
    return dict(weights)


def weights_label(
    checkpoint: Any, path: str | os.PathLike, request: WeightRequest | str = DEFAULT_WEIGHTS
) -> str:
    """What :func:`select_weights` picks for ``request``, in words for records such as an export's ``job.json``:
    ``"ema 0.9999"``, ``"raw"``, ``"phema std 0.05 at step N"``, ``"released: <which copy>"`` (``convert``) or
    ``"state_dict (no EMA)"``."""
    request = WeightRequest.parse(request)
    if request.kind == "raw":
        return "raw"
    if request.kind == "phema":
        return _phema_label(request.std, _posthoc(checkpoint, path, request, weights=False)[1])
    if request.decay is not None:
        return f"ema {float(request.decay)}"
    tracked = ema_weights(checkpoint)
    if tracked:
        return f"ema {next(iter(tracked))}"
    reconstruction = reconstruction_of(checkpoint)
    if reconstruction is not None:
        return _phema_label(*reconstruction)
    conversion = _entry(checkpoint, CONVERSION_RECORD)
    if conversion is not None:
        return f"released: {conversion.get('weights')}"
    return "state_dict (no EMA)"


def _holdings(checkpoint: Any) -> str:
    """What weights a checkpoint holds, in words after "it" (for errors that say what is there)."""
    if not isinstance(checkpoint, Mapping) or _entry(checkpoint, STATE_DICT) is None:
        return "holds no 'state_dict' (not a kit checkpoint)"
    reconstruction = reconstruction_of(checkpoint)
    if reconstruction is not None:
        return f"holds the {_phema_label(*reconstruction)} that ema-reconstruct wrote"
    parts = []
    tracked = ema_weights(checkpoint)
    if tracked:
        parts.append("EMA decay(s) " + ", ".join(str(d) for d in tracked))
    conversion = _entry(checkpoint, CONVERSION_RECORD)
    if conversion is not None:
        parts.append(f"the released weights ({conversion.get('weights')})")
    if RAW_WEIGHTS in checkpoint:
        parts.append("the raw weights")
    profiles = recorded_profiles(checkpoint)
    if profiles:
        parts.append("post-hoc EMA profiles of std " + ", ".join(str(s) for s in profiles))
    if not parts:
        return "holds the weights of a run trained without the EMA callback"
    return "holds " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def _entry(checkpoint: Any, key: str) -> Mapping | None:
    entry = checkpoint.get(key) if isinstance(checkpoint, Mapping) else None
    return entry if isinstance(entry, Mapping) else None


def _phema_label(std: float | None, step: int) -> str:
    return f"phema std {std} at step {step}"


def _posthoc(
    checkpoint: Any, path: str | os.PathLike, request: WeightRequest, weights: bool = True
) -> tuple[dict[str, Tensor], int]:
    """``phema:S`` (:func:`select_weights`): the weights (empty unless ``weights``) and the snapshot step."""
    std = float(request.std)  # type: ignore[arg-type]
    reconstruction = reconstruction_of(checkpoint)
    if reconstruction is not None:
        if reconstruction[0] != std:
            raise CheckpointError(
                f"{path} {_holdings(checkpoint)}; for std {std} run ema-reconstruct on the run's snapshots."
            )
        return (dict(_entry(checkpoint, STATE_DICT) or {}) if weights else {}), reconstruction[1]
    folder = run_snapshot_folder(path)
    snapshots = find_snapshots(folder) if folder.is_dir() else []
    if not snapshots:
        how = (
            "its run tracked them (trainer.callbacks PowerFunctionEMA) but wrote its snapshots elsewhere: "
            "ema-reconstruct THAT_FOLDER --std S --out CKPT, then load CKPT"
            if _entry(checkpoint, PROFILES_RECORD) is not None
            else "train with dip_lightning.training.callbacks.PowerFunctionEMA in trainer.callbacks, which writes "
            "them to <run>/phema"
        )
        raise CheckpointError(
            f"{path}: --weights {request} needs the run's post-hoc EMA snapshots, and {folder} holds none "
            f"(the checkpoint {_holdings(checkpoint)}). To get them, {how}."
        )
    checkpoint_step = checkpoint.get("global_step") if isinstance(checkpoint, Mapping) else None
    if checkpoint_step is None:
        raise CheckpointError(
            f"{path} records no global_step, so no snapshot step matches it (not a fit checkpoint)."
        )
    steps = [s.step for s in snapshots if s.step <= int(checkpoint_step)]
    if not steps:
        raise CheckpointError(
            f"{path} is at step {checkpoint_step}, before the first snapshot in {folder} "
            f"(steps {[s.step for s in snapshots]}): choose a later checkpoint."
        )
    if not weights:
        return {}, steps[-1]
    return reconstruct(folder, std, steps[-1]).weights, steps[-1]
