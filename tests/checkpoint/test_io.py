"""Checkpoint files: which one a resume picks, atomic saves, preemption-checkpoint naming and pruning."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dip_lightning.checkpoint.io import (
    PARTIAL_DIR,
    AtomicCheckpointIO,
    CheckpointWriteError,
    DamagedCheckpointError,
    UntrustedCheckpointError,
    clean_partial_files,
    peek_checkpoint,
)
from dip_lightning.checkpoint.resume import next_preemption_path, prune_preemption_checkpoints, resolve_resume


def _fake_ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "state_dict": {}}, path)
    return path


def test_resume_resolution_order(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert resolve_resume(run).path is None and resolve_resume(run).source == "fresh"
    assert next_preemption_path(run) == run / "hpc_ckpt_1.ckpt"
    last = _fake_ckpt(run / "checkpoints" / "last.ckpt", 10)
    assert resolve_resume(run).path == last
    hpc1 = _fake_ckpt(run / "hpc_ckpt_1.ckpt", 12)
    hpc2 = _fake_ckpt(run / "hpc_ckpt_2.ckpt", 10)  # same step as last.ckpt: the preemption save wins
    decision = resolve_resume(run)
    assert decision.path == hpc2 and decision.source == "preemption"
    assert [p for p, _ in decision.ignored] == [hpc1]
    explicit = _fake_ckpt(tmp_path / "elsewhere.ckpt", 3)
    assert resolve_resume(run, explicit=explicit).path == explicit
    _fake_ckpt(run / "checkpoints" / "last.ckpt", 20)
    assert resolve_resume(run).path == last  # both preemption checkpoints are behind: stale
    assert next_preemption_path(run) == run / "hpc_ckpt_3.ckpt"
    assert prune_preemption_checkpoints(run, keep=hpc2) == [hpc1]
    assert sorted(p.name for p in run.glob("hpc_ckpt_*")) == ["hpc_ckpt_2.ckpt"]


def test_atomic_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "hpc_ckpt_1.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(4.0)}, target)
    io.save_checkpoint({"global_step": 2, "w": torch.arange(5.0)}, target)  # overwrite in place
    assert sorted(p.name for p in target.parent.iterdir()) == ["hpc_ckpt_1.ckpt"]
    loaded = io.load_checkpoint(target)
    assert loaded["global_step"] == 2 and torch.equal(loaded["w"], torch.arange(5.0))
    # Leftovers of killed saves are cleaned up before the next fit starts.
    (target.parent / PARTIAL_DIR).mkdir()
    (target.parent / PARTIAL_DIR / "hpc_ckpt_2.ckpt.4711").write_bytes(b"half")
    assert len(clean_partial_files([target.parent])) == 1
    assert not (target.parent / PARTIAL_DIR).exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real filesystem that fills up. Needs root (mount); skipped, saying why, elsewhere."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs to fill (needs root): {mount.stderr.strip() or mount.returncode}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_disk_full_during_a_save_names_the_file_and_keeps_the_previous_one(small_disk: Path) -> None:
    io = AtomicCheckpointIO()
    target = small_disk / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "w": torch.zeros(150_000)}, target)  # 600 KB of 1 MiB
    with pytest.raises(CheckpointWriteError) as full:
        io.save_checkpoint(
            {"global_step": 4, "w": torch.ones(150_000)}, target
        )  # its temporary file does not fit
    message = str(full.value)
    assert message.startswith(f"cannot write checkpoint {target}: no space left on device")
    assert "KiB free on" in message and "any previous last.ckpt is unchanged" in message
    assert isinstance(full.value, OSError)
    kept = torch.load(target, weights_only=True)
    assert kept["global_step"] == 2 and torch.equal(kept["w"], torch.zeros(150_000))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_damaged_and_untrusted_checkpoints_are_told_apart(tmp_path: Path) -> None:
    good = _fake_ckpt(tmp_path / "good.ckpt", 3)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:-100])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for damaged in (truncated, empty):
        with pytest.raises(
            DamagedCheckpointError, match=f"cannot load checkpoint {damaged}: the file is trunc"
        ):
            peek_checkpoint(damaged)
    untrusted = tmp_path / "untrusted.ckpt"
    torch.save({"global_step": 1, "thing": Path("x")}, untrusted)
    with pytest.raises(UntrustedCheckpointError, match="weights_only"):
        peek_checkpoint(untrusted)
