"""core/atomic: the write-or-compare record that export chunks and sweep cells are checked against; JSON without
NaN; a full disk or a read-only folder named by the target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dip_lightning.core.atomic import (
    atomic_write,
    atomic_write_json,
    leftover_temp_files,
    write_once,
    write_or_compare_json,
)
from dip_lightning.core.errors import NoSpaceLeftError
from tests.helpers.mounts import read_only_folder, small_disk


def test_a_record_is_written_once_then_compared(tmp_path: Path) -> None:
    path = tmp_path / "folder" / "job.json"
    record = {"seed": 0, "num_samples": 10}
    assert write_or_compare_json(path, record) == []
    assert json.loads(path.read_text()) == record
    assert write_or_compare_json(path, dict(record)) == []
    assert write_or_compare_json(path, {"seed": 1, "num_samples": 10, "extra": True}) == ["extra", "seed"]
    assert json.loads(path.read_text()) == record  # a differing record changes nothing


def test_write_once_keeps_the_first_writers_text(tmp_path: Path) -> None:
    path = tmp_path / "run" / "wandb_id"
    assert write_once(path, "first\n") == "first\n"
    assert write_once(path, "second\n") == "first\n"  # a later job, or a rank that started at the same time
    assert path.read_text() == "first\n" and not leftover_temp_files(path.parent)


def test_a_json_record_never_holds_nan(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"fid": 1.5})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not JSON compliant"):
            atomic_write_json(path, {"fid": bad})
    assert json.loads(path.read_text()) == {"fid": 1.5}  # the previous record is untouched
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_names_the_target_and_keeps_the_previous_file(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 64) as disk:
        target = disk / "last.ckpt"
        torch.save({"w": torch.zeros(4)}, target)
        # torch wraps ENOSPC in "RuntimeError: ... unexpected pos", which names no file.
        with pytest.raises(NoSpaceLeftError) as raised, atomic_write(target) as f:
            torch.save({"w": torch.zeros(64 * 1024)}, f)
        assert raised.value.filename == str(target) and "no space left on device" in str(raised.value)
        assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(4))
        assert [p.name for p in disk.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_a_read_only_folder_names_the_target_not_the_temporary_file(tmp_path: Path) -> None:
    with read_only_folder(tmp_path / "ro") as folder, pytest.raises(OSError) as raised:
        atomic_write_json(folder / "record.json", {"a": 1})
    assert raised.value.filename == str(folder / "record.json")
