"""What a checkpoint's stored config may make the kit import.

LightningCLI stores the parsed config in a checkpoint (``hyper_parameters``) and rebuilds the model from it
(``load_module``, ``validate``/``predict --ckpt_path``); jsonargparse then imports every module a ``class_path`` or
a dotted value of a callable-typed option (``optimizer: module.function``) names, and importing runs that module's
code. ``torch.load(weights_only=True)`` keeps pickled code out of a checkpoint, but not these names. So they are
checked before anything is parsed: only the kit's, torch's and Lightning's, unless the user trusts the file
(``--trust_pickle``, ``--weights_only=false``, ``trust_pickle=True``), as for pickles.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from dip_lightning.checkpoint.io import CheckpointError, peek_checkpoint

__all__ = [
    "TRUSTED_PACKAGES",
    "UntrustedConfigError",
    "check_checkpoint_config",
    "check_stored_config",
    "foreign_names",
    "plain_config",
]

#: The packages whose classes and functions a checkpoint's stored config may name unless the file is trusted.
TRUSTED_PACKAGES = ("dip_lightning", "torch", "lightning")

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_CLASS_KEYS = ("class_path", "_class_path", "_instantiator")


def plain_config(value: Any) -> Any:
    """A stored config (dicts, jsonargparse Namespaces, lists, tuples) as plain nested dicts and lists."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    return value


class UntrustedConfigError(CheckpointError):
    """A checkpoint's stored config names code outside :data:`TRUSTED_PACKAGES`; nothing was imported."""


def _is_trusted(name: str) -> bool:
    return "." not in name or name.split(".", 1)[0] in TRUSTED_PACKAGES


def _importable_top_level(name: str) -> bool:
    """Whether ``name``'s first component is a module Python would import (found on the path; nothing runs)."""
    top = name.split(".", 1)[0]
    try:
        return top in sys.modules or importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _named_imports(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """``(where, name)`` of every name in a config that jsonargparse may import: ``class_path`` values (a bare
    class name resolves among already imported subclasses only) and dotted strings whose first component is an
    importable module (an option typed as a callable takes ``module.function``)."""
    if isinstance(value, Mapping):
        for key, sub in value.items():
            at = f"{where}.{key}" if where else str(key)
            if key in _CLASS_KEYS and isinstance(sub, str):
                yield at, sub
            else:
                yield from _named_imports(sub, at)
    elif isinstance(value, (list, tuple)):
        for i, sub in enumerate(value):
            yield from _named_imports(sub, f"{where}[{i}]")
    elif isinstance(value, str) and _DOTTED.fullmatch(value) and _importable_top_level(value):
        yield where, value


def foreign_names(config: Any, where: str = "") -> list[tuple[str, str]]:
    """``(where, name)`` of every class or function a config names outside :data:`TRUSTED_PACKAGES`."""
    return [(at, name) for at, name in _named_imports(config, where) if not _is_trusted(name)]


def check_stored_config(
    hparams: Mapping[str, Any] | None, source: str | os.PathLike = "the checkpoint", trusted: bool = False
) -> None:
    """Refuse (:class:`UntrustedConfigError`) a stored config that names code outside :data:`TRUSTED_PACKAGES`
    before anything of it is imported, unless ``trusted``."""
    if trusted or not hparams:
        return
    foreign = foreign_names(hparams, "hyper_parameters")
    if foreign:
        at, name = foreign[0]
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        allowed = ", ".join(f"{p}." for p in TRUSTED_PACKAGES)
        raise UntrustedConfigError(
            f"{source}: its stored config names {name!r} at {at}{more}; rebuilding the model would import and run "
            f"that code, and a checkpoint may only name {allowed} classes. Only if you trust the file's origin: "
            "sample, sweep: --trust_pickle; validate, test, predict: --weights_only=false; Python: "
            "trust_pickle=True."
        )


def check_checkpoint_config(ckpt_path: str | os.PathLike, trusted: bool = False) -> None:
    """:func:`check_stored_config` of a checkpoint file's ``hyper_parameters`` (read lazily: no tensor data)."""
    if trusted:
        return
    checkpoint = peek_checkpoint(ckpt_path, weights_only=True)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    check_stored_config(hparams, ckpt_path)
