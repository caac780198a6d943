"""A resume that cannot continue this run is an error that names the file and the problem, before anything is
written: a checkpoint of another model configuration, a truncated or corrupt checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from dip_lightning.checkpointing import AtomicCheckpointIO, CheckpointError, CheckpointMismatchError
from tests.helpers.resume import resume_args, run_fit, snapshot


def test_resume_with_mismatched_config_fails_before_writing(tmp_path: Path, demo_data: dict) -> None:
    run = tmp_path / "run"
    stop, _ = run_fit(resume_args(run, demo_data, steps=5))
    assert stop is None
    before = snapshot(run)
    with pytest.raises(CheckpointMismatchError) as err:
        run_fit(resume_args(run, demo_data, steps=10, hidden=96))
    message = str(err.value)
    assert str(run / "checkpoints" / "last.ckpt") in message
    assert "net.init_args.hidden_size: checkpoint 64, this run 96" in message
    assert "differ in shape" in message and "[64," in message and "[96," in message
    assert snapshot(run) == before  # no config.yaml rewrite, no log folder, no checkpoint touched

    # A foreign preemption checkpoint (another model) in the run folder is an error too, not a silent skip.
    other = tmp_path / "other"
    run_fit(resume_args(other, demo_data, steps=5, hidden=96))
    (run / "hpc_ckpt_1.ckpt").write_bytes((other / "checkpoints" / "last.ckpt").read_bytes())
    before = snapshot(run)
    with pytest.raises(CheckpointMismatchError, match="hpc_ckpt_1.ckpt"):
        run_fit(resume_args(run, demo_data, steps=10))
    assert snapshot(run) == before


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path, demo_data: dict) -> None:
    run = tmp_path / "run"
    run_fit(resume_args(run, demo_data, steps=5))
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated by something else than the kit
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"last\.ckpt: the file is truncated or corrupt"):
        run_fit(resume_args(run, demo_data, steps=10))
    assert snapshot(run) == before
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(last)
