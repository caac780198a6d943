"""A pretrained folder: a network's weights shared in the Hugging Face Hub's layout, readable without pickle.

``config.json`` says how to rebuild the network and sample from it (the ``model`` entry: ``net``, ``flow``,
``sampler`` and ``sample_dtype`` in the ``class_path``/``init_args`` form the CLI stores), ``model.safetensors``
holds the network's weights only (``net.state_dict()`` names) and ``README.md`` is the model card. Reading one
never unpickles anything: JSON and safetensors only, and the classes ``config.json`` names are checked against
the allow-list of stored configs (:data:`~dip_lightning.checkpoint.stored_config.TRUSTED_PACKAGES`) before
anything is imported. This module reads and writes the files; the training layer rebuilds the module
(:func:`dip_lightning.training.pretrained.load_pretrained`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from dip_lightning.checkpoint.io import CheckpointError
from dip_lightning.checkpoint.stored_config import UntrustedConfigError, foreign_names
from dip_lightning.core.atomic import atomic_write, fsync_dir

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "GRID_FILE",
    "MODEL_KEYS",
    "WEIGHTS_FILE",
    "PretrainedFolderError",
    "is_pretrained_folder",
    "num_parameters",
    "read_pretrained_config",
    "read_pretrained_weights",
    "weights_dtype",
    "write_pretrained",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
GRID_FILE = "sample_grid.png"
FORMAT = "dip-lightning"
FORMAT_VERSION = 1
#: The module options a folder records: what rebuilds the network and samples from it (no optimizer, no REPA).
MODEL_KEYS = ("net", "flow", "sampler", "sample_dtype")


class PretrainedFolderError(CheckpointError):
    """A pretrained folder is incomplete, damaged or not of this kit (nothing was loaded)."""


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder (a pretrained one or meant as one: its files are checked on reading)."""
    return Path(path).is_dir()


def _missing(folder: Path, name: str) -> PretrainedFolderError:
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    # A run folder given where its checkpoint was meant is the likely slip: name the file to pass instead.
    run = (
        f" It looks like a run folder: pass {folder / 'checkpoints' / 'last.ckpt'}."
        if "checkpoints" in present
        else ""
    )
    return PretrainedFolderError(
        f"{folder} is not a complete pretrained folder: it has no {name} (it holds {present or 'nothing'}). "
        f"A pretrained folder holds {CONFIG_FILE} and {WEIGHTS_FILE}, as `export` writes them; export the run "
        f"again, or copy the missing file.{run}"
    )


def read_pretrained_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``config.json`` of a pretrained folder: JSON of this kit's format, naming only allowed classes.

    Raises :class:`PretrainedFolderError` (missing or damaged file, another format) or
    :class:`~dip_lightning.checkpoint.stored_config.UntrustedConfigError` (a class outside the allow-list).
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"no such pretrained folder: {folder}")
    if not path.is_file():
        raise _missing(folder, CONFIG_FILE)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedFolderError(
            f"{path} is not valid JSON ({err}): copy it again, or export again"
        ) from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise PretrainedFolderError(
            f"{path} is not a {FORMAT} config (format: {found!r}); this kit reads the folders its `export` "
            "and `convert --pretrained` write."
        )
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise PretrainedFolderError(
            f"{path} has format_version {config.get('format_version')}, newer than this kit's {FORMAT_VERSION}: "
            "upgrade dip-lightning."
        )
    model = config.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("net"), Mapping):
        raise PretrainedFolderError(f"{path} has no model.net entry: it does not say which network to build")
    foreign = foreign_names(model, "model")
    if foreign:
        at, name = foreign[0]
        raise UntrustedConfigError(
            f"{path} names {name!r} at {at}; a pretrained folder may only name classes of the kit, torch or "
            "Lightning (rebuilding would import and run that code). Nothing was imported."
        )
    return config


def read_pretrained_weights(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The network weights of a pretrained folder (safetensors, on CPU); a missing or damaged file is a
    :class:`PretrainedFolderError`."""
    folder = Path(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise _missing(folder, WEIGHTS_FILE)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors reports damage as SafetensorError, a bad header as others
        raise PretrainedFolderError(
            f"{path} is truncated or corrupt, or not a safetensors file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): copy it again, or export again."
        ) from err


def _unshared(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors stores each tensor on its own)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in weights.items():
        t = tensor.detach().cpu().contiguous()
        pointer = t.untyped_storage().data_ptr()
        if pointer in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _save_weights(path: Path, weights: Mapping[str, Tensor]) -> None:
    """``model.safetensors``, written under a temporary name beside it and renamed: never half a file."""
    from safetensors.torch import save_file

    temp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(_unshared(weights), str(temp), metadata={"format": "pt"})
        os.chmod(
            temp, 0o666 & ~_umask()
        )  # safetensors creates it private; a shared file is readable as others
        with open(temp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_pretrained(
    folder: str | os.PathLike,
    config: Mapping[str, Any],
    weights: Mapping[str, Tensor],
    card: str,
    files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a pretrained folder: ``config.json`` (``format`` and ``format_version`` added), the weights, the model
    card and ``files`` (name -> bytes, e.g. the sample grid). Each file appears complete; ``config.json`` last, so
    a folder with one has all the others. Without ``overwrite`` a folder holding any of these files is refused
    (``FileExistsError``, nothing written)."""
    folder = Path(folder)
    names = [WEIGHTS_FILE, CARD_FILE, *(files or {}), CONFIG_FILE]
    taken = [n for n in names if (folder / n).exists()]
    if taken and not overwrite:
        raise FileExistsError(
            f"{folder} already holds {', '.join(taken)}; pass --overwrite to replace them (nothing was written)."
        )
    if not all(isinstance(v, Tensor) for v in weights.values()) or not weights:
        raise PretrainedFolderError("the weights to write are not a non-empty dict of tensors")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).unlink(missing_ok=True)  # the folder is incomplete until config.json is back
    _save_weights(folder / WEIGHTS_FILE, weights)
    for name, data in {CARD_FILE: card.encode("utf-8"), **(files or {})}.items():
        with atomic_write(folder / name, "wb") as fh:
            fh.write(data)
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    with atomic_write(folder / CONFIG_FILE, "w") as fh:
        fh.write(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return folder


def weights_dtype(weights: Mapping[str, Tensor]) -> str:
    """The floating-point dtype of a set of weights, as a word for the card (``float32``)."""
    kinds = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values() if t.is_floating_point()})
    return "/".join(kinds) or "none"


def num_parameters(weights: Mapping[str, Tensor]) -> int:
    """How many numbers a set of weights holds."""
    return int(sum(t.numel() for t in weights.values()))
