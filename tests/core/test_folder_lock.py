"""FolderLock: shared holds coexist, a writer needs the folder alone, and a hold ends with its holder."""

from __future__ import annotations

import threading
import time

import pytest

from dip_lightning.core.folder_lock import NOTICE_S, POLL_S, FolderLock


def test_readers_share_a_folder_and_a_writer_is_refused_until_all_of_them_are_gone(tmp_path):
    with FolderLock(tmp_path) as first, FolderLock(tmp_path) as second, FolderLock(tmp_path) as writer:
        first.share()
        second.share()  # readers together
        assert not writer.take_alone()  # refused (and holding nothing)
        first.close()
        assert not writer.take_alone()  # one reader is still there
        second.close()
        assert writer.take_alone()
        with FolderLock(tmp_path) as reader:
            assert not reader.take_alone()  # the writer has it alone


def test_a_reader_waits_while_a_writer_holds_the_folder_and_says_so_once(tmp_path):
    told: list[str] = []
    with FolderLock(tmp_path) as writer, FolderLock(tmp_path) as reader:
        assert writer.take_alone()
        waiting = threading.Thread(target=reader.share, args=(told.append,))
        waiting.start()
        time.sleep(NOTICE_S + 3 * POLL_S)
        assert waiting.is_alive()
        assert told == [f"{tmp_path} is being rewritten by another process; waiting for it to finish"]
        writer.close()
        waiting.join(timeout=10)
        assert not waiting.is_alive() and len(told) == 1


def test_a_writer_that_holds_the_folder_can_go_back_to_sharing_it(tmp_path):
    with FolderLock(tmp_path) as writer, FolderLock(tmp_path) as reader:
        assert writer.take_alone()
        writer.share()
        reader.share()  # would wait for ever if the writer still held it alone
        assert not writer.take_alone()


def test_a_missing_folder_is_an_error_not_a_folder_without_a_lock(tmp_path):
    with pytest.raises(FileNotFoundError):
        FolderLock(tmp_path / "missing")


def test_a_mount_that_refuses_flock_is_used_without_a_lock_and_says_so(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd: int, operation: int) -> None:  # as Lustre mounted without -o flock answers
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with (
        FolderLock(tmp_path) as lock,
        pytest.warns(UserWarning, match="cannot lock files .*used without a lock"),
    ):
        lock.share()
    with FolderLock(tmp_path) as lock, pytest.warns(UserWarning, match="cannot lock files"):
        assert lock.take_alone()
