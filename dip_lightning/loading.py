"""Load a trained or converted DiP for sampling, evaluation or fine-tuning.

* :func:`read_checkpoint`: the file, read once (memory-mapped, tensors on CPU, ``weights_only`` unless the user
  trusts it); an unreadable file is a :class:`~dip_lightning.checkpointing.CheckpointError` naming the file.
* :func:`select_weights`: which weights of a kit checkpoint to use: ``state_dict`` (the EMA weights when training
  used the EMA callback) or ``current_model_state`` (the raw ones).
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn

from dip_lightning.checkpointing import CheckpointError, check_compatible, peek_checkpoint

if TYPE_CHECKING:
    from dip_lightning.module import DiPModule

__all__ = ["load_module", "load_pretrained", "module_from_hparams", "read_checkpoint", "select_weights"]

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


def select_weights(checkpoint: Any, path: str | os.PathLike, raw: bool = False) -> dict[str, Tensor]:
    """The module weights a kit checkpoint holds: ``state_dict`` (the EMA weights when training used the EMA
    callback), or with ``raw`` the raw weights ``current_model_state``. The one place that makes this choice."""
    key = RAW_WEIGHTS if raw else "state_dict"
    weights = checkpoint.get(key) if isinstance(checkpoint, Mapping) else None
    if not isinstance(weights, Mapping):
        why = " (raw weights exist only in checkpoints written with the EMA callback)" if raw else ""
        raise CheckpointError(f"{path} has no '{key}'{why}.")
    return dict(weights)


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
) -> DiPModule:
    """A :class:`DiPModule` with a checkpoint's weights (EMA by default, :func:`select_weights`).

    Without ``configs`` the network is rebuilt from the hyperparameters LightningCLI stored in the checkpoint;
    with ``configs`` (YAML files as for ``fit``) it is built from them. REPA is never built: sampling does not
    use it, and its frozen encoder's weights file need not exist on the sampling machine.
    """
    checkpoint = read_checkpoint(ckpt_path, trust_pickle)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    # The REPA projector is a training-only part.
    weights = {
        k: v
        for k, v in select_weights(checkpoint, ckpt_path, raw_weights).items()
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
