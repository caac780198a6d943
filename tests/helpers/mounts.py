"""Real storage faults for the tests: a folder on a tiny tmpfs (a disk that fills), a read-only folder.

Both need root to mount; a read-only folder falls back to ``chmod`` for other users (root ignores the mode bits).
Where neither works the test is skipped with the reason. Mounts are undone when the context exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount_tmpfs(folder: Path, options: str) -> None:
    """Mount a tmpfs on ``folder`` (created), or skip the test saying why."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root (uid {os.geteuid()})")
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command on this machine")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


@contextlib.contextmanager
def small_disk(folder: Path, size_kib: int) -> Iterator[Path]:
    """``folder`` on a tmpfs of ``size_kib`` KiB: writes beyond that fail with ENOSPC (root only, else skip)."""
    _mount_tmpfs(folder, f"size={size_kib}k,mode=0755")
    try:
        yield folder
    finally:
        _unmount(folder)


def fill(folder: Path) -> None:
    """Fill the file system of ``folder`` up to the last byte (a file of zeros, written until ENOSPC)."""
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # unbuffered: nothing is left to flush (and fail) at close
            f.write(b"\0" * 4096)


@contextlib.contextmanager
def read_only_folder(folder: Path, populate: Path | None = None) -> Iterator[Path]:
    """``folder`` that refuses every write, holding a copy of ``populate`` (a folder) when given.

    As root: a tmpfs remounted read-only (writes fail with EROFS). Otherwise the folder and its contents lose
    their write bits (PermissionError); restored afterwards so that pytest can delete it.
    """
    if os.geteuid() == 0:
        _mount_tmpfs(folder, "size=64m,mode=0755")
        try:
            if populate is not None:
                shutil.copytree(populate, folder, dirs_exist_ok=True)
            done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True)
            if done.returncode != 0:
                pytest.skip(
                    f"cannot remount a tmpfs read-only: {done.stderr.decode(errors='replace').strip()}"
                )
            yield folder
        finally:
            _unmount(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    if populate is not None:
        shutil.copytree(populate, folder, dirs_exist_ok=True)
    paths = [folder, *folder.rglob("*")]
    dirs = [p for p in paths if p.is_dir()]
    for d in dirs:
        d.chmod(0o555)
    try:
        yield folder
    finally:
        for d in dirs:
            d.chmod(0o755)
