"""Reading and writing checkpoint files: atomic saves, load errors that name the file and the fix, the
non-finite scan that keeps a diverged state off disk."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dip_lightning.core.atomic import atomic_write
from dip_lightning.core.errors import KitError, exception_chain

# Temporary files of unfinished saves live in this hidden sub-folder of the target's folder (same filesystem,
# so the final rename is atomic). Not `<name>.tmp-<pid>` next to the target: Lightning numbers preemption
# checkpoints by the digits of *every* file name containing "ckpt_" in the run folder (`hpc_save_path`,
# `_hpc_resume_path`), so a leftover `hpc_ckpt_3.ckpt.tmp-4711` would make it look for `hpc_ckpt_34711.ckpt`.
PARTIAL_DIR = ".partial"


class CheckpointError(KitError, ValueError):
    """A checkpoint cannot be used: unreadable (truncated, corrupt) or written for another model."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file is truncated, empty or corrupt (it cannot be opened as a PyTorch checkpoint)."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint holds objects that ``torch.load(weights_only=True)`` refuses; the file itself may be fine."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint about to be written holds NaN or infinite values; it was not written."""


class CheckpointWriteError(KitError, OSError):
    """A checkpoint could not be written for lack of space (disk full, quota); any previous file under its name is
    unchanged."""


#: errno values that mean "no room": the disk is full, or the user's quota is.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _checked_tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(where, tensor)`` of every non-empty floating-point or complex tensor in nested dicts, lists and tuples,
    but for ``ModelCheckpoint``'s scalars: it stores ``inf`` as the initial best score by design."""
    if isinstance(value, torch.Tensor):
        bookkeeping = value.ndim == 0 and where.startswith("callbacks.ModelCheckpoint")
        if (value.is_floating_point() or value.is_complex()) and value.numel() and not bookkeeping:
            yield where, value
    elif isinstance(value, Mapping):
        for key, sub in value.items():
            yield from _checked_tensors(sub, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, sub in enumerate(value):
            yield from _checked_tensors(sub, f"{where}[{i}]")


def nonfinite_tensors(checkpoint: Any, prefix: str = "") -> list[str]:
    """Where ``checkpoint`` (nested dicts, lists, tuples) holds floating-point tensors with a NaN or inf entry.

    One reduction per tensor and one device-to-host read per device at the end (a save is a sync point anyway).
    """
    flags_by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for where, tensor in _checked_tensors(checkpoint, prefix):
        finite = torch.isfinite(tensor.detach()).all()
        flags_by_device.setdefault(finite.device, []).append((where, finite))
    bad: list[str] = []
    for flags in flags_by_device.values():
        finite = torch.stack([flag for _, flag in flags]).tolist()
        bad += [where for (where, _), ok in zip(flags, finite) if not ok]
    return sorted(bad)


def _is_local(path: _PATH) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def _local_path(path: _PATH) -> Path:
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def _holds_pickles(path: _PATH) -> bool:
    """Whether the file is of a kind that holds pickled objects: torch's zip format, or its legacy format (a
    pickle stream: first byte PROTO, 0x80). A text file fails weights-only loading too, but is no checkpoint."""
    if not _is_local(path):
        return True
    try:
        with open(_local_path(path), "rb") as f:
            first = f.read(1)
    except OSError:
        return True
    return first == b"\x80" or zipfile.is_zipfile(_local_path(path))


def _first_line(err: BaseException) -> str:
    """The first line of an error's message, without the terminal colour codes torch puts in it."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(err).splitlines()[0]) if str(err) else ""


def _load_error(path: _PATH, err: BaseException) -> CheckpointError:
    """One line for every command that reads checkpoints (fit, sample, convert): the file, the problem, the fix."""
    weights_only = isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err).lower()
    if weights_only and _holds_pickles(path):
        return UntrustedCheckpointError(
            f"cannot load checkpoint {path}: it holds objects that torch.load(weights_only=True) refuses "
            f"({_first_line(err)}). Only if you trust its origin, load it without that restriction "
            "(fit: --weights_only=false; sample, convert: --trust_pickle)."
        )
    first = _first_line(err)
    return DamagedCheckpointError(
        f"cannot load checkpoint {path}: the file is truncated or corrupt, or not a PyTorch checkpoint "
        f"({type(err).__name__}: {first}). A save interrupted by this kit never leaves such a file under its "
        "final name, so it was damaged or copied incompletely: copy it again, or use another checkpoint (fit "
        "without --ckpt_path sets damaged files aside and continues from the newest complete one)."
    )


def _no_space(err: BaseException) -> OSError | None:
    """The "no space left" error in ``err``'s chain: torch's zip writer reports a failed write as
    ``RuntimeError: ... unexpected pos``, with the ``OSError`` only as its context."""
    return next((e for e in exception_chain(err) if isinstance(e, OSError) and e.errno in _NO_SPACE), None)


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def _no_space_error(target: Path, cause: OSError, written: int | None) -> CheckpointWriteError:
    try:
        free = _size(shutil.disk_usage(target.parent).free) + " free"
    except OSError:
        free = "free space unknown"
    wrote = f" after {_size(written)} of it" if written else ""
    return CheckpointWriteError(
        f"cannot write checkpoint {target}: {os.strerror(cause.errno or errno.ENOSPC).lower()}{wrote} ({free} "
        f"on {target.parent}); any previous {target.name} is unchanged. Free space there (or move the run folder "
        "to a larger disk), then run fit again to continue from the newest complete checkpoint."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and durable, and whose load errors say what is wrong.

    Why not the stock plugin: Lightning 2.6 serialises the whole checkpoint into memory, then writes it
    through an fsspec transaction whose temporary file lives in the system temp folder
    (``tempfile.mkstemp()``). When that is another filesystem than the run folder (local ``/tmp`` vs. a shared
    cluster filesystem, the usual case) the final move is a copy: a job killed during it leaves a truncated
    checkpoint under the final name, and nothing is fsynced. Here a local save streams ``torch.save`` through
    :func:`dip_lightning.core.atomic.atomic_write` with its temporary file in ``<folder>/.partial/``: killed at any
    point, the target is either the complete old file or the complete new one. Remote URLs (``s3://`` ...)
    keep the stock behaviour.

    Loading wraps unreadable files in a :class:`CheckpointError` naming the file and the likely cause, instead
    of ``PytorchStreamReader failed reading zip archive``.

    A checkpoint holding a NaN or infinite floating-point tensor (weights, EMA, optimizer state: anything in
    the dictionary) is not written: :class:`NonFiniteCheckpointError`, and the previous file under that name
    stays as it was (``check_finite=False`` turns the check off). :attr:`last_written` is the last file this
    plugin wrote.
    """

    def __init__(self, check_finite: bool = True) -> None:
        super().__init__()
        self.check_finite = check_finite
        self.last_written: Path | str | None = None
        self.last_written_step: int | None = None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if self.check_finite:
            bad = nonfinite_tensors(checkpoint)
            if bad:
                shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                raise NonFiniteCheckpointError(
                    f"refusing to write checkpoint {path}: {len(bad)} tensor(s) hold NaN or inf ({shown}); the "
                    "previous file under that name (if any) is kept. Training diverged: add the "
                    "dip_lightning.training.callbacks.NonFiniteGuard callback, which skips such steps, and resume "
                    "from the last good checkpoint."
                )
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            self.last_written, self.last_written_step = str(path), checkpoint.get("global_step")
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not support `storage_options`; got {storage_options!r}"
            )
        target = _local_path(path)
        partial_dir = target.parent / PARTIAL_DIR
        written = None
        try:
            with atomic_write(target, temp_dir=partial_dir) as fh:
                try:
                    self._write(checkpoint, fh)
                except BaseException:
                    with contextlib.suppress(OSError, ValueError):
                        written = fh.tell()
                    raise
        except Exception as err:
            no_space = _no_space(err)
            if no_space is None:
                raise
            with contextlib.suppress(OSError):
                partial_dir.rmdir()
            raise _no_space_error(target, no_space, written) from err
        self.last_written, self.last_written_step = target, checkpoint.get("global_step")
        with contextlib.suppress(OSError):  # only succeeds when no other save is in flight
            partial_dir.rmdir()

    def _write(self, checkpoint: dict[str, Any], fh: Any) -> None:
        """Serialise into the open temporary file (a separate method so tests can slow a save down)."""
        torch.save(checkpoint, fh)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise _load_error(path, err) from err


