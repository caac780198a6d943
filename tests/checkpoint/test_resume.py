"""Which checkpoint a resume picks when some are damaged or newer than ``last.ckpt``: the newest complete one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dip_lightning.checkpoint.io import AtomicCheckpointIO, DamagedCheckpointError, UntrustedCheckpointError
from dip_lightning.checkpoint.resume import resolve_resume, supersede_newer
from dip_lightning.checkpoint.run_folder import DAMAGED_FOLDER, SUPERSEDED_FOLDER


def _ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    AtomicCheckpointIO().save_checkpoint(
        {"global_step": step, "state_dict": {"w": torch.full((64,), step)}}, path
    )
    return path


def _truncate(path: Path, keep: int | None = None) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])
    return path


def _run_with_steps(tmp_path: Path, *steps: int, last: int | None = None) -> tuple[Path, Path]:
    run = tmp_path / "run"
    folder = run / "checkpoints"
    for step in steps:
        _ckpt(folder / f"step{step:08d}.ckpt", step)
    if last is not None:
        _ckpt(folder / "last.ckpt", last)
    return run, folder


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_last_is_set_aside_and_the_newest_step_file_used(tmp_path: Path, damage: str) -> None:
    run, folder = _run_with_steps(tmp_path, 2, 4, 6, last=6)
    last = _truncate(folder / "last.ckpt", None if damage == "truncated" else 0)
    decision = resolve_resume(run, move_damaged=True)
    assert decision.path == folder / "step00000006.ckpt" and decision.source == "step" and decision.step == 6
    [(old, new, why)] = decision.set_aside
    assert old == last and new.parent == folder / DAMAGED_FOLDER and new.name.startswith("last-")
    assert why == ("empty file" if damage == "empty" else f"truncated or corrupt, {new.stat().st_size} bytes")
    assert not last.exists() and new.exists()  # renamed, never deleted
    assert "Set aside as damaged: last.ckpt -> " in decision.message()
    assert "from step checkpoint" in decision.message()


def test_damaged_newest_step_file_falls_back_to_the_next(tmp_path: Path) -> None:
    run, folder = _run_with_steps(tmp_path, 2, 4, 6)
    _truncate(folder / "step00000006.ckpt")
    decision = resolve_resume(run, move_damaged=True)
    assert decision.path == folder / "step00000004.ckpt" and decision.step == 4
    assert [old.name for old, _, _ in decision.set_aside] == ["step00000006.ckpt"]


def test_damaged_last_does_not_block_a_newer_preemption_checkpoint(tmp_path: Path) -> None:
    run, folder = _run_with_steps(tmp_path, 2, 4, last=4)
    _truncate(folder / "last.ckpt")
    hpc = _ckpt(run / "hpc_ckpt_1.ckpt", 5)
    decision = resolve_resume(run, move_damaged=True)
    assert decision.path == hpc and decision.source == "preemption" and decision.step == 5
    assert [old.name for old, _, _ in decision.set_aside] == ["last.ckpt"]


def test_damaged_preemption_checkpoint_falls_back_to_last(tmp_path: Path) -> None:
    run, folder = _run_with_steps(tmp_path, 2, 4, last=4)
    hpc = _truncate(_ckpt(run / "hpc_ckpt_1.ckpt", 5))
    decision = resolve_resume(run, move_damaged=True)
    assert decision.path == folder / "last.ckpt" and decision.step == 4
    [(old, new, _)] = decision.set_aside
    assert (
        old == hpc and new.parent == run / DAMAGED_FOLDER
    )  # out of Lightning's `*ckpt_*` scan of the run folder


def test_newer_step_file_wins_over_older_last_and_ties_prefer_last(tmp_path: Path) -> None:
    """A disk that filled while last.ckpt was written: step00000004.ckpt is complete, last.ckpt is at step 2."""
    run, folder = _run_with_steps(tmp_path, 2, 4, last=2)
    decision = resolve_resume(run, move_damaged=True)
    assert decision.path == folder / "step00000004.ckpt" and decision.step == 4
    assert decision.ignored == [(folder / "last.ckpt", "stale: step 2 is behind step00000004.ckpt at step 4")]
    _ckpt(folder / "last.ckpt", 4)
    # Same step: last.ckpt is the later save of that state.
    assert resolve_resume(run, move_damaged=True).path == folder / "last.ckpt"
    hpc = _ckpt(run / "hpc_ckpt_1.ckpt", 4)
    assert resolve_resume(run, move_damaged=True).path == hpc


def test_explicit_damaged_checkpoint_stays_an_error(tmp_path: Path) -> None:
    run, folder = _run_with_steps(tmp_path, 2, 4, last=4)
    asked = _truncate(folder / "step00000004.ckpt")
    with pytest.raises(DamagedCheckpointError, match="step00000004.ckpt"):
        resolve_resume(run, explicit=asked, move_damaged=True)
    assert asked.exists()


def test_without_move_damaged_damaged_files_are_skipped_not_moved(tmp_path: Path) -> None:
    run, folder = _run_with_steps(tmp_path, 2, 4, last=4)
    last = _truncate(folder / "last.ckpt")
    decision = resolve_resume(run)
    assert decision.path == folder / "step00000004.ckpt" and not decision.set_aside and last.exists()
    assert decision.ignored[0][0] == last and decision.ignored[0][1].startswith("damaged: truncated")


def test_untrusted_checkpoint_is_not_damaged(tmp_path: Path) -> None:
    run, folder = _run_with_steps(tmp_path, 2)
    torch.save({"global_step": 4, "thing": Path("x")}, folder / "last.ckpt")
    with pytest.raises(UntrustedCheckpointError):
        resolve_resume(run, move_damaged=True)
    assert (folder / "last.ckpt").exists()
    assert resolve_resume(run, weights_only=False, move_damaged=True).step == 4


def test_going_back_with_ckpt_path_supersedes_the_later_checkpoints(tmp_path: Path) -> None:
    run, folder = _run_with_steps(tmp_path, 2, 4, 6, last=6)
    hpc = _ckpt(run / "hpc_ckpt_1.ckpt", 5)
    moved = supersede_newer(run, folder, 4)
    assert sorted(old.name for old, _ in moved) == ["hpc_ckpt_1.ckpt", "last.ckpt", "step00000006.ckpt"]
    assert all(new.parent.name == SUPERSEDED_FOLDER and new.exists() for _, new in moved)
    assert not hpc.exists()
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["step00000002.ckpt", "step00000004.ckpt"]
    assert resolve_resume(run, move_damaged=True).path == folder / "step00000004.ckpt"
