"""Load a trained or converted DiP for sampling, evaluation or fine-tuning.

* :func:`read_checkpoint`: the file, read once (memory-mapped, tensors on CPU, ``weights_only`` unless the user
  trusts it); an unreadable file is a :class:`~dip_lightning.checkpointing.CheckpointError` naming the file.
* :func:`select_weights`: which weights of a kit checkpoint to use: ``state_dict`` (the first EMA decay's weights
  when training used the EMA callback), another tracked decay's (``ema=``, from the ``ema`` record) or
  ``current_model_state`` (the raw ones). :func:`ema_weights` lists every decay a checkpoint holds.
* :func:`load_module`: a :class:`~dip_lightning.module.DiPModule` for ``sample``, built from the config the
  checkpoint carries or from ``--config`` files; a checkpoint of another network is a
  :class:`~dip_lightning.checkpointing.CheckpointMismatchError` listing the config and tensor differences
  (:func:`~dip_lightning.checkpointing.check_compatible`, as ``fit`` reports them).
* :func:`load_pretrained`: released or converted weights into a module built for fine-tuning.

Commands print these errors as ``error: <message>`` and exit with code 2.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn

from dip_lightning.checkpointing import CheckpointError, check_compatible, peek_checkpoint
from dip_lightning.phema import RECONSTRUCTION_RECORD

if TYPE_CHECKING:
    from dip_lightning.module import DiPModule

__all__ = [
    "EMA_RECORD",
    "WeightChoice",
    "decay_key",
    "ema_weights",
    "load_module",
    "load_pretrained",
    "module_from_hparams",
    "read_checkpoint",
    "select_weights",
    "weights_label",
]

RAW_WEIGHTS = "current_model_state"
"""Where the EMA callback keeps the raw weights (it puts the EMA ones in ``state_dict``)."""


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """The object a checkpoint file holds, read once: memory-mapped when possible (a 632M-parameter checkpoint
    with optimizer states is ~10 GB; tensors are only read when used), on CPU.

    Only tensors and plain data are accepted unless ``trust_pickle`` (``torch.load(weights_only=False)``).
    Raises ``FileNotFoundError``, or :class:`CheckpointError` naming the file for a truncated, corrupt or
    foreign one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    return peek_checkpoint(path, weights_only=not trust_pickle)


EMA_RECORD = "ema"
"""The checkpoint entry listing the EMA decays (``decays``, the first one's weights being ``state_dict``) and the
weights of the others (``weights``, keyed by :func:`decay_key`); written by :class:`dip_lightning.callbacks.EMA`."""


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
    if isinstance(reconstruction, Mapping):  # written by ema-reconstruct (dip_lightning.phema)
        return f"phema std {reconstruction.get('std')} at step {reconstruction.get('step')}"
    if isinstance(checkpoint, Mapping) and RAW_WEIGHTS in checkpoint:
        return "ema (decay not recorded)"
    return "state_dict"


def module_from_hparams(hparams: Mapping[str, Any], **overrides: Any) -> DiPModule:
    """The :class:`DiPModule` that LightningCLI's stored ``hyper_parameters`` describe, with ``overrides``.

    What ``DiPModule.load_from_checkpoint`` builds, without reading the file again.
    """
    from lightning.pytorch.cli import instantiate_module

    from dip_lightning.module import DiPModule

    known = inspect.signature(DiPModule.__init__).parameters
    config = {k: v for k, v in hparams.items() if k in known} | overrides
    return instantiate_module(DiPModule, config)


def _module_from_configs(configs: list[str]) -> DiPModule:
    """The module ``fit`` would build from these YAML files, on a bare CPU trainer (no GPUs, callbacks, logger)."""
    from dip_lightning.cli import DiPCLI

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


def load_module(
    ckpt_path: str | os.PathLike,
    configs: list[str] | None = None,
    raw_weights: bool = False,
    trust_pickle: bool = False,
    ema: float | None = None,
) -> DiPModule:
    """A :class:`DiPModule` with a checkpoint's weights (:func:`select_weights`: the first EMA decay by default,
    ``ema`` another tracked one, ``raw_weights`` the raw ones); ``module.loaded_weights`` says which
    (:func:`weights_label`).

    Without ``configs`` the network is rebuilt from the hyperparameters LightningCLI stored in the checkpoint;
    with ``configs`` (YAML files as for ``fit``) it is built from them. REPA is never built: sampling does not
    use it, and its frozen encoder's weights file need not exist on the sampling machine.
    """
    checkpoint = read_checkpoint(ckpt_path, trust_pickle)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    # The REPA projector is a training-only part.
    weights = {
        k: v
        for k, v in select_weights(checkpoint, ckpt_path, ema, raw_weights).items()
        if not k.startswith("repa.")
    }
    if configs:
        module = _module_from_configs(configs)
        advice = "Drop --config (the checkpoint carries its config), or pass the config it was trained with."
    elif hparams and "net" in hparams:
        module = module_from_hparams(hparams, repa=None, compile=False)
        advice = "Its stored config does not build its own tensors: pass --config with the YAML it was trained with."
    else:
        raise CheckpointError(
            f"{ckpt_path} holds no model config (hyper_parameters): pass --config with the experiment YAML it "
            "was trained with."
        )
    check_compatible({"state_dict": weights, "hyper_parameters": hparams}, module, ckpt_path, advice=advice)
    module.load_state_dict(weights, strict=True)
    module.loaded_weights = weights_label(checkpoint, ema, raw_weights)
    return module


def load_pretrained(
    target: nn.Module,
    path: str | os.PathLike,
    weights: Literal["auto", "ema", "live"] = "auto",
    trust_pickle: bool = False,
) -> str:
    """Load released or converted DiP weights into a ``DiPModule`` (or a bare ``DiP``), strictly: fine-tuning.

    ``path`` may be a released file (converted on the fly) or a kit checkpoint (``convert`` output or a kit
    training checkpoint); ``weights`` as ``convert --weights`` (``live``: the raw weights of a kit file). The
    network must have the file's architecture (build it from ``experiments/dip_xl16.yaml``). When ``target``
    has REPA and the file has the projector, the projector is loaded too; otherwise the projector keeps its
    init, which the returned text says.
    """
    from dip_lightning.convert import kit_weights

    net_weights, projector_weights, text = kit_weights(read_checkpoint(path, trust_pickle), path, weights)
    net = getattr(target, "net", target)
    check_compatible(
        {"state_dict": net_weights},
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
