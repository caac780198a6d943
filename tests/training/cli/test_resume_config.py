"""What a resume may change and what it may not.

May: execution-only options (activation checkpointing, memory layout, dense small convolutions, compilation)
and the optimizer settings (a new learning rate for a later phase applies to the restored optimizer), each
named in the resume line. May not: the architecture, or a truncated/corrupt checkpoint: an error that names the
file and the problem, raised before anything is written."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from dip_lightning.checkpoint.compatibility import CheckpointMismatchError
from dip_lightning.checkpoint.io import AtomicCheckpointIO, CheckpointError
from tests.helpers.resume import resume_args, run_fit, snapshot


@pytest.mark.slow
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


def test_corrupt_explicit_checkpoint_is_a_clear_error(tmp_path: Path, demo_data: dict) -> None:
    """Asked for by --ckpt_path, a damaged file is an error (without it, fit sets it aside: test_run_folder.py)."""
    run = tmp_path / "run"
    run_fit(resume_args(run, demo_data, steps=5))
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated by something else than the kit
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"last\.ckpt: the file is truncated or corrupt"):
        run_fit(resume_args(run, demo_data, f"--ckpt_path={last}", steps=10))
    assert snapshot(run) == before
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(last)


def _resume_line(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("Resume:"))


@pytest.mark.slow
def test_resume_may_turn_on_activation_checkpointing_and_change_the_head_layout(
    tmp_path: Path, demo_data: dict
) -> None:
    """After an out-of-memory a user resumes with activation checkpointing: same weights layout, so allowed."""
    run = tmp_path / "run"
    stop, _ = run_fit(resume_args(run, demo_data, steps=5))
    assert stop is None
    execution = [
        "--model.net.init_args.checkpoint_blocks=2",
        "--model.net.init_args.checkpoint_head=true",
        "--model.net.init_args.head.init_args.channels_last=false",
        "--model.net.init_args.head.init_args.dense_conv_side=2",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stop, lines = run_fit(resume_args(run, demo_data, *execution, steps=10))
    assert stop is None
    # A resumed run's checkpoint folder is not empty by design: no alarming warning about it.
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    line = _resume_line(lines)
    assert "(step 5)" in line
    for change in (
        "net.init_args.checkpoint_blocks: 0 -> 2",
        "net.init_args.checkpoint_head: False -> True",
        "net.init_args.head.init_args.channels_last: True -> False",
        "net.init_args.head.init_args.dense_conv_side: 4 -> 2",
    ):
        assert change in line, line
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 10
    assert last["hyper_parameters"]["net"]["init_args"]["checkpoint_blocks"] == 2


@pytest.mark.slow
def test_resume_trains_with_the_configured_learning_rate(tmp_path: Path, demo_data: dict) -> None:
    """Lightning restores the saved param groups; the kit applies the configured settings on top and says so."""
    run = tmp_path / "run"
    stop, _ = run_fit(resume_args(run, demo_data, "--model.optimizer.init_args.lr=2e-3", steps=5))
    assert stop is None
    args = ["--model.optimizer.init_args.lr=1e-4", "--model.optimizer.init_args.weight_decay=0.01"]
    stop, lines = run_fit(resume_args(run, demo_data, *args, steps=8))
    assert stop is None
    line = _resume_line(lines)
    assert "optimizer lr: 0.002 -> 0.0001" in line and "optimizer weight_decay: 0.0 -> 0.01" in line, line
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    group = last["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == 1e-4 and group["weight_decay"] == 0.01
    # The moments and step counts were restored, not reset: 8 updates in all.
    state = last["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 8 for s in state.values())


@pytest.mark.slow
def test_new_learning_rate_under_a_scheduler_keeps_the_schedule_position(
    tmp_path: Path, demo_data: dict
) -> None:
    scheduler = (
        '--model.lr_scheduler={"class_path": "torch.optim.lr_scheduler.LinearLR", '
        '"init_args": {"start_factor": 0.5, "total_iters": 12}}'
    )
    run = tmp_path / "run"
    stop, _ = run_fit(resume_args(run, demo_data, scheduler, "--model.optimizer.init_args.lr=2e-3", steps=5))
    assert stop is None
    stop, lines = run_fit(
        resume_args(run, demo_data, scheduler, "--model.optimizer.init_args.lr=4e-3", steps=8)
    )
    assert stop is None
    assert "optimizer lr: 0.002 -> 0.004" in _resume_line(lines)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    group = last["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 4e-3
    assert last["lr_schedulers"][0]["base_lrs"] == [4e-3]
    # LinearLR after 8 steps: factor 0.5 + 0.5 * 8 / 12 of the (new) base lr.
    assert group["lr"] == pytest.approx(4e-3 * (0.5 + 0.5 * 8 / 12), rel=1e-6)


@pytest.mark.slow
def test_explicit_ckpt_path_keeps_this_runs_settings(tmp_path: Path, demo_data: dict) -> None:
    """``fit --ckpt_path`` continues with this run's configuration, like the automatic resume (LightningCLI
    would otherwise replace the model config by the checkpoint's hyperparameters, dropping the new settings)."""
    first = tmp_path / "first"
    stop, _ = run_fit(resume_args(first, demo_data, "--model.optimizer.init_args.lr=2e-3", steps=5))
    assert stop is None
    ckpt = first / "checkpoints" / "last.ckpt"
    args = [
        "--model.optimizer.init_args.lr=1e-4",
        "--model.net.init_args.checkpoint_blocks=1",
        f"--ckpt_path={ckpt}",
    ]
    stop, lines = run_fit(resume_args(tmp_path / "second", demo_data, *args, steps=8))
    assert stop is None
    line = _resume_line(lines)
    assert "optimizer lr: 0.002 -> 0.0001" in line and "checkpoint_blocks: 0 -> 1" in line, line
    last = torch.load(
        tmp_path / "second" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-4
    assert last["hyper_parameters"]["net"]["init_args"]["checkpoint_blocks"] == 1
