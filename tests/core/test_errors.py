"""core/errors: which failures the kit understands (one ``error:`` line) and the message each gets."""

from __future__ import annotations

import errno
import pickle
import zipfile

from dip_lightning.core.errors import KitError, NoSpaceLeftError, failure_message


class _Explained(KitError, ValueError):
    pass


def test_kit_errors_are_understood_as_their_message() -> None:
    assert (
        failure_message(_Explained("reference x.npz holds NaN; recompute it"))
        == "reference x.npz holds NaN; recompute it"
    )
    # Re-raised from a DataLoader worker, torch puts the worker's traceback into the message: the original stays.
    wrapped = _Explained(
        "Caught _Explained in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n_Explained: shard s.tar holds 3 of 8 samples'
    )
    assert failure_message(wrapped) == "shard s.tar holds 3 of 8 samples"


def test_paths_that_are_missing_forbidden_or_exist_are_understood_and_named() -> None:
    assert failure_message(FileNotFoundError(errno.ENOENT, "No such file or directory", "/d/a.npz")) == (
        "/d/a.npz: No such file or directory"
    )
    assert (
        failure_message(PermissionError(errno.EACCES, "Permission denied", b"/d/run"))
        == "/d/run: Permission denied"
    )
    assert (
        failure_message(FileExistsError("out.npz exists; pass --overwrite"))
        == "out.npz exists; pass --overwrite"
    )
    assert failure_message(IsADirectoryError(errno.EISDIR, "Is a directory", "/d")) == "/d: Is a directory"


def test_a_full_or_read_only_disk_is_understood_wherever_it_is_in_the_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
            ) from err
    except RuntimeError as wrapped:
        message = failure_message(wrapped)
    assert (
        message is not None and message.startswith("no space left on device") and "no file named" in message
    )
    read_only = OSError(errno.EROFS, "Read-only file system", "/runs/x/tensorboard/events.out")
    assert failure_message(read_only) == (
        "read-only file system: could not write /runs/x/tensorboard/events.out; write to another folder (or have "
        "it mounted read-write), then rerun"
    )
    full = NoSpaceLeftError("/runs/x/checkpoints/last.ckpt")
    assert full.errno == errno.ENOSPC and full.filename == "/runs/x/checkpoints/last.ckpt"
    assert failure_message(full) == str(full) and "could not write /runs/x/checkpoints/last.ckpt" in str(full)
    again = pickle.loads(pickle.dumps(full))  # a prepare worker's failure reaches the main process
    assert type(again) is NoSpaceLeftError and str(again) == str(full)


def test_anything_else_is_a_bug_and_not_understood() -> None:
    assert failure_message(ValueError("could not broadcast input array")) is None
    assert failure_message(KeyError("arr_0")) is None
    assert failure_message(zipfile.BadZipFile("File is not a zip file")) is None
    assert failure_message(OSError(errno.EIO, "Input/output error")) is None
    assert failure_message(FileNotFoundError()) is None  # names nothing
