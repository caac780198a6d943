"""Checkpoint files: which one a resume picks, atomic saves, preemption-checkpoint naming and pruning."""

from __future__ import annotations

from pathlib import Path

import torch

from dip_lightning.checkpoint.io import PARTIAL_DIR, AtomicCheckpointIO, clean_partial_files
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
