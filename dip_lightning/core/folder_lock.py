"""A folder that any number of processes read together and one process at a time replaces: ``flock`` on a file in it.

Readers hold a shared lock for as long as they read; a process that removes and rewrites the folder's files needs
it alone. The demo's data folder is the use: one ``demo`` streams its shards for minutes, and a second one started
with other crop settings would otherwise delete them under it. ``flock`` is advisory and per open file, so a
process that dies releases its hold with it (no stale lock to clear). On network filesystems Linux emulates it
with byte-range locks, which hold across clients; a run folder, written by many nodes of a cluster job, uses
:mod:`dip_lightning.checkpoint.run_lock` instead. Where the lock file cannot be created (a read-only folder, which
nobody can rewrite either) or the platform has no ``flock``, the folder is used without one; so it is on a mount
that refuses ``flock`` (Lustre's default), with a warning.
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX platform: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = ["FolderLock"]

#: Seconds between two tries of a lock that a writer holds.
POLL_S = 0.2
#: Seconds of waiting after which ``share`` says it waits (a process checking the folder holds it for moments).
NOTICE_S = 1.0


class FolderLock:
    """Shared (reading) or exclusive (rewriting) use of ``folder``, through the lock file ``folder / name``."""

    def __init__(self, folder: str | os.PathLike, name: str = ".lock") -> None:
        self.path = Path(folder) / name
        self._fd: int | None = None
        if fcntl is None:
            return
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # A folder this process cannot write: used without a lock (it cannot rewrite it either).

    def share(self, on_wait: Callable[[str], None] | None = None) -> None:
        """Hold the folder for reading; while a writer has it, wait (telling ``on_wait`` once, after ``NOTICE_S``)."""
        start = time.monotonic()
        told = False
        while not self._try(fcntl.LOCK_SH if fcntl is not None else 0):
            if not told and on_wait is not None and time.monotonic() - start >= NOTICE_S:
                on_wait(f"{self.path.parent} is being rewritten by another process; waiting for it to finish")
                told = True
            time.sleep(POLL_S)

    def take_alone(self) -> bool:
        """Hold the folder alone, for rewriting, if no other process holds it; else hold nothing and return False. A
        shared hold is given up first (``flock`` cannot upgrade atomically)."""
        return self._fd is None or (self._try(fcntl.LOCK_UN) and self._try(fcntl.LOCK_EX))

    def _try(self, mode: int) -> bool:
        if self._fd is None:
            return True
        try:
            fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:  # a mount without flock (Lustre's default noflock, NFS with nolock)
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            warnings.warn(
                f"{self.path.parent}: this filesystem cannot lock files ({err.strerror}); it is used without a lock, "
                "so another process may rewrite it meanwhile",
                stacklevel=3,
            )
            self.close()
        return True

    def close(self) -> None:
        """Give the folder up (closing the file releases any hold)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
