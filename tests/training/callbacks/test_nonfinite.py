"""NonFiniteGuard and the checkpoint IO's finiteness check, on real Trainer runs of the tiny config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dip_lightning.checkpoint.io import AtomicCheckpointIO, NonFiniteCheckpointError, nonfinite_tensors
from dip_lightning.training.callbacks import NonFiniteTrainingError
from dip_lightning.training.cli import DiPCLI
from tests.helpers.commands import run_command
from tests.helpers.nonfinite_probe import Poison
from tests.helpers.resume import assert_equal_nested
from tests.helpers.tiny import ema_callback, fit_with, tiny_args

DIVERGE = "--model.optimizer.init_args.lr=1000"
PHEMA = {
    "class_path": "dip_lightning.training.callbacks.PowerFunctionEMA",
    "init_args": {"stds": [0.1], "snapshot_every_n_steps": 100},
}


def guard(**init_args) -> dict:  # noqa: ANN003
    return {"class_path": "dip_lightning.training.callbacks.NonFiniteGuard", "init_args": init_args}


def checkpoints(run: Path) -> list[Path]:
    return sorted(run.rglob("*.ckpt"))


def assert_all_finite(run: Path) -> None:
    found = checkpoints(run)
    assert found, f"no checkpoint under {run}"
    for path in found:
        bad = nonfinite_tensors(torch.load(path, map_location="cpu", weights_only=False))
        assert bad == [], f"{path}: {bad[:5]}"


def test_diverging_run_stops_with_the_error_and_every_checkpoint_is_finite(
    tmp_path: Path, demo_data: dict
) -> None:
    run = tmp_path / "run"
    args = tiny_args(
        run,
        demo_data,
        DIVERGE,
        "--checkpoint.every_n_train_steps=2",
        steps=40,
        callbacks=[ema_callback(decay=0.9), guard(max_consecutive=4)],
    )
    with pytest.raises(NonFiniteTrainingError) as caught:
        DiPCLI(args=["fit", *args])
    error = caught.value
    message = str(error)
    assert "non-finite" in message and f"stopped at step {error.step}" in message and "loss nan" in message
    assert error.consecutive == 4 and error.step < 40
    assert error.last_good is not None and str(run / "checkpoints") in error.last_good
    assert_all_finite(run)
    step = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert step <= error.step


def test_without_the_guard_the_io_refuses_nan_checkpoints(tmp_path: Path, demo_data: dict) -> None:
    """Before the guard: lr=1000 exited 0 with NaN checkpoints. The IO alone now stops the run at the first NaN
    save, and nothing non-finite is on disk."""
    run = tmp_path / "run"
    args = tiny_args(run, demo_data, DIVERGE, "--checkpoint.every_n_train_steps=2", steps=40)
    with pytest.raises(NonFiniteCheckpointError, match="refusing to write checkpoint"):
        DiPCLI(args=["fit", *args])
    for path in checkpoints(run):
        assert nonfinite_tensors(torch.load(path, map_location="cpu", weights_only=False)) == []


def test_io_refuses_and_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteCheckpointError, match=r"state_dict\.w"):
            io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.tensor([1.0, bad])}}, path)
    assert path.read_bytes() == before and io.last_written_step == 1
    assert not (tmp_path / ".partial").exists() or not any((tmp_path / ".partial").iterdir())


@pytest.mark.parametrize("with_guard", [True, False])
def test_resumed_run_that_diverges_keeps_its_good_last_checkpoint(
    tmp_path: Path, demo_data: dict, with_guard: bool
) -> None:
    run = tmp_path / "run"
    callbacks = [ema_callback(decay=0.9)] + ([guard(max_consecutive=3)] if with_guard else [])
    good = tiny_args(run, demo_data, "--checkpoint.every_n_train_steps=4", steps=4, callbacks=callbacks)
    DiPCLI(args=["fit", *good])
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    diverge = tiny_args(
        run, demo_data, DIVERGE, "--checkpoint.every_n_train_steps=4", steps=40, callbacks=callbacks
    )
    expected = NonFiniteTrainingError if with_guard else NonFiniteCheckpointError
    with pytest.raises(expected) as caught:
        DiPCLI(args=["fit", *diverge])
    assert_all_finite(run)
    if with_guard:
        # Stopped at or before the next save (step 8: the guard runs before ModelCheckpoint) and named the
        # checkpoint it resumed from.
        assert caught.value.step <= 8 and str(last) in str(caught.value.last_good)
        assert last.read_bytes() == before
    else:
        loaded = torch.load(last, map_location="cpu", weights_only=False)
        assert loaded["global_step"] == 4 or nonfinite_tensors(loaded) == []


@pytest.mark.parametrize("mode", ["host", "device"])
def test_a_skipped_step_leaves_weights_optimizer_ema_and_schedule_as_they_were(
    tmp_path: Path, demo_data: dict, mode: str
) -> None:
    extra = ["--model.optimizer.init_args.lr=1e-3"]
    if mode == "device":
        extra += ["--model.optimizer.init_args.fused=true"]
        callbacks = [
            ema_callback(decay=None, decays=[0.9, 0.6]),
            PHEMA,
            guard(max_consecutive=3, check_every_n_steps=2),
        ]
    else:
        extra += [
            "--model.lr_scheduler=torch.optim.lr_scheduler.StepLR",
            "--model.lr_scheduler.init_args.step_size=1",
            "--model.lr_scheduler.init_args.gamma=0.9",
        ]
        callbacks = [ema_callback(decay=None, decays=[0.9, 0.6]), PHEMA, guard(max_consecutive=3)]
    poison = Poison(steps=[3])
    cli = fit_with(tiny_args(tmp_path / "run", demo_data, *extra, steps=5, callbacks=callbacks), poison)
    records = {r["step"]: r for r in poison.records}
    assert sorted(records) == [1, 2, 3, 4, 5]
    # Device mode: the EMA update runs with weight 0 (its host count moves) and a scheduler would step.
    for key in ("weights", "optimizer", "ema", "phema") + (
        ("ema_updates", "schedulers") if mode == "host" else ()
    ):
        assert_equal_nested(records[3][key], records[2][key], f"step 3 vs 2: {key}")
    # Not vacuous: the steps around it did change everything.
    for a, b in ((1, 2), (3, 4)):
        assert any(
            not torch.equal(records[a]["weights"][k], records[b]["weights"][k]) for k in records[a]["weights"]
        )
        first = records[a]["ema"][0.9]
        assert any(not torch.equal(first[k], records[b]["ema"][0.9][k]) for k in first)
        profile = records[a]["phema"][0][0.1]
        assert any(not torch.equal(profile[k], records[b]["phema"][0][0.1][k]) for k in profile)
    guard_cb = next(c for c in cli.trainer.callbacks if type(c).__name__ == "NonFiniteGuard")
    assert guard_cb.skipped_total == 1
    if mode == "host":
        assert guard_cb.skipped_steps == [3]
        assert records[3]["optimizer"]["state"][0]["step"] == 2  # the update count did not move either


@pytest.mark.slow
def test_ddp_both_ranks_skip_a_step_poisoned_on_one_rank(tmp_path: Path, demo_data: dict) -> None:
    """Two gloo processes; step 3's gradient is NaN on rank 0 only (after the gradient all-reduce). Both ranks
    skip it (the flag is all-reduced), so their weights stay identical; without agreement rank 1 would step."""
    out = tmp_path / "out"
    args = tiny_args(
        tmp_path / "run",
        demo_data,
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        steps=5,
        callbacks=[ema_callback(decay=0.9), guard(max_consecutive=3)],
    )
    args += [
        "--trainer.callbacks+=tests.helpers.nonfinite_probe.Poison",
        "--trainer.callbacks.init_args.steps=[3]",
        "--trainer.callbacks.init_args.ranks=[0]",
        f"--trainer.callbacks.init_args.out_dir={out}",
    ]
    done = run_command("fit", *args, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((out / f"skips_rank{rank}.json").read_text()) == [3]
    rank0, rank1 = (torch.load(out / f"state_rank{r}.pt", weights_only=False) for r in (0, 1))
    for a, b in zip(rank0, rank1, strict=True):
        assert_equal_nested(a["weights"], b["weights"], f"step {a['step']} weights")
        assert_equal_nested(a["ema"], b["ema"], f"step {a['step']} ema")
    assert_equal_nested(rank0[2]["weights"], rank0[1]["weights"], "skipped step 3")
