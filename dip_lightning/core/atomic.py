"""Atomic, durable file writes: the one way this kit writes a file that must never be seen half-written.

A write goes to a temporary file in the target's folder (or a given folder on the same filesystem), is flushed
and fsynced, then renamed over the target with ``os.replace`` (atomic on POSIX), and the folder entry is
fsynced. Killed at any point, the target is either the complete old file or the complete new one; a failed
write removes its temporary file and leaves the target untouched; one that ran out of space raises
:class:`~dip_lightning.core.errors.NoSpaceLeftError` naming the target. Checkpoints, converted weights, reference
statistics, sample exports, shards and their records all go through :func:`atomic_write`. JSON records never hold
NaN or infinity (not JSON): a writer turns such a value into null and says why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dip_lightning.core.errors import NoSpaceLeftError, exception_chain

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "fsync_dir",
    "leftover_temp_files",
    "write_once",
    "write_or_compare_json",
]


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Persist a rename: fsync the folder entry (not supported everywhere, e.g. some network filesystems)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_path(folder: Path, name: str) -> Path:
    # Hidden, and tagged with the pid so that concurrent writers of the same target never share a file.
    return folder / f".{name}.{os.getpid()}.tmp"


def leftover_temp_files(folder: str | os.PathLike[str], name_pattern: str = "*") -> list[Path]:
    """Temporary files that writes of targets matching ``name_pattern`` (a glob) left in ``folder`` when
    their process was killed. Remove them only while no such write can be running."""
    return sorted(Path(folder).glob(f".{name_pattern}.*.tmp"))


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "wb",
    *,
    overwrite: bool = True,
    temp_dir: str | os.PathLike[str] | None = None,
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it appears only complete: ``with atomic_write(p) as f: f.write(...)``.

    Args:
        path: the target; its folder is created.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
        overwrite: ``False`` refuses an existing target (``FileExistsError``, nothing written). The check is
            made before and again just before the rename.
        temp_dir: folder of the temporary file (default: the target's folder). It must be on the target's
            filesystem, or the rename is a copy.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes new files only ('wb' or 'w'), got mode {mode!r}")
    target = Path(path)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target} exists; pass overwrite to replace it (nothing was written)")
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(temp_dir) if temp_dir is not None else target.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(folder, target.name)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if not overwrite and target.exists():
            raise FileExistsError(f"{target} appeared while it was being written; left unchanged")
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        full = _out_of_space(err)
        if full is not None:  # torch.save wraps it in a RuntimeError ("unexpected pos") that names no file
            raise NoSpaceLeftError(target, full) from err
        if isinstance(err, OSError) and err.filename == str(tmp):  # a read-only or forbidden folder
            raise type(err)(err.errno, err.strerror, str(target)) from err
        raise
    fsync_dir(target.parent)


def _out_of_space(err: BaseException) -> int | None:
    """ENOSPC or EDQUOT when ``err`` or an error it was raised from or while handling is one (and not yet a
    :class:`NoSpaceLeftError`), else None."""
    for cause in exception_chain(err):
        if isinstance(cause, NoSpaceLeftError):
            return None
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return cause.errno
    return None


def atomic_write_json(path: str | os.PathLike[str], obj: Any, overwrite: bool = True) -> None:
    """Write ``obj`` as indented, key-sorted JSON with :func:`atomic_write`; NaN or infinity is a ``ValueError``
    (Python would write ``NaN``, which no JSON reader accepts), and nothing is written."""
    with atomic_write(path, "w", overwrite=overwrite) as handle:
        json.dump(obj, handle, indent=1, sort_keys=True, allow_nan=False)
        handle.write("\n")


def write_or_compare_json(path: str | os.PathLike[str], record: dict[str, Any]) -> list[str]:
    """Write ``record`` to ``path`` as :func:`atomic_write_json` when there is no file yet; else the keys on which
    the file's record differs from ``record`` (empty when it is the same). Processes that start together may all
    call it with the same record."""
    path = Path(path)
    if not path.exists():
        atomic_write_json(path, record)
        return []
    found = json.loads(path.read_text())
    return sorted(k for k in set(found) | set(record) if found.get(k) != record.get(k))


def write_once(path: str | os.PathLike[str], text: str) -> str:
    """Create ``path`` holding ``text`` unless it exists; returns the file's text either way (the first writer's).

    The complete file is hard-linked into place, which fails when the name is taken: processes that start
    together all get the same text, and none sees a half-written file.
    """
    target = Path(path)
    if target.exists():  # the usual case, also in a folder this process may not write
        return target.read_text(encoding="utf-8")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target.parent, target.name)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, target)
    except FileExistsError:
        pass  # another process was first
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
            raise
        # A filesystem without hard links: a refused overwrite (racy only against a simultaneous start).
        with contextlib.suppress(FileExistsError), atomic_write(target, "w", overwrite=False) as handle:
            handle.write(text)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(target.parent)
    return target.read_text(encoding="utf-8")
