"""The kit's own failures: errors whose message names the problem and the fix, and which failures are those.

Every command prints a failure the kit understands (:func:`failure_message`) as one ``error: <message>`` line and
exits with code 2; anything else is a bug and keeps its traceback. :class:`KitError` subclasses also derive from
the built-in exception that describes them (a bad checkpoint is a ``ValueError``), so callers that catch those
keep working.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

__all__ = [
    "ConfigError",
    "KitError",
    "MissingExtraError",
    "NoSpaceLeftError",
    "exception_chain",
    "failure_message",
]


class KitError(Exception):
    """A failure the kit understands and explains in its message (what is wrong, what to do)."""


class ConfigError(KitError, ValueError):
    """An option or a combination of options the kit cannot run with; the message names it and the fix."""


class MissingExtraError(KitError, ImportError):
    """An optional dependency is not installed; the message names what to install (or how to do without)."""


class NoSpaceLeftError(KitError, OSError):
    """A write ran out of space (disk full, or the quota exceeded); nothing was written under the file's name.

    ``errno`` and ``filename`` are the failed write's; the message names the file and what to do.
    """

    def __init__(self, path: str | os.PathLike[str], code: int = errno.ENOSPC) -> None:
        reason = os.strerror(code).lower()
        super().__init__(
            code,
            f"{reason}: could not write {os.fspath(path)} (an earlier file of that name, if any, is unchanged); free "
            "space there or write elsewhere, then rerun",
        )
        self.filename = os.fspath(path)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple:
        # Rebuilt from (path, code) in the process that receives it (a prepare worker's failure).
        return type(self), (self.filename, self.errno)


#: OSError numbers that mean the storage refused a write: the machine's state, not a bug.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
#: OSError types that describe a path the user named or its state.
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_FIXES = {
    errno.ENOSPC: "free space there or write elsewhere, then rerun",
    errno.EDQUOT: "free space within the quota or write elsewhere, then rerun",
    errno.EROFS: "write to another folder (or have it mounted read-write), then rerun",
}


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, then the exceptions it was raised from or while handling (each once)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _path(value: object) -> str:
    return os.fsdecode(value) if isinstance(value, (str, bytes, os.PathLike)) else str(value)


def _storage_message(err: BaseException) -> str | None:
    """A storage refusal anywhere in ``err``'s chain (a library may wrap ENOSPC in its own error), naming the
    file when any error of the chain names one."""
    refused = next(
        (e for e in exception_chain(err) if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS), None
    )
    if refused is None:
        return None
    if isinstance(refused, KitError):
        return str(refused)
    named = next((e for e in exception_chain(err) if isinstance(e, OSError) and e.filename is not None), None)
    where = (
        f"could not write {_path(named.filename)}" if named is not None else "a write failed (no file named)"
    )
    return f"{STORAGE_ERRNOS[refused.errno]}: {where}; {_FIXES[refused.errno]}"


def _unwrapped(message: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (torch's ``ExceptionWrapper``
    puts the worker's whole traceback into the message)."""
    if "Original Traceback (most recent call last):" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def failure_message(err: BaseException) -> str | None:
    """The message of a failure the kit understands, for one ``error:`` line; None for anything else (a bug).

    Understood: :class:`KitError`; a full, over-quota or read-only file system (anywhere in the chain); a
    missing, existing, forbidden or wrong-kind path (FileNotFoundError, FileExistsError, PermissionError,
    IsADirectoryError, NotADirectoryError) that names the path or was raised with a message.
    """
    if isinstance(err, KitError):
        return _unwrapped(str(err))
    storage = _storage_message(err)
    if storage is not None:
        return storage
    if isinstance(err, PATH_ERRORS):
        if err.filename is not None:
            other = f" -> {_path(err.filename2)}" if err.filename2 is not None else ""
            return f"{_path(err.filename)}{other}: {err.strerror}"
        if err.errno is None and str(err):  # raised with a message by the kit or a library
            return _unwrapped(str(err))
    return None
