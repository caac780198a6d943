"""What a kit checkpoint holds and which of its weights a command uses."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dip_lightning.checkpoint.io import CheckpointError

RAW_WEIGHTS = "current_model_state"
"""Where the EMA callback keeps the raw weights (it puts the EMA ones in ``state_dict``)."""


EMA_RECORD = "ema"
"""The checkpoint entry listing the EMA decays (``decays``, the first one's weights being ``state_dict``) and the
weights of the others (``weights``, keyed by :func:`decay_key`); written by
:class:`dip_lightning.training.callbacks.EMA`."""


def decay_key(decay: float) -> str:
    """The key of a decay in ``checkpoint["ema"]["weights"]``: its shortest round-tripping text (``"0.9996"``)."""
    return repr(float(decay))


def ema_weights(checkpoint: Any) -> dict[float, Mapping[str, Tensor]] | None:
    """Every EMA a kit checkpoint records, by decay, in the order trained (the first is ``state_dict``).

    None for a checkpoint without the record: trained without the EMA callback, or by a kit version that tracked
    one unrecorded decay (its ``state_dict`` is that EMA). A record that lists a decay without weights is a
    :class:`CheckpointError`.
    """
    record = checkpoint.get(EMA_RECORD) if isinstance(checkpoint, Mapping) else None
    if not isinstance(record, Mapping):
        return None
    others = record.get("weights") or {}
    found: dict[float, Mapping[str, Tensor]] = {}
    for i, decay in enumerate(record.get("decays") or ()):
        weights = checkpoint.get("state_dict") if i == 0 else others.get(decay_key(decay))
        if not isinstance(weights, Mapping):
            raise CheckpointError(
                f"the checkpoint's '{EMA_RECORD}' record lists decay {decay} without weights"
            )
        found[float(decay)] = weights
    return found


@dataclass(frozen=True)
class WeightChoice:
    """Which weights of the checkpoint at ``path`` to load (the arguments of :func:`select_weights`)."""

    path: str
    ema: float | None = None
    raw: bool = False


def select_weights(
    checkpoint: Any, path: str | os.PathLike, ema: float | None = None, raw: bool = False
) -> dict[str, Tensor]:
    """The module weights of a kit checkpoint: ``state_dict`` (the first EMA decay's weights when training used
    the EMA callback); with ``ema`` the weights of that tracked decay; with ``raw`` the raw weights
    ``current_model_state``. The one place that makes this choice.

    Raises ``ValueError`` for ``ema`` and ``raw`` together, :class:`CheckpointError` (naming ``path`` and, for an
    untracked decay, the tracked ones) when the checkpoint lacks the weights asked for.
    """
    if raw and ema is not None:
        raise ValueError("choose the raw weights or one EMA decay, not both (--raw_weights / --ema)")
    if ema is not None:
        tracked = ema_weights(checkpoint)
        if tracked is None:
            why = (
                "its state_dict is the EMA of the one decay it was trained with (written before the kit recorded "
                "decays): drop --ema"
                if isinstance(checkpoint, Mapping) and RAW_WEIGHTS in checkpoint
                else "it was trained without the EMA callback"
            )
            raise CheckpointError(f"{path} records no EMA decays; {why}.")
        if float(ema) not in tracked:
            listed = ", ".join(str(d) for d in tracked)
            raise CheckpointError(
                f"{path} has no EMA of decay {ema}; it tracks {listed} (--ema takes one of them)."
            )
        return dict(tracked[float(ema)])
    key = RAW_WEIGHTS if raw else "state_dict"
    weights = checkpoint.get(key) if isinstance(checkpoint, Mapping) else None
    if not isinstance(weights, Mapping):
        why = " (raw weights exist only in checkpoints written with the EMA callback)" if raw else ""
        raise CheckpointError(f"{path} has no '{key}'{why}.")
    return dict(weights)


def weights_label(checkpoint: Any, ema: float | None = None, raw: bool = False) -> str:
    """What :func:`select_weights` picks with these arguments, in words for records such as an export's
    ``job.json``: ``"raw"``, ``"ema 0.9999"``, ``"ema (decay not recorded)"``, ``"phema std 0.05 at step N"``
    (an ``ema-reconstruct`` output) or ``"state_dict"`` (no EMA)."""
    if raw:
        return "raw"
    if ema is not None:
        return f"ema {float(ema)}"
    tracked = ema_weights(checkpoint)
    if tracked:
        return f"ema {next(iter(tracked))}"
    reconstruction = checkpoint.get(RECONSTRUCTION_RECORD) if isinstance(checkpoint, Mapping) else None
    if isinstance(reconstruction, Mapping):  # written by ema-reconstruct (dip_lightning.core.phema)
        return f"phema std {reconstruction.get('std')} at step {reconstruction.get('step')}"
    if isinstance(checkpoint, Mapping) and RAW_WEIGHTS in checkpoint:
        return "ema (decay not recorded)"
    return "state_dict"


RECONSTRUCTION_RECORD = "phema_reconstruction"
"""The entry of a reconstructed checkpoint saying what it was made of (std, step, inputs, coefficients)."""


# ---------------------------------------------------------------------------------------------- snapshots
def std_key(std: float) -> str:
    """The key of a std in a snapshot's ``weights``: its shortest round-tripping text (``"0.05"``)."""
    return repr(float(std))


PHEMA_RECORD = "phema"
"""The checkpoint entry holding the tracked profiles (``stds``, ``weights`` keyed by :func:`std_key`)."""