def clean_partial_files(folders: Iterable[_PATH]) -> list[Path]:
    """Delete leftovers of interrupted saves (``<folder>/.partial/*``); returns what was removed.

    Call only when no save can be in flight (before training starts, on one process).
    """
    removed = []
    for folder in folders:
        partial_dir = Path(folder) / PARTIAL_DIR
        if not partial_dir.is_dir():
            continue
        for leftover in partial_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
                removed.append(leftover)
        with contextlib.suppress(OSError):
            partial_dir.rmdir()
    return removed


# --------------------------------------------------------------------------------------------- reading
def peek_checkpoint(path: _PATH, weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint lazily (memory-mapped, tensors on CPU) to read its step, config and tensor shapes.

    Costs little even for multi-GB files: tensor data is only read when touched. ``weights_only`` as in
    ``torch.load`` (and ``fit(weights_only=...)``). Raises :class:`CheckpointError` for unreadable files.
    """
    try:
        # Only zip-format files can be memory-mapped; the legacy format (and a file that is no checkpoint at
        # all) then reaches torch's own reader, whose error names the problem.
        mmap = zipfile.is_zipfile(path)
        return torch.load(str(path), map_location="cpu", mmap=mmap, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise _load_error(path, err) from err


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """The object a checkpoint file holds, read once: memory-mapped when possible (a checkpoint with optimizer
    states and EMA copies holds several copies of the weights; tensors are only read when used), on CPU.

    Only tensors and plain data are accepted unless ``trust_pickle`` (``torch.load(weights_only=False)``).
    Raises ``FileNotFoundError``, or :class:`CheckpointError` naming the file for a truncated, corrupt or
    foreign one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    return peek_checkpoint(path, weights_only=not trust_pickle)
